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


def test_a_compressed_checkpoint_heals_later_toward_heal_teacher(recipe, tiny_llama_dir,
                                                                  tiny_text_file, tmp_path):
    # compress and heal in one run, or compress, save, and heal the checkpoint later: the
    # same student, teacher, batches and QAT masters, so the same healed model
    now, first, later = tmp_path / "now", tmp_path / "first", tmp_path / "later"
    assert main(_args(recipe, tiny_llama_dir, tiny_text_file, now,
                      "heal.checkpoint_every=0")) == 0
    assert main(_args(recipe, tiny_llama_dir, tiny_text_file, first, "heal.steps=0",
                      "save_checkpoint=true")) == 0
    assert main(_args(recipe, first / "checkpoint", tiny_text_file, later, "stages=[]",
                      f"heal.teacher={tiny_llama_dir}", "heal.checkpoint_every=0")) == 0
    now_r, first_r, later_r = (json.loads((d / "report.json").read_text())
                               for d in (now, first, later))
    assert later_r["heal"]["teacher"] == tiny_llama_dir
    assert now_r["heal"]["teacher"] == tiny_llama_dir  # the loaded model
    assert later_r["ppl_before"] == pytest.approx(first_r["ppl_after"], rel=1e-6)
    assert later_r["heal"]["loss_first"] == pytest.approx(now_r["heal"]["loss_first"], rel=1e-5)
    assert later_r["ppl_after_heal"] == pytest.approx(now_r["ppl_after_heal"], rel=1e-5)


def test_healing_with_no_stage_needs_a_teacher(recipe, tiny_llama_dir, tiny_text_file,
                                               tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(recipe, tiny_llama_dir, tiny_text_file, out, "stages=[]",
                      "heal.ce_weight=0")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "distill toward itself" in err, err
    assert "heal.teacher=" in err
    assert not out.exists()


def test_a_bad_heal_teacher_fails_before_compressing(recipe, tiny_llama_dir, tiny_text_file,
                                                     tmp_path, capsys):
    import dataclasses

    import jax

    from jaxcomp.models import build_model
    from jaxcomp.models.hf import export_hf
    from jaxcomp.models.loading import load_model

    tiny = load_model(tiny_llama_dir)
    deeper = dataclasses.replace(tiny.config, num_layers=3)
    other = tmp_path / "deeper"
    export_hf(build_model(deeper).init(jax.random.key(1), np.zeros((1, 4), np.int32))["params"],
              deeper, str(other), tiny.tokenizer)
    for teacher, needle in [(tmp_path / "not-here", "heal.teacher: model '"),
                            (other, "num_layers is 3, the model's is 2")]:
        out = tmp_path / "run"
        assert main(_args(recipe, tiny_llama_dir, tiny_text_file, out,
                          f"heal.teacher={teacher}")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not out.exists()
