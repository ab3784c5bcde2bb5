"""The README's research-code example runs as written (so the documented API cannot rot)."""

import os
import re

import jax
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _example(marker: str = "readme-example") -> str:
    text = open(README).read()
    m = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"README lost its marked example {marker}"
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


def test_readme_tensornet_example_runs(tiny_llama_dir):
    import jaxcomp as jc
    from jaxcomp.tensornet import TTMatrix

    m = jc.load_model(tiny_llama_dir)  # the README's m, model, on a tiny random LLaMA
    scope = {"jc": jc, "m": m, "model": jc.build_model(m.config)}
    exec(compile(_example("readme-example-tensornet"), "README.md", "exec"), scope)
    small = scope["small"]
    assert jc.tensornet.non_embedding_params(small) < 0.45 * jc.tensornet.non_embedding_params(
        m.params)
    assert any(isinstance(leaf, TTMatrix) for leaf in jax.tree_util.tree_leaves(
        small, is_leaf=lambda x: isinstance(x, jc.CompressedLeaf)))


def test_readme_heal_example_runs(tiny_llama_dir):
    import numpy as np

    import jaxcomp as jc

    m = jc.load_model(tiny_llama_dir)
    small = jc.tt(param_ratio=0.5, progress=False)(m.params)
    code = _example("readme-example-heal").replace("steps=20", "steps=2").replace(
        "seq_len=256", "seq_len=16")
    calib_tokens = lambda tokenizer, corpus: np.arange(2000) % 60  # noqa: E731
    data = type("data", (), {"calib_tokens": staticmethod(calib_tokens)})
    scope = {"jc": type("jc", (), {**{k: getattr(jc, k) for k in jc.__all__}, "data": data}),
             "m": m, "small": small}
    exec(compile(code, "README.md", "exec"), scope)
    healed = scope["healed"]
    assert healed.steps_run == 2 and len(healed.losses) == 2


def test_readme_calibrated_example_runs(tiny_llama_dir):
    import numpy as np

    import jaxcomp as jc

    m = jc.load_model(tiny_llama_dir)  # the README's m, model, on a tiny random LLaMA
    code = _example("readme-example-calib")
    tokens = lambda tokenizer, corpus: np.arange(2000) % 60  # noqa: E731
    data = type("data", (), {"calib_tokens": staticmethod(tokens),
                             "sample_calibration": staticmethod(jc.data.sample_calibration)})
    scope = {"jc": type("jc", (), {**{k: getattr(jc, k) for k in jc.__all__}, "data": data}),
             "m": m, "model": jc.build_model(m.config)}
    exec(compile(code, "README.md", "exec"), scope)
    for name in ("small", "w4a4"):
        kernel = scope[name]["layers_1"]["mlp"]["down_proj"]["kernel"]
        assert isinstance(getattr(kernel, "kernel", kernel), jc.QArray), name
