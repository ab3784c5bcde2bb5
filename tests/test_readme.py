"""The README's research-code example runs as written (so the documented API cannot rot)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _example() -> str:
    text = open(README).read()
    m = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its marked example"
    return m.group(1)


def test_readme_starts_with_two_commands():
    blocks = re.findall(r"```bash\n(.*?)```", open(README).read(), re.S)
    assert "scripts/compress.py" in blocks[0] and "pytest" in blocks[1]


@pytest.mark.slow
def test_readme_example_runs(tmp_path, monkeypatch, capsys, smollm2_gguf):
    monkeypatch.chdir(tmp_path)
    exec(compile(_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    ppl = float(re.search(r"perplexity (\S+)", out).group(1))
    assert 10 < ppl < 60
    assert os.path.isfile(tmp_path / "w4_checkpoint" / "jaxcomp.json")
