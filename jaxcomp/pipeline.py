"""The pipeline ``scripts/compress.py`` runs: load, evaluate, compress, evaluate, write."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

import jax.numpy as jnp

from jaxcomp.errors import JaxcompError
from jaxcomp.recipes import Recipe, recipe_to_yaml


def _timed(seconds: dict, key: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds[key] = round(time.perf_counter() - start, 3)
    return out


def _eval_windows(recipe: Recipe, tokenizer):
    from jaxcomp.data import eval_tokens, eval_windows

    if tokenizer is None:
        raise JaxcompError(f"model {recipe.model} has no tokenizer files; "
                           "evaluation needs one (tokenizer.json in the model directory)")
    tokens = eval_tokens(tokenizer, recipe.eval.corpus)
    return eval_windows(tokens, recipe.eval.seq_len, recipe.eval.max_tokens or None)


def _calibration_windows(recipe: Recipe, tokenizer):
    from jaxcomp.data import calib_tokens, sample_calibration

    if tokenizer is None:
        raise JaxcompError(f"model {recipe.model} has no tokenizer; calibration needs one")
    tokens = calib_tokens(tokenizer, recipe.calib.corpus)
    return sample_calibration(tokens, recipe.calib.num_samples, recipe.calib.seq_len,
                              seed=recipe.seed)


def run(recipe: Recipe, progress: bool = True) -> dict:
    """Runs a recipe end to end and returns the report dict.

    Everything is written into a temporary directory beside ``recipe.out_dir`` that is renamed
    into place at the end, so a failure leaves no partial output.
    """
    from jaxcomp.core import tree_size
    from jaxcomp.eval import perplexity
    from jaxcomp.models import build_model
    from jaxcomp.models.loading import load_model
    from jaxcomp.tensornet import non_embedding_size

    out_dir = os.path.abspath(recipe.out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        # Every stage's transform is made first: a bad argument fails before any loading.
        stage_reports: dict[str, dict] = {}
        transforms = make_transforms(
            recipe, lambda i: functools.partial(_stage_report, tmp, i, stage_reports))
        if recipe.heal.steps:
            from jaxcomp.train.heal import heal_mesh

            heal_mesh(recipe.heal)  # devices and batch checked now, not after compression
        loaded = _timed(seconds, "load", load_model, recipe.model, stream=recipe.stream)
        teacher = loaded.params
        if recipe.heal.steps and recipe.heal.teacher:  # loaded now: a bad path fails early
            teacher = _timed(seconds, "load_teacher", _load_teacher, recipe.heal.teacher,
                             loaded.config)
        dtype = jnp.bfloat16 if recipe.dtype == "bfloat16" else jnp.float32
        model = build_model(loaded.config, dtype=dtype)
        windows = _eval_windows(recipe, loaded.tokenizer)
        params = loaded.params
        if recipe.stream:
            # sizes from shapes: touching every leaf would read the whole checkpoint
            import jax

            sized = jax.eval_shape(model.init, jax.random.key(0),
                                   jnp.zeros((1, 1), jnp.int32))["params"]
        else:
            sized = params
        params_before, bytes_before = tree_size(sized)
        non_embedding_before, non_embedding_bytes_before = non_embedding_size(sized)
        notes: list[str] = []
        before = _timed(seconds, "eval_before", perplexity, model, params, windows,
                        recipe.eval.batch_size, progress, "eval (before)")
        for i, (stage, transform) in enumerate(zip(recipe.stages, transforms, strict=True)):
            args = ()
            needs = getattr(transform, "needs_calibration", False)
            if needs == "blocks":  # it runs the model itself (block-sequential, Fisher)
                from jaxcomp.calib import Calibration

                args = (Calibration(model, _calibration_windows(recipe, loaded.tokenizer),
                                    recipe.eval.batch_size, progress),)
            elif needs:
                # Statistics of the current (already compressed upstream) params.
                from jaxcomp.calib import collect_input_stats

                calib = _calibration_windows(recipe, loaded.tokenizer)
                args = (_timed(seconds, f"stage{i}:calibration", collect_input_stats, model,
                               params, calib, recipe.eval.batch_size, progress),)
            with _noting_warnings(notes, f"stages.{i} ({stage.transform})"):
                params = _timed(seconds, f"stage{i}:{stage.transform}", transform, params, *args)
        if recipe.stages:
            after = _timed(seconds, "eval_after", perplexity, model, params, windows,
                           recipe.eval.batch_size, progress, "eval (after)")
        else:
            after = before  # nothing changed: the same numbers, not a second run
        after_compress = after
        heal_report = None
        if recipe.heal.steps:
            with _noting_warnings(notes, None):  # heal warnings name their heal.* key
                params, heal_report = _heal(recipe, loaded, params, teacher, tmp, seconds,
                                            progress)
            after = _timed(seconds, "eval_after_heal", perplexity, model, params, windows,
                           recipe.eval.batch_size, progress, "eval (healed)")
        params_after, bytes_after = tree_size(params)
        non_embedding_after, non_embedding_bytes_after = non_embedding_size(params)
        report = {
            "recipe": recipe.name,
            "model": recipe.model,
            "model_source": loaded.source,
            "model_note": loaded.note,
            "arch": loaded.config.model_type,
            "params_before": params_before,
            "params_after": params_after,
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "bits_per_param": 8 * bytes_after / params_before,
            "non_embedding_params_before": non_embedding_before,
            "non_embedding_params_after": non_embedding_after,
            "non_embedding_reduction": round(1 - non_embedding_after / non_embedding_before, 4),
            "non_embedding_bytes_before": non_embedding_bytes_before,
            "non_embedding_bytes_after": non_embedding_bytes_after,
            "non_embedding_bytes_reduction": round(
                1 - non_embedding_bytes_after / non_embedding_bytes_before, 4),
            "ppl_before": before.ppl,
            "ppl_after_compress": after_compress.ppl,
            "ppl_after_heal": after.ppl if heal_report else None,
            "ppl_after": after.ppl,
            "eval_corpus": recipe.eval.corpus,
            "eval_seq_len": recipe.eval.seq_len,
            "eval_windows": before.windows,
            "eval_tokens": before.tokens,
            "eval_tokens_per_s": round(before.tokens_per_s, 1),
            "seconds": seconds,
            "versions": _versions(),
            "machine": _machine(),
            "warnings": notes,
            "stages": stage_reports,
            "heal": heal_report,
        }
        if recipe.save_checkpoint:
            from jaxcomp.checkpoint import save_checkpoint

            _timed(seconds, "save_checkpoint", save_checkpoint, os.path.join(tmp, "checkpoint"),
                   params, loaded.config, loaded.tokenizer)
        if recipe.export_hf:
            from jaxcomp.models.hf import export_hf

            _timed(seconds, "export_hf", export_hf, params, loaded.config,
                   os.path.join(tmp, "hf"), loaded.tokenizer)
        seconds["total"] = round(time.perf_counter() - start, 3)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(tmp, "recipe.yaml"), "w") as f:
            f.write(recipe_to_yaml(recipe))
        import jax

        if jax.process_index() == 0:  # multi-process runs: one writer
            _replace_dir(tmp, out_dir)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        if heal_report and heal_report.get("checkpoint_dir"):
            # The result is written; the resume state is no longer needed.
            shutil.rmtree(heal_report["checkpoint_dir"], ignore_errors=True)
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def make_transforms(recipe: Recipe, report_sink=None) -> list:
    """Each stage's transform, made from its arguments without loading anything.

    ``report_sink(i)`` gives the sink for stage ``i``'s reports, for transforms that write them.
    Raises JaxcompError (one line) on an argument a transform refuses or does not take, and on
    a stage that cannot stream when ``stream`` is set.
    """
    from jaxcomp.core import get_transform

    transforms = []
    for i, stage in enumerate(recipe.stages):
        factory = get_transform(stage.transform)
        extra = {}
        if report_sink and "report_sink" in inspect.signature(factory).parameters:
            extra["report_sink"] = report_sink(i)
        try:
            transforms.append(factory(**stage.args, rules=stage.rules, **extra))
        except TypeError as e:  # an argument the transform does not take
            raise JaxcompError(f"stages.{i} ({stage.transform}): {e}") from None
    if recipe.stream:
        _check_streamable(recipe, transforms)
    return transforms


def _check_streamable(recipe: Recipe, transforms: list) -> None:
    for i, (stage, transform) in enumerate(zip(recipe.stages, transforms, strict=True)):
        if not getattr(transform, "block_steps", None):
            raise JaxcompError(f"stream=true: stages.{i} ({stage.transform}) does not stream; "
                               "only gptq, awq, smoothquant and learn_clip do")
    if recipe.heal.steps:
        raise JaxcompError("stream=true does not heal (training needs the whole model): set "
                           "heal.steps=0")


def _versions() -> dict[str, str]:
    """The packages the numbers depend on (with ``machine``: one commit gave perplexity 14,681
    on one machine and 13,559 on another, BENCHMARKS.md), so a report says which it ran with."""
    from importlib.metadata import version

    return {p: version(p) for p in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy",
                                    "transformers")}


def _machine() -> dict:
    """What ran it: XLA compiles for the host CPU's vector extensions, so the same packages
    can round differently on another CPU."""
    import platform

    import jax

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            info = {k.strip(): v.strip() for k, v in
                    (line.split(":", 1) for line in f.read().splitlines() if ":" in line)}
        cpu, flags = info.get("model name", cpu), set(info.get("flags", "").split())
    except OSError:  # not Linux
        pass
    devices = jax.devices()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "avx512": "avx512f" in flags,
            "devices": f"{len(devices)} x {devices[0].device_kind}"}


@contextlib.contextmanager
def _noting_warnings(notes: list[str], where: str | None):
    """Copies the warnings raised inside (e.g. a rule matching nothing) into the report's
    ``warnings`` and onto stderr, after ``where: `` when given."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for w in caught:
                notes.append(f"{where}: {w.message}" if where else str(w.message))
                print(f"warning: {notes[-1]}", file=sys.stderr)


