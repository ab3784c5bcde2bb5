"""ruff (configured in pyproject.toml) is clean over the whole tree."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_clean():
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the test extra)")
    proc = subprocess.run([ruff, "check", "--output-format", "concise", ROOT],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
