#!/usr/bin/env python
"""Train-step time: QAT vs plain fine-tuning vs distillation of a factorized model, SmolLM2.

Usage: python scripts/bench/heal_step.py [--steps 6] [--batch 4] [--seq-len 256]
       [--bits 4] [--group-size 128] [--no-remat] [--variants finetune qat qat_lsq tt35]

Three heal runs on the same batches (KD loss toward the original model in every case, so the
teacher forward is part of each step), timing each step after the first (compilation):

* ``finetune``: every decoder kernel a plain trainable float matrix (ordinary fine-tuning);
* ``qat``: the same kernels int-quantized, trained as fake-quantized master weights (STE);
* ``qat_lsq``: the same with learned step sizes;
* ``tt35``: TT factorization at -35% non-embedding parameters (uniform), cores trained.

Prints a Markdown table: median step seconds, tokens/s, and the ratio to ``finetune``; and the
process's peak RSS.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402

KERNELS = r"^layers_\d+/.*kernel$"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-remat", action="store_true", help="store block activations")
    ap.add_argument("--variants", nargs="+", default=["finetune", "qat", "qat_lsq", "tt35"])
    args = ap.parse_args()

    import jax

    from jaxcomp.core import get_transform
    from jaxcomp.data import calib_tokens
    from jaxcomp.models import build_model
    from jaxcomp.models.loading import load_model
    from jaxcomp.train import HealConfig, heal

    loaded = load_model("smollm2-135m")
    model = build_model(loaded.config, remat=not args.no_remat)
    tokens = calib_tokens(loaded.tokenizer, "enwiki-sample")
    base = dict(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=1e-5,
                warmup_steps=1)
    quantized = get_transform("quantize")(bits=args.bits, group_size=args.group_size,
                                          progress=False)
    variants = {
        "finetune": (lambda: loaded.params, HealConfig(**base, targets=[KERNELS])),
        "qat": (lambda: quantized(loaded.params), HealConfig(**base)),
        "qat_lsq": (lambda: quantized(loaded.params), HealConfig(**base, lsq=True)),
        "tt35": (lambda: get_transform("tt")(target_reduction=0.35, progress=False)(
            loaded.params), HealConfig(**base)),
    }
    rows = []
    print(f"device: {jax.devices()[0].platform}, batch {args.batch} x {args.seq_len}, "
          f"{args.steps} steps (first excluded)", flush=True)
    for name in args.variants:
        make, cfg = variants[name]
        params = make()
        stamps = []
        result = heal(model, params, loaded.params, tokens, cfg,
                      on_step=lambda step, m, stamps=stamps: stamps.append(time.perf_counter()))
        step_s = float(np.median(np.diff(stamps)))
        rows.append((name, step_s, result.trainable_params))
        print(f"{name}: {step_s:.2f} s/step", flush=True)
    ref = dict((n, s) for n, s, _ in rows).get("finetune")
    tokens_per_step = args.batch * args.seq_len
    print("\n| variant | trainable params | s/step | tokens/s | vs finetune |")
    print("|---|---|---|---|---|")
    for name, s, n in rows:
        ratio = f"{s / ref:.2f}x" if ref else "-"
        print(f"| {name} | {n:,} | {s:.2f} | {tokens_per_step / s:,.0f} | {ratio} |")
    import resource

    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