def _load_teacher(spec: str, config):
    """``heal.teacher``'s params; it must have the student's architecture (both run in one
    model)."""
    import dataclasses

    from jaxcomp.models.loading import load_model

    try:
        teacher = load_model(spec)
    except JaxcompError as e:  # say which model could not be loaded
        raise JaxcompError(f"heal.teacher: {e}") from None
    for field in dataclasses.fields(config):
        mine, theirs = getattr(config, field.name), getattr(teacher.config, field.name)
        if mine != theirs:
            raise JaxcompError(f"heal.teacher {spec}: {field.name} is {theirs!r}, the model's "
                               f"is {mine!r}; the teacher needs the student's architecture")
    return teacher.params


def _heal(recipe: Recipe, loaded, params, teacher, tmp: str, seconds: dict, progress: bool):
    """The heal stage: distillation (+ QAT) toward ``teacher`` (the original params unless
    ``heal.teacher`` names another model) on the heal corpus."""
    import dataclasses

    from jaxcomp.data import calib_tokens
    from jaxcomp.models import build_model
    from jaxcomp.train import heal

    h = recipe.heal
    if loaded.tokenizer is None:
        raise JaxcompError(f"model {recipe.model} has no tokenizer; healing needs one")
    tokens = calib_tokens(loaded.tokenizer, h.corpus)  # the eval part is never trained on
    ckpt_dir = None
    if h.checkpoint_every:
        ckpt_dir = os.path.abspath(h.checkpoint_dir or recipe.out_dir + ".heal-checkpoints")
    # Checkpoints resume only the run that wrote them: same model, stages, heal, seed.
    run_id = {"model": recipe.model, "seed": recipe.seed, "dtype": recipe.dtype,
              "stages": [dataclasses.asdict(st) for st in recipe.stages]}
    dtype = jnp.bfloat16 if h.compute_dtype == "bfloat16" else jnp.float32
    student = build_model(loaded.config, dtype, remat=h.remat)
    result = _timed(seconds, "heal", heal, student, params, teacher, tokens, h,
                    seed=recipe.seed, checkpoint_dir=ckpt_dir, run_id=run_id, progress=progress)
    files = _plot_losses(result.losses, tmp)
    first = result.losses[0][1] if result.losses else {}
    last = result.losses[-1][1] if result.losses else {}
    return result.params, {
        "steps": h.steps,
        "steps_run": result.steps_run,
        "resumed_from_step": result.resumed_from,
        "tokens_trained": result.tokens_trained,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "seconds": round(result.seconds, 1),
        "trainable_params": result.trainable_params,
        "loss_first": first.get("loss"),
        "loss_last": last.get("loss"),
        "qat": h.qat,
        "teacher": h.teacher or recipe.model,
        "checkpoint_dir": ckpt_dir,
        "files": files,
    }


