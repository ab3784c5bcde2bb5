"""The scripts' folders must not shadow installed packages.

``python scripts/bench/quant.py`` puts ``scripts/bench`` first on ``sys.path``, so a script
there named like a package a dependency imports (PyPI's ``kernels``, which transformers
imports to build any model config) replaces that package for every script in the folder.
"""

import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = [os.path.join(ROOT, "scripts"), os.path.join(ROOT, "scripts", "bench")]


@pytest.mark.parametrize("folder", FOLDERS, ids=["scripts", "scripts/bench"])
def test_no_script_is_named_like_an_installed_module(folder):
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    names = {f[:-3] for f in os.listdir(folder) if f.endswith(".py")}
    assert not names & installed, f"{folder}: named like installed modules: {names & installed}"


@pytest.mark.parametrize("folder", FOLDERS, ids=["scripts", "scripts/bench"])
def test_a_model_config_builds_from_the_scripts_folder(folder):
    # what every model-loading script does first, with the folder first on sys.path as it is
    # for `python <folder>/<script>.py`
    code = (f"import sys; sys.path.insert(0, {folder!r}); import transformers; "
            "transformers.LlamaConfig(hidden_size=64)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
