"""Fixtures of the kernel tests."""

import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench")


def _load(name: str):
    # kernel_sass and kernel_profile import `kernels` from their folder; a `kernels` package
    # from PyPI (which transformers may have imported already) must not stand in for it.
    shadowed = sys.modules.pop("kernels", None)
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                      os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCH)
        sys.modules.pop("kernels", None)
        if shadowed is not None:
            sys.modules["kernels"] = shadowed
    return module


@pytest.fixture
def bench_module():
    """Imports a script of ``scripts/bench`` by name, e.g. ``bench_module("kernels")``."""
    return _load
