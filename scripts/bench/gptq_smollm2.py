#!/usr/bin/env python
"""Wall time and peak RSS of block-sequential GPTQ on SmolLM2-135M (no evaluation).

Usage: python scripts/bench/gptq_smollm2.py [--samples 128] [--seq-len 512] [--bits 4]
       [--group-size 128] [--no-attention-values] [--eval-tokens 16384]

Loads the embedded SmolLM2-135M, draws ``--samples`` x ``--seq-len`` calibration tokens from the
``calib`` part of enwiki-sample (as a recipe run does) and runs the registered ``gptq``
transform. Prints JSON: seconds for the GPTQ pass, seconds per block, the peak RSS of the
whole process (``ru_maxrss``: load + calibration + GPTQ) and the GPTQ report's mean proxy error;
with ``--eval-tokens`` then also the quantized model's perplexity on that many eval tokens (after
the peak RSS is read: evaluation has its own footprint). The issue's target (128 x 512, W4 g128):
under 5 minutes and under 3 GiB.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

from gptq_stream import timed_blocks  # noqa: E402
from tt_stream import peak_rss_gib  # noqa: E402

from jaxcomp.calib import Calibration  # noqa: E402
from jaxcomp.core import get_transform  # noqa: E402
from jaxcomp.data import calib_tokens, eval_tokens, eval_windows, sample_calibration  # noqa: E402
from jaxcomp.eval import perplexity  # noqa: E402
from jaxcomp.models import build_model  # noqa: E402
from jaxcomp.models.loading import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--attention-values", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--eval-tokens", type=int, default=0, help="0: no evaluation")
    args = ap.parse_args()
    start = time.perf_counter()
    loaded = load_model("smollm2-135m")
    model = build_model(loaded.config)
    windows = sample_calibration(calib_tokens(loaded.tokenizer, "enwiki-sample"), args.samples,
                                 args.seq_len)
    setup_s = time.perf_counter() - start
    reports = []
    gptq = get_transform("gptq")(bits=args.bits, group_size=args.group_size,
                                 attention_values=args.attention_values,
                                 report_sink=lambda kind, value: reports.append(value))
    params, seconds, per_block = timed_blocks(
        loaded.params, Calibration(model, windows, args.batch_size), gptq.block_steps)
    result = {
        "calib_tokens": int(windows.size), "bits": args.bits, "group_size": args.group_size,
        "attention_values": args.attention_values, "setup_s": round(setup_s, 1),
        "gptq_s": round(seconds, 1), "seconds_per_block": per_block,
        "mean_proxy_error": reports[-1]["mean_proxy_error"],
        "peak_rss_gib": round(peak_rss_gib(), 2)}
    if args.eval_tokens:
        tokens = eval_windows(eval_tokens(loaded.tokenizer, "enwiki-sample"), args.seq_len,
                              args.eval_tokens)
        result["perplexity"] = round(perplexity(model, params, tokens).ppl, 3)
        result["eval_tokens"] = int(tokens.size)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
