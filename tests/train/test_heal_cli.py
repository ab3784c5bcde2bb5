"""The heal stage through ``scripts/compress.py``: report, loss curve, checkpoints, errors."""

import json
import os
import re

import numpy as np
import pytest

from jaxcomp.errors import JaxcompError
from jaxcomp.pipeline import main

RECIPE = """
description: tiny heal test
stages:
  - transform: tt
    args: {param_ratio: 0.5, targets: ['mlp/.*kernel$']}
  - transform: quantize
    args: {bits: 4, group_size: 16, targets: ['self_attn/.*kernel$']}
heal:
  steps: 3
  lr: 0.003
  warmup_steps: 1
  batch_size: 2
  seq_len: 16
  ce_weight: 0.5
  checkpoint_every: 1
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny_heal.yaml"
    path.write_text(RECIPE)
    return str(path)


def _args(recipe, model, corpus, out, *extra):
    return [f"recipe={recipe}", f"model={model}", f"eval.corpus=text:{corpus}",
            f"heal.corpus=text:{corpus}", "eval.seq_len=32", "eval.batch_size=4",
            "save_checkpoint=false", f"out_dir={out}", *extra]


def test_heal_stage_report(recipe, tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(recipe, tiny_llama_dir, tiny_text_file, out,
                      "heal.ignore=[no_such_param]")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["warnings"] == ["heal.ignore: 'no_such_param' matched no parameter"]
    heal = report["heal"]
    assert heal["steps_run"] == 3 and heal["resumed_from_step"] is None
    assert heal["tokens_trained"] == 3 * 2 * 16
    assert heal["trainable_params"] > 0
    assert report["ppl_after_heal"] == report["ppl_after"]
    assert report["ppl_after_compress"] > 0
    assert (out / "heal_loss.png").stat().st_size > 0
    losses = json.loads((out / "heal_losses.json").read_text())
    assert [entry["step"] for entry in losses] == [1, 2, 3]
    assert "perplexity after compress / heal" in capsys.readouterr().out
    assert not os.path.exists(str(out) + ".heal-checkpoints")  # removed once written


@pytest.mark.parametrize("extra, needle", [
    (["heal.steps=-1"], "heal.steps"),
    (["heal.kd_weight=0", "heal.ce_weight=0"], "at least one of"),
    (["heal.mesh.data=3"], "devices"),
    (["heal.batch_size=100000"], "fewer than heal.batch_size"),
    (["heal.mesh.rules=[['embedding', ['model', null]]]"], "unknown mesh axis"),
    (["heal.mesh.rules=[['(', [null]]]"], "is not a valid regex"),
    (["heal.targets=['^nothing$']"], "heal.targets: '^nothing$' matched no parameter"),
    (["heal.compute_dtype=float16"], "heal.compute_dtype"),
])
def test_bad_heal_input(recipe, tiny_llama_dir, tiny_text_file, tmp_path, capsys, extra,
                        needle):
    out = tmp_path / "run"
    assert main(_args(recipe, tiny_llama_dir, tiny_text_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_bad_mesh_rules_fail_when_the_recipe_loads():
    # before compression, not when the heal builds its trainer minutes later
    from jaxcomp.recipes import load_recipe

    with pytest.raises(JaxcompError, match="unknown mesh axis 'model' in rule 'embedding'"):
        load_recipe("smollm2_tt", {"heal.mesh.rules": [["embedding", ["model", None]]]})


def test_a_mesh_the_devices_cannot_hold_fails_before_the_model_loads(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["recipe=smollm2_tt", "model=/models/not-here", "heal.mesh.data=3",
                 f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: heal.mesh data\*fsdp\*tensor = 3 but there are \d+ devices",
                        err), err
    assert not out.exists()


def test_checkpoints_of_another_run_are_refused(recipe, tiny_llama_dir, tiny_text_file,
                                                tmp_path, capsys):
    from jaxcomp.core import get_transform
    from jaxcomp.models import build_model
    from jaxcomp.models.loading import load_model
    from jaxcomp.train import HealConfig, heal

    ckpt = tmp_path / "ckpt"
    tiny = load_model(tiny_llama_dir)
    student = get_transform("tt")(param_ratio=0.5, progress=False)(tiny.params)
    heal(build_model(tiny.config), student, tiny.params, np.arange(200) % 60,
         HealConfig(steps=1, batch_size=2, seq_len=16, checkpoint_every=1),
         checkpoint_dir=str(ckpt), run_id={"another": "run"})
    assert os.listdir(ckpt)
    out = tmp_path / "run"
    argv = _args(recipe, tiny_llama_dir, tiny_text_file, out, f"heal.checkpoint_dir={ckpt}")
    assert main(argv) == 2
    assert "different recipe" in capsys.readouterr().err
    assert not out.exists()


def test_llama7b_recipe_asks_for_a_heal_corpus(tmp_path, capsys):
    assert main(["recipe=llama7b_tt", f"model={tmp_path}"]) == 2
    assert "heal.corpus=text:PATH" in capsys.readouterr().err