def _plot_losses(losses: list, out_dir: str) -> list[str]:
    """``heal_losses.json`` and ``heal_loss.png`` (each loss term against the step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out_dir, "heal_losses.json"), "w") as f:
        json.dump([{"step": s, **m} for s, m in losses], f)
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [s for s, _ in losses]
    for key in ("loss", "kd", "ce", "hidden_mse"):
        values = [m[key] for _, m in losses]
        if any(values):
            ax.plot(steps, values, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title("healing")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "heal_loss.png"), dpi=100)
    plt.close(fig)
    return ["heal_losses.json", "heal_loss.png"]


def _stage_report(out_dir: str, stage: int, reports: dict, kind: str, value) -> None:
    """Keeps what a stage measured for the report; a sensitivity profile also goes to
    ``out_dir/sensitivity_stage<i>/`` (JSON + PNG)."""
    entry = reports.setdefault(f"stage{stage}", {})
    if kind == "profile":
        stage_dir = os.path.join(out_dir, f"sensitivity_stage{stage}")
        os.makedirs(stage_dir, exist_ok=True)
        files = value.save(stage_dir)
        entry["sensitivity"] = {
            "method": value.method, "metric": value.metric,
            "budget_params": value.budget, "removed_params": value.removed,
            "matrices_left_dense": sum(k is None for k in value.allocation.values()),
            "depth_trend": value.depth_trend(),
            "files": [os.path.relpath(f, out_dir) for f in files],
        }
    else:
        entry[kind] = value


def _replace_dir(src: str, dst: str) -> None:
    """Renames ``src`` to ``dst``, replacing an existing ``dst`` only once ``src`` is complete."""
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, dst)


def _refined_errors(report: dict) -> dict[str, list]:
    """Per stage, the ``[before, after]`` output errors of the matrices it refined."""
    out = {}
    for stage, entry in report.get("stages", {}).items():
        errs = [f["output_error"] for f in entry.get("fits", {}).values() if "output_error" in f]
        if errs:
            out[stage] = errs
    return out


def format_report(report: dict) -> str:
    """The report as a readable two-column table."""
    rows = [
        ("recipe", report["recipe"]),
        ("model", report["model"]),
        ("params before / after", f"{report['params_before']:,} / {report['params_after']:,}"),
        ("bytes before / after", f"{report['bytes_before']:,} / {report['bytes_after']:,}"),
        ("bits per param", f"{report['bits_per_param']:.3f}"),
        ("non-embedding cut", f"{report['non_embedding_reduction']:.1%} of params, "
                              f"{report['non_embedding_bytes_reduction']:.1%} of bytes"),
        ("perplexity before / after", f"{report['ppl_before']:.3f} / {report['ppl_after']:.3f}"),
        *([("perplexity after compress / heal", f"{report['ppl_after_compress']:.3f} / "
                                               f"{report['ppl_after_heal']:.3f}"),
           ("heal", f"{report['heal']['steps']} steps, {report['heal']['tokens_trained']:,} "
                    f"tokens, {report['heal']['tokens_per_s']:,.0f} tokens/s")]
          if report.get("heal") else []),
        *[(f"{stage}: output error", f"{sum(e[0] for e in errs) / len(errs):.3f} -> "
                                     f"{sum(e[1] for e in errs) / len(errs):.3f} (mean over "
                                     f"{len(errs)} refined matrices)")
          for stage, errs in _refined_errors(report).items()],
        ("eval", f"{report['eval_corpus']}: {report['eval_tokens']:,} predicted tokens in "
                 f"{report['eval_windows']} windows of {report['eval_seq_len']}"),
        ("eval throughput", f"{report['eval_tokens_per_s']:,.0f} tokens/s"),
    ]
    rows += [(f"seconds: {k}", f"{v:.2f}") for k, v in report["seconds"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def usage() -> str:
    """``compress.py --help``: the command form, the shipped recipes and the transforms."""
    import yaml

    from jaxcomp.core import list_transforms
    from jaxcomp.recipes import DEFAULT_RECIPE, RECIPES_DIR, available_recipes

    lines = ["usage: python scripts/compress.py [recipe=NAME|recipe=PATH.yaml] [key.sub=value ...]",
             "",
             "Compresses a model by a recipe's stages (then heals it when heal.steps > 0),",
             "evaluates perplexity before and after, and writes out_dir/report.json (README:",
             "'The compress CLI' lists every key).",
             f"No recipe runs {DEFAULT_RECIPE}. Errors print one line and exit with 2.",
             "", "recipes (recipes/NAME.yaml):"]
    names = available_recipes()
    width = max(map(len, names))
    for name in names:
        with open(os.path.join(RECIPES_DIR, name + ".yaml")) as f:
            description = (yaml.safe_load(f) or {}).get("description", "")
        lines.append(f"  {name:<{width}}  {description}")
    lines += ["", f"transforms (stages.N.transform): {', '.join(list_transforms())}",
              "example: python scripts/compress.py recipe=smollm2_gptq_w4g128 "
              "eval.max_tokens=8192 out_dir=out/gptq"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``compress.py recipe=NAME key.sub=value ...``; user errors exit with 2."""
    from jaxcomp.recipes import load_recipe, parse_overrides

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    try:
        from jaxcomp.parallel import initialize_distributed

        initialize_distributed()  # only when the environment asks for it (README: clusters)
        name, overrides = parse_overrides(argv)
        recipe = load_recipe(name, overrides)
        report = run(recipe, progress=sys.stderr.isatty())
    except JaxcompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote {os.path.abspath(recipe.out_dir)}/report.json")
    return 0
