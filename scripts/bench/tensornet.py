#!/usr/bin/env python
"""Perplexity against parameter reduction for the factorization methods, at equal counts.

Usage: python scripts/bench/tensornet.py [--reductions 0.1 0.2 0.35 0.5 0.7]
       [--methods tt kron kron_perm svd asvd] [--max-tokens 8192] [--calib-samples 32]
       [--targets '^layers_\\d+/.*kernel$'] [--out bench_out/tensornet]

Every method removes the same fraction of SmolLM2's non-embedding parameters from the same
matrices (``target_reduction``), before any healing: with uniform allocation (one parameter
ratio for every matrix), or with per-matrix sizes from the sensitivity profile: output error
for the ``*_alloc`` variants, the Fisher-weighted error for ``*_fisher``. Evaluates on the
enwiki-sample eval part (seq_len 512, the first --max-tokens tokens). Writes results.csv and
ppl_vs_reduction.png into --out and prints a Markdown table.
"""

import argparse
import csv
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jaxcomp.calib import Calibration, collect_input_stats  # noqa: E402
from jaxcomp.core import get_transform  # noqa: E402
from jaxcomp.data import calib_tokens, eval_tokens, eval_windows, sample_calibration  # noqa: E402
from jaxcomp.eval import perplexity  # noqa: E402
from jaxcomp.models import build_model  # noqa: E402
from jaxcomp.models.loading import load_model  # noqa: E402
from jaxcomp.tensornet import non_embedding_params  # noqa: E402

# name -> (transform, extra args)
VARIANTS = {
    "tt": ("tt", {"num_cores": 3}),
    "tt2": ("tt", {"num_cores": 2}),
    # TT-SVD, then 50 L-BFGS steps on each matrix's calibration output error
    "tt_refine": ("tt", {"num_cores": 3, "refine_steps": 50}),
    "kron": ("kron", {}),
    "kron_perm": ("kron", {"permute_iters": 2}),
    "svd": ("svd", {}),
    "asvd": ("asvd", {}),
    # per-matrix sizes from the output-error sensitivity profile (some matrices stay dense)
    "tt_alloc": ("tt", {"num_cores": 3, "allocation": "output_error"}),
    "svd_alloc": ("svd", {"allocation": "output_error"}),
    "asvd_alloc": ("asvd", {"allocation": "output_error"}),
    # per-matrix sizes from the Fisher-weighted error (estimated loss increase)
    "tt_fisher": ("tt", {"num_cores": 3, "allocation": "fisher"}),
    "svd_fisher": ("svd", {"allocation": "fisher"}),
    "asvd_fisher": ("asvd", {"allocation": "fisher"}),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.1, 0.2, 0.35, 0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=["tt", "kron", "kron_perm", "svd", "asvd"],
                    choices=sorted(VARIANTS))
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--targets", default=r"^layers_\d+/.*kernel$")
    ap.add_argument("--out", default="bench_out/tensornet")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    loaded = load_model(args.model)
    model = build_model(loaded.config)
    windows = eval_windows(eval_tokens(loaded.tokenizer, "enwiki-sample"), 512, args.max_tokens)
    dense = perplexity(model, loaded.params, windows, progress=False)
    base = non_embedding_params(loaded.params)
    print(json.dumps({"method": "dense", "ppl": dense.ppl, "non_embedding_params": base}))
    calib = stats = None  # made once, when the first variant needs them
    rows = []
    for reduction in args.reductions:
        for name in args.methods:
            transform_name, extra = VARIANTS[name]
            transform = get_transform(transform_name)(target_reduction=reduction,
                                                      targets=[args.targets], progress=False,
                                                      **extra)
            needs = transform.needs_calibration
            if needs and calib is None:
                calib = sample_calibration(calib_tokens(loaded.tokenizer, "enwiki-sample"),
                                           args.calib_samples, 512)
            if needs is True and stats is None:
                stats = collect_input_stats(model, loaded.params, calib, progress=False)
            start = time.perf_counter()
            if needs == "blocks":  # tt refinement, Fisher: the transform runs the model
                params = transform(loaded.params, Calibration(model, calib, progress=False))
            else:
                params = transform(loaded.params, stats) if needs else transform(loaded.params)
            seconds = time.perf_counter() - start
            result = perplexity(model, params, windows, progress=False)
            row = {"method": name, "target_reduction": reduction,
                   "actual_reduction": round(1 - non_embedding_params(params) / base, 4),
                   "ppl": round(result.ppl, 3), "factorize_s": round(seconds, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, dense.ppl, os.path.join(args.out, "ppl_vs_reduction.png"))
    print(f"\ndense ppl {dense.ppl:.3f} ({len(windows)} windows of 512)\n")
    print("| method | " + " | ".join(f"-{r:.0%}" for r in args.reductions) + " |")
    print("|---|" + "---|" * len(args.reductions))
    for name in args.methods:
        cells = [next(r["ppl"] for r in rows if r["method"] == name
                      and r["target_reduction"] == red) for red in args.reductions]
        print(f"| {name} | " + " | ".join(f"{c:,.1f}" for c in cells) + " |")


def plot(rows, dense_ppl, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["actual_reduction"], r["ppl"]) for r in rows if r["method"] == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.axhline(dense_ppl, color="gray", ls="--", label=f"dense {dense_ppl:.1f}")
    ax.set(xlabel="fraction of non-embedding parameters removed", ylabel="perplexity",
           yscale="log", title="SmolLM2-135M, before healing (enwiki-sample eval)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
