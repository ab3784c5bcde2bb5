"""The pipeline ``scripts/compress.py`` runs: load, evaluate, compress, evaluate, write."""

from __future__ import annotations

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
    from jaxcomp.core import get_transform, tree_size
    from jaxcomp.eval import perplexity
    from jaxcomp.models import build_model
    from jaxcomp.models.loading import load_model
    from jaxcomp.tensornet import non_embedding_params

    out_dir = os.path.abspath(recipe.out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        loaded = _timed(seconds, "load", load_model, recipe.model)
        dtype = jnp.bfloat16 if recipe.dtype == "bfloat16" else jnp.float32
        model = build_model(loaded.config, dtype=dtype)
        windows = _eval_windows(recipe, loaded.tokenizer)
        params = loaded.params
        params_before, bytes_before = tree_size(params)
        non_embedding_before = non_embedding_params(params)
        notes: list[str] = []
        before = _timed(seconds, "eval_before", perplexity, model, params, windows,
                        recipe.eval.batch_size, progress, "eval (before)")
        stage_reports: dict[str, dict] = {}
        for i, stage in enumerate(recipe.stages):
            factory = get_transform(stage.transform)
            extra = {}
            if "report_sink" in inspect.signature(factory).parameters:
                extra["report_sink"] = functools.partial(_stage_report, tmp, i, stage_reports)
            try:
                transform = factory(**stage.args, rules=stage.rules, **extra)
            except TypeError as e:  # an argument the transform does not take
                raise JaxcompError(f"stages.{i} ({stage.transform}): {e}") from None
            args = ()
            if getattr(transform, "needs_calibration", False):
                # Statistics of the current (already compressed upstream) params.
                from jaxcomp.calib import collect_input_stats

                calib = _calibration_windows(recipe, loaded.tokenizer)
                args = (_timed(seconds, f"stage{i}:calibration", collect_input_stats, model,
                               params, calib, recipe.eval.batch_size, progress),)
            with warnings.catch_warnings(record=True) as caught:  # e.g. a rule matching nothing
                warnings.simplefilter("always")
                params = _timed(seconds, f"stage{i}:{stage.transform}", transform, params, *args)
            for w in caught:
                notes.append(f"stages.{i} ({stage.transform}): {w.message}")
                print(f"warning: {notes[-1]}", file=sys.stderr)
        params_after, bytes_after = tree_size(params)
        if recipe.stages:
            after = _timed(seconds, "eval_after", perplexity, model, params, windows,
                           recipe.eval.batch_size, progress, "eval (after)")
        else:
            after = before  # nothing changed: the same numbers, not a second run
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
            "non_embedding_params_after": non_embedding_params(params),
            "non_embedding_reduction": round(1 - non_embedding_params(params)
                                             / non_embedding_before, 4),
            "ppl_before": before.ppl,
            "ppl_after": after.ppl,
            "eval_corpus": recipe.eval.corpus,
            "eval_seq_len": recipe.eval.seq_len,
            "eval_windows": before.windows,
            "eval_tokens": before.tokens,
            "eval_tokens_per_s": round(before.tokens_per_s, 1),
            "seconds": seconds,
            "warnings": notes,
            "stages": stage_reports,
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
        _replace_dir(tmp, out_dir)
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


def format_report(report: dict) -> str:
    """The report as a readable two-column table."""
    rows = [
        ("recipe", report["recipe"]),
        ("model", report["model"]),
        ("params before / after", f"{report['params_before']:,} / {report['params_after']:,}"),
        ("bytes before / after", f"{report['bytes_before']:,} / {report['bytes_after']:,}"),
        ("bits per param", f"{report['bits_per_param']:.3f}"),
        ("non-embedding params cut", f"{report['non_embedding_reduction']:.1%}"),
        ("perplexity before / after", f"{report['ppl_before']:.3f} / {report['ppl_after']:.3f}"),
        ("eval", f"{report['eval_corpus']}: {report['eval_tokens']:,} predicted tokens in "
                 f"{report['eval_windows']} windows of {report['eval_seq_len']}"),
        ("eval throughput", f"{report['eval_tokens_per_s']:,.0f} tokens/s"),
    ]
    rows += [(f"seconds: {k}", f"{v:.2f}") for k, v in report["seconds"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: ``compress.py recipe=NAME key.sub=value ...``; user errors exit with 2."""
    from jaxcomp.recipes import load_recipe, parse_overrides

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ or "", "\nusage: compress.py [recipe=NAME] [key.sub=value ...]")
        return 0
    try:
        name, overrides = parse_overrides(argv)
        recipe = load_recipe(name, overrides)
        report = run(recipe, progress=sys.stderr.isatty())
    except JaxcompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"wrote {os.path.abspath(recipe.out_dir)}/report.json")
    return 0
