#!/usr/bin/env python
"""Where the squares of each decoder block's output sit: the terms ``heal.hidden_mse_weight``
averages.

Usage: python scripts/bench/hidden_energy.py [--model smollm2-135m] [--batch 4] [--seq-len 256]

Runs the dense model on ``batch`` windows of the ``calib`` part of ``enwiki-sample`` (the heal
corpus) and prints, per block, the mean square of its output, the share of the squares in
its 3 largest channels, and the mean square of the median and of the largest token (on LLaMA
family models the largest is the first token, the attention sink).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    args = ap.parse_args()

    import jax.numpy as jnp

    from jaxcomp.data import calib_tokens
    from jaxcomp.models import build_model
    from jaxcomp.models.loading import load_model
    from jaxcomp.train.heal import forward

    loaded = load_model(args.model)
    tokens = calib_tokens(loaded.tokenizer, "enwiki-sample")
    w = args.seq_len
    x = jnp.asarray(tokens[:args.batch * w].reshape(args.batch, w).astype(np.int32))
    _, blocks = forward(build_model(loaded.config), loaded.params, x, hidden=True)
    print("| block | mean square | top-3 channel share | median token | largest token |")
    print("|---|---|---|---|---|")
    for i, h in enumerate(blocks):
        sq = np.square(np.asarray(h, np.float64))
        channels = np.sort(sq.mean(axis=(0, 1)))[::-1]
        per_token = sq.mean(axis=-1)
        print(f"| {i} | {sq.mean():,.1f} | {channels[:3].sum() / channels.sum():.2f} | "
              f"{np.median(per_token):,.1f} | {per_token.max():,.0f} |")


if __name__ == "__main__":
    main()
