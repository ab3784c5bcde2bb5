"""The compress CLI contract: reports, one-line errors with exit code 2, nothing half-written."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from jaxcomp.pipeline import main, make_transforms
from jaxcomp.recipes import available_recipes, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args(model, corpus, out_dir, *extra):
    return ["recipe=baseline", f"model={model}", f"eval.corpus=text:{corpus}", "eval.seq_len=32",
            "eval.batch_size=4", f"out_dir={out_dir}", *extra]


def _fails(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_default_recipe_is_smollm2_tt():
    from jaxcomp.recipes import load_recipe, parse_overrides

    name, overrides = parse_overrides(["eval.seq_len=64"])
    recipe = load_recipe(name, overrides)
    assert recipe.name == "smollm2_tt" and recipe.model == "smollm2-135m"
    assert [s.transform for s in recipe.stages] == ["tt", "quantize"]


@pytest.mark.parametrize("name", available_recipes())
def test_every_shipped_recipe_makes_its_transforms(name):
    # What `recipe=NAME` does before loading the model: a recipe that drifts from a transform's
    # arguments fails here, not minutes into a user's run.
    # Recipes for models that are not embedded (gpt2_kron, llama7b_*) name no model, and
    # llama7b_tt no healing text: the user passes them.
    recipe = load_recipe(name, {"model": "/models/not-loaded-here", "heal.corpus": "lee"})
    assert recipe.stages or name == "baseline"
    transforms = make_transforms(recipe)
    assert len(transforms) == len(recipe.stages) and all(map(callable, transforms))


def test_help_lists_the_recipes_and_transforms(capsys):
    from jaxcomp.core import list_transforms

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python scripts/compress.py")
    for name in available_recipes():  # each with its description
        description = load_recipe(name, {"model": "x", "heal.corpus": "lee"}).description
        assert f"  {name} " in out and description in out, name
    assert ", ".join(list_transforms()) in out


def test_baseline_writes_report(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_llama_dir, tiny_text_file, out)) == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("recipe", "model", "params_before", "params_after", "bytes_before",
                "bytes_after", "bits_per_param", "ppl_before", "ppl_after", "eval_tokens",
                "seconds"):
        assert key in report
    assert report["recipe"] == "baseline"
    assert report["params_before"] == report["params_after"] > 0
    assert report["bits_per_param"] == pytest.approx(32.0)
    assert 1.0 < report["ppl_before"] < 1000  # random 64-token model: near the vocab size
    assert (out / "recipe.yaml").exists()
    assert "perplexity before / after" in capsys.readouterr().out
    assert [p for p in os.listdir(tmp_path) if p != "run"] == []  # no temp dirs left


def test_rerun_replaces_out_dir(tiny_llama_dir, tiny_text_file, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert main(_args(tiny_llama_dir, tiny_text_file, out, "eval.max_tokens=64")) == 0
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "report.json").read_text())["eval_windows"] == 2


@pytest.mark.parametrize("extra, needles", [
    (["eval.seq_ln=8"], ["eval.seq_ln", "eval.seq_len"]),
    (["evl.corpus=lee"], ["'evl'", "'eval'"]),
    (["eval.seq_len=abc"], ["eval.seq_len"]),
    (["eval.seq_len=1"], ["eval.seq_len"]),
    (["eval.batch_size=0"], ["eval.batch_size"]),
    (["recipe=baselin"], ["baselin", "baseline"]),
    (["eval.corpus=nosuchcorpus"], ["nosuchcorpus"]),
    (["notakeyvalue"], ["notakeyvalue"]),
])
def test_bad_recipe_input(tiny_llama_dir, tiny_text_file, tmp_path, capsys, extra, needles):
    out = tmp_path / "run"
    argv = _args(tiny_llama_dir, tiny_text_file, out) + extra
    if extra[0].startswith("eval.corpus="):
        argv = [a for a in argv if not a.startswith("eval.corpus=text:")]
    _fails(capsys, argv, *needles)
    assert os.listdir(tmp_path) == []


def test_missing_model(tiny_text_file, tmp_path, capsys):
    _fails(capsys, _args(tmp_path / "nope.gguf", tiny_text_file, tmp_path / "run"), "nope.gguf")
    _fails(capsys, _args("no-such-model", tiny_text_file, tmp_path / "run"), "no-such-model")
    assert os.listdir(tmp_path) == []


def test_truncated_safetensors(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _fails(capsys, _args(broken, tiny_text_file, tmp_path / "run"), "model.safetensors")
    assert not (tmp_path / "run").exists()


def test_shape_mismatch(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 128
    (broken / "config.json").write_text(json.dumps(config))
    _fails(capsys, _args(broken, tiny_text_file, tmp_path / "run"), "shape", "mlp")
    assert not (tmp_path / "run").exists()


def test_truncated_gguf(smollm2_gguf, tiny_text_file, tmp_path, capsys):
    broken = tmp_path / "broken.gguf"
    with open(smollm2_gguf, "rb") as f:
        broken.write_bytes(f.read(5_000_000))
    _fails(capsys, _args(broken, tiny_text_file, tmp_path / "run"), "broken.gguf")
    assert not (tmp_path / "run").exists()


def test_script_exit_code(tmp_path):
    """The real entry point: one line on stderr, exit code 2, nothing written."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compress.py"),
                           "recipe=baseline", "eval.seq_ln=3", f"out_dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown recipe key 'eval.seq_ln'; did you mean 'eval.seq_len'?"]
    assert not out.exists()


# Runs in a fresh interpreter: every import finder is wrapped so that torch is not found, as on
# a machine with the main install only (putting None in sys.modules instead confuses scipy).
_WITHOUT_TORCH = """
import importlib.util, runpy, sys

class Hidden:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Hidden(f) for f in sys.meta_path]
assert importlib.util.find_spec("torch") is None
script, out = sys.argv[1:]
sys.argv = [script, "recipe=smollm2_w4g128_rtn", "eval.max_tokens=1024", f"out_dir={out}"]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
from jaxcomp.models.loading import load_model
m = load_model(out + "/checkpoint")
text = "Tensor trains compress weight matrices."
assert m.tokenizer.decode(m.tokenizer(text)["input_ids"]) == text
assert "torch" not in sys.modules
print("ok")
"""


@pytest.mark.slow
def test_main_job_runs_without_torch(tmp_path):
    """The README's main-job install has no torch (only the test extra does): the real script
    loads SmolLM2 from its GGUF, quantizes, evaluates and writes a checkpoint that reopens."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH,
                           os.path.join(ROOT, "scripts", "compress.py"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "ok"
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"] == "smollm2_w4g128_rtn"
