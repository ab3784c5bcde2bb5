"""Fixtures of the kernel tests."""

import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench")


def _load(name: str):
    sys.path.insert(0, BENCH)  # kernel_sass and kernel_profile import `qmatmul` from there
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}",
                                                      os.path.join(BENCH, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(BENCH)
    return module


@pytest.fixture
def bench_module():
    """Imports a script of ``scripts/bench`` by name, e.g. ``bench_module("qmatmul")``."""
    return _load
