#!/usr/bin/env python
"""k-bit scaling study: perplexity against bits per parameter, over bits x data type x block size.

Usage:
  python scripts/kbit_sweep.py [--model smollm2-135m] [--methods rtn,gptq] [--bits 2-8]
      [--dtypes int,float,nf] [--blocks 32,64,128,256,channel] [--eval-tokens 16384]
      [--seq-len 512] [--calib-samples 32] [--calib-seq-len 512] [--corpus enwiki-sample]
      [--batch-size 8] [--seed 0] [--out scripts/bench/results/kbit_sweep] [--resume]
  python scripts/kbit_sweep.py --plot-only [--out DIR]

Every linear kernel inside the decoder blocks is quantized (embeddings and the tied LM head stay
float), by round-to-nearest (``rtn``) or GPTQ (``gptq``, block-sequential, ``--calib-samples``
windows of ``--calib-seq-len`` tokens from the corpus's calib part) into one data type:

* ``int``: asymmetric integer (scale + uint8 zero point per block);
* ``float``: the k-bit minifloat of :func:`jaxcomp.quant.formats.float_format` (sign, exponent,
  mantissa, no inf/NaN; Dettmers & Zettlemoyer's exponent bits) times a block absmax scale;
* ``nf``: the k-bit NormalFloat (quantile) codebook times a block absmax scale;

with a block (group) of 32/64/128/256 input rows or one scale per output channel. Scales are
bfloat16. Each configuration's row goes to ``OUT/results.csv`` as soon as it finishes:
perplexity on the corpus's eval part (``--eval-tokens`` tokens in windows of ``--seq-len``),
``quant_bits_per_weight`` (8 x bytes of the QArray leaves -- codes, scales, zero points -- over
the number of weights they replace), ``model_bits_per_param`` (8 x bytes of the whole model as
stored, float embeddings included, over its original parameter count), and wall times.
Configurations whose perplexity is inf/NaN are rows with status ``diverged``; one a quantizer
refuses (e.g. a Hessian that stays indefinite) a row with status ``error``. ``--resume`` skips
configurations already in the CSV, so a long sweep can be continued after an interruption.

At the end (or with ``--plot-only``) it writes ``OUT/kbit_sweep.png`` (perplexity, log scale,
against quant_bits_per_weight, cut at 10x the float baseline with the number above it in the
title; one colour per data type, one marker per method; the Pareto front as a step line) and
``OUT/summary.json`` (the Pareto-optimal configurations and, per 1-bit budget bin, the best
one). ``OUT/sweep.json`` holds the settings and the dense baseline.

Bad arguments print one line on stderr and exit 2 before anything is written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcomp.errors import JaxcompError  # noqa: E402
from jaxcomp.quant.formats import Format, float_format, int_format, nf  # noqa: E402

METHODS = ("rtn", "gptq")
DTYPES = ("int", "float", "nf")
BITS = tuple(range(2, 9))
BLOCKS = (32, 64, 128, 256, "channel")
DEFAULT_OUT = os.path.join("scripts", "bench", "results", "kbit_sweep")
CSV_NAME, META_NAME, PLOT_NAME, SUMMARY_NAME = ("results.csv", "sweep.json", "kbit_sweep.png",
                                                "summary.json")
COLUMNS = ("method", "dtype", "bits", "block", "format", "status", "ppl",
           "quant_bits_per_weight", "model_bits_per_param", "quant_weights", "quant_bytes",
           "model_params", "model_bytes", "quantize_s", "eval_s", "wall_s", "note")
# Settings a resumed sweep must share with the rows already written.
META_KEYS = ("model", "corpus", "eval_tokens", "seq_len", "calib_samples", "calib_seq_len",
             "seed", "batch_size")
SCALE_DTYPE = "bfloat16"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One point of the grid.

    Attributes:
      method: ``"rtn"`` or ``"gptq"``.
      dtype: ``"int"`` (asymmetric), ``"float"`` (k-bit minifloat) or ``"nf"`` (NormalFloat).
      bits: code width, 2..8.
      block: rows per scale block (int) or ``"channel"`` (one scale per output column).
    """

    method: str
    dtype: str
    bits: int
    block: int | str

    @property
    def key(self) -> tuple[str, str, int, str]:
        """Identity of the configuration in the CSV."""
        return (self.method, self.dtype, self.bits, str(self.block))

    @property
    def label(self) -> str:
        """``"gptq/int4/g128"``-style short name."""
        block = "channel" if self.block == "channel" else f"g{self.block}"
        return f"{self.method}/{self.dtype}{self.bits}/{block}"

    def format(self) -> Format:
        """The quantization format of this configuration (bfloat16 scales).

        Example:
          >>> SweepConfig("rtn", "float", 5, 64).format().name
          'fp5e2-g64'
        """
        if self.dtype == "int":
            return int_format(self.bits, self.block, symmetric=False, scale_dtype=SCALE_DTYPE)
        if self.dtype == "float":
            return float_format(self.bits, None, self.block, SCALE_DTYPE)
        if self.dtype == "nf":
            return nf(self.bits, self.block, SCALE_DTYPE)
        raise JaxcompError(f"unknown data type {self.dtype!r} (choose from {', '.join(DTYPES)})")


def make_grid(methods: Iterable[str], bits: Iterable[int], dtypes: Iterable[str],
              blocks: Iterable[int | str]) -> list[SweepConfig]:
    """All configurations, methods outermost (the fast RTN rows come first), blocks innermost.

    Example:
      >>> [c.label for c in make_grid(["rtn"], [4], ["int"], [64, "channel"])]
      ['rtn/int4/g64', 'rtn/int4/channel']
    """
    return [SweepConfig(m, d, b, blk) for m in methods for d in dtypes for b in bits
            for blk in blocks]


# --- argument parsing -------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (main), instead of usage + message
        raise JaxcompError(message)


def _choices(text: str, valid: Sequence[str], what: str) -> list[str]:
    out = []
    for item in _split(text, what):
        if item not in valid:
            close = difflib.get_close_matches(item, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise JaxcompError(f"unknown {what} {item!r}{hint} (choose from {', '.join(valid)})")
        out.append(item)
    return out


def _split(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise JaxcompError(f"--{what}s: expected a comma-separated list, got {text!r}")
    if len(set(items)) != len(items):
        raise JaxcompError(f"--{what}s: repeated entries in {text!r}")
    return items


def parse_bits(text: str) -> list[int]:
    """``"2-8"`` or ``"3,4,8"`` (ranges allowed inside the list) -> sorted bit widths in 2..8.

    Example:
      >>> parse_bits("2-4,8")
      [2, 3, 4, 8]
    """
    out: list[int] = []
    for item in _split(text, "bit"):
        lo, sep, hi = item.partition("-")
        try:
            span = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError:
            raise JaxcompError(f"--bits: {item!r} is not an integer or range like 2-8") from None
        if sep and not span:
            raise JaxcompError(f"--bits: empty range {item!r}")
        for b in span:
            if not BITS[0] <= b <= BITS[-1]:
                raise JaxcompError(f"--bits: {b} is out of range (2..8)")
            out.append(b)
    if len(set(out)) != len(out):
        raise JaxcompError(f"--bits: repeated widths in {text!r}")
    return sorted(out)


def parse_blocks(text: str) -> list[int | str]:
    """``"32,64,channel"`` -> ``[32, 64, "channel"]``; ``per-channel`` is accepted too."""
    out: list[int | str] = []
    for item in _split(text, "block"):
        if item in ("channel", "per-channel"):
            out.append("channel")
            continue
        try:
            size = int(item)
        except ValueError:
            raise JaxcompError(f"--blocks: {item!r} is neither a block size nor 'channel'"
                               ) from None
        if size < 1:
            raise JaxcompError(f"--blocks: block size must be >= 1, got {size}")
        out.append(size)
    if len(set(out)) != len(out):
        raise JaxcompError(f"--blocks: repeated entries in {text!r}")
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="kbit_sweep.py", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="built-in name, HF dir or GGUF")
    ap.add_argument("--methods", default="rtn,gptq", help="rtn, gptq")
    ap.add_argument("--bits", default="2-8", help="e.g. 2-8 or 3,4,8")
    ap.add_argument("--dtypes", default="int,float,nf", help="int (asymmetric), float, nf")
    ap.add_argument("--blocks", default="32,64,128,256,channel",
                    help="block sizes and/or 'channel'")
    ap.add_argument("--corpus", default="enwiki-sample", help="eval/calib corpus")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512, help="eval window length")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    ap.add_argument("--resume", action="store_true",
                    help="continue the CSV in --out, skipping configurations already there")
    ap.add_argument("--plot-only", action="store_true",
                    help="only redraw the plot and summary from --out's CSV")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                    help="progress bar (default: when stderr is a terminal)")
    return ap


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and validates the command line; raises :class:`JaxcompError` on bad input."""
    args = build_parser().parse_args(argv)
    args.methods = _choices(args.methods, METHODS, "method")
    args.dtypes = _choices(args.dtypes, DTYPES, "dtype")
    args.bits = parse_bits(args.bits)
    args.blocks = parse_blocks(args.blocks)
    for name, low in (("eval_tokens", 2), ("seq_len", 2), ("calib_samples", 1),
                      ("calib_seq_len", 2), ("batch_size", 1)):
        if getattr(args, name) < low:
            raise JaxcompError(f"--{name.replace('_', '-')} must be >= {low}, "
                               f"got {getattr(args, name)}")
    if args.eval_tokens < args.seq_len:
        raise JaxcompError(f"--eval-tokens ({args.eval_tokens}) is shorter than one window "
                           f"(--seq-len {args.seq_len})")
    if args.plot_only and args.resume:
        raise JaxcompError("--plot-only and --resume exclude each other")
    return args


# --- running configurations ---------------------------------------------------------------------

def quantized_size(params) -> tuple[int, int]:
    """``(weights, bytes)``: weights replaced by ``QArray`` leaves, and the bytes those leaves
    store (packed codes, scales, zero points)."""
    from jaxcomp.core.rules import is_leaf
    from jaxcomp.quant import QArray

    leaves = [x for x in jax.tree_util.tree_leaves(params, is_leaf=is_leaf)
              if isinstance(x, QArray)]
    return sum(int(np.prod(q.shape)) for q in leaves), sum(q.nbytes for q in leaves)


def quantize_params(config: SweepConfig, model, params, calib_windows, batch_size: int):
    """Params with every decoder-block kernel quantized as ``config`` says."""
    from jaxcomp.quant.transform import quantize

    fmt = config.format()
    if config.method == "rtn":
        return quantize(fmt, progress=False)(params)
    if config.method == "gptq":
        from jaxcomp.calib import Calibration
        from jaxcomp.quant.gptq_transform import gptq

        if calib_windows is None:
            raise JaxcompError("GPTQ configurations need calibration windows")
        return gptq(fmt)(params, Calibration(model, calib_windows, batch_size, progress=False))
    raise JaxcompError(f"unknown method {config.method!r} (choose from {', '.join(METHODS)})")


def run_config(config: SweepConfig, model, params, eval_windows, calib_windows=None,
               batch_size: int = 8) -> dict:
    """Quantizes, measures and evaluates one configuration; returns its CSV row.

    A perplexity that is inf or NaN gives status ``"diverged"``; a :class:`JaxcompError` from
    the quantizer (e.g. GPTQ refusing an indefinite Hessian) status ``"error"`` with the message
    in ``note``. Other exceptions are bugs and propagate.
    """
    from jaxcomp.core import tree_size
    from jaxcomp.eval import perplexity

    row = dict.fromkeys(COLUMNS, "")
    row.update(method=config.method, dtype=config.dtype, bits=config.bits,
               block=str(config.block), format=config.format().name)
    model_params = tree_size(params)[0]
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qparams = jax.block_until_ready(
                quantize_params(config, model, params, calib_windows, batch_size))
    except JaxcompError as e:
        row.update(status="error", note=str(e), wall_s=round(time.perf_counter() - start, 3))
        return row
    quantize_s = time.perf_counter() - start
    weights, qbytes = quantized_size(qparams)
    if weights == 0:
        raise JaxcompError(f"{config.label}: no kernel was quantized (no decoder-block kernels "
                           "in this model?)")
    _, model_bytes = tree_size(qparams)
    eval_start = time.perf_counter()
    try:
        ppl = perplexity(model, qparams, eval_windows, batch_size, progress=False).ppl
    except OverflowError:  # exp(mean NLL) past the float range
        ppl = math.inf
    end = time.perf_counter()
    notes = sorted({str(w.message) for w in caught})
    row.update(status="ok" if math.isfinite(ppl) else "diverged", ppl=ppl,
               quant_bits_per_weight=8 * qbytes / weights,
               model_bits_per_param=8 * model_bytes / model_params, quant_weights=weights,
               quant_bytes=qbytes, model_params=model_params, model_bytes=model_bytes,
               quantize_s=round(quantize_s, 3), eval_s=round(end - eval_start, 3),
               wall_s=round(end - start, 3), note=" | ".join(notes)[:500])
    return row


def read_rows(csv_path: str) -> list[dict]:
    """Rows of a sweep CSV with numbers parsed; a later row of the same configuration wins."""
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise JaxcompError(f"{csv_path}: columns {reader.fieldnames} are not this sweep's "
                               f"({', '.join(COLUMNS)})")
        rows = {}
        for i, raw in enumerate(reader, start=2):
            if None in raw or any(raw[c] is None for c in COLUMNS):
                raise JaxcompError(f"{csv_path}:{i}: malformed row")
            row = dict(raw)
            row["bits"] = int(row["bits"])
            for c in ("ppl", "quant_bits_per_weight", "model_bits_per_param", "quantize_s",
                      "eval_s", "wall_s"):
                row[c] = float(row[c]) if row[c] != "" else math.nan
            for c in ("quant_weights", "quant_bytes", "model_params", "model_bytes"):
                row[c] = int(row[c]) if row[c] != "" else 0
            rows[(row["method"], row["dtype"], row["bits"], row["block"])] = row
    return list(rows.values())


def _drop_partial_line(csv_path: str) -> None:
    """A run killed while writing leaves a last line without a newline: drop it."""
    with open(csv_path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            f.truncate(cut)
            print(f"warning: {csv_path}: dropped an incomplete last row", file=sys.stderr)


def run_sweep(model, params, eval_windows, calib_windows, configs: Sequence[SweepConfig],
              csv_path: str, *, batch_size: int = 8, resume: bool = False,
              progress: bool = False, on_row: Callable[[dict], None] | None = None
              ) -> list[dict]:
    """Runs the configurations not yet in ``csv_path``, appending one row per configuration.

    Args:
      model: a Flax module from :func:`jaxcomp.models.build_model`.
      params: its float params (never modified).
      eval_windows: ``(n, seq_len)`` eval tokens.
      calib_windows: ``(num_samples, seq_len)`` calibration tokens (GPTQ only; may be ``None``
        when no configuration is GPTQ).
      configs: the grid (:func:`make_grid`).
      csv_path: the results CSV; each row is appended (and flushed) as soon as it is measured.
      batch_size: windows per forward pass.
      resume: continue an existing CSV, skipping configurations already in it; without it an
        existing CSV is an error (a finished sweep is never overwritten by accident).
      progress: progress bar over configurations.
      on_row: called with each new row (the CLI prints it).

    Returns:
      The rows measured by this call (skipped configurations excluded).

    Example:
      >>> rows = run_sweep(model, params, ev, cal, make_grid(["rtn"], [4], ["int"], [128]),
      ...                  "out/results.csv")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if any(c.method == "gptq" for c in configs) and calib_windows is None:
        raise JaxcompError("GPTQ configurations need calibration windows")
    for c in configs:
        c.format()  # a bad configuration fails before anything runs
    exists = os.path.exists(csv_path) and os.path.getsize(csv_path) > 0
    done: set = set()
    if exists:
        if not resume:
            raise JaxcompError(f"{csv_path} exists; pass --resume to continue it or choose "
                               "another --out")
        _drop_partial_line(csv_path)
        done = {(r["method"], r["dtype"], r["bits"], r["block"]) for r in read_rows(csv_path)}
    todo = [c for c in configs if c.key not in done]
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    new_rows = []
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        if not exists:
            writer.writeheader()
            f.flush()
        bar = tqdm(todo, desc="configs", unit="cfg", disable=not progress)
        for config in bar:
            bar.set_postfix_str(config.label)
            row = run_config(config, model, params, eval_windows, calib_windows, batch_size)
            writer.writerow(row)
            f.flush()
            os.fsync(f.fileno())
            new_rows.append(row)
            if on_row is not None:
                on_row(row)
        bar.close()
    return new_rows


# --- Pareto front, summary, plot ----------------------------------------------------------------

def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points with the lowest perplexity at or below their bit budget.

    ``points`` are ``(bits, ppl)``. A point is on the front when every point with at most as
    many bits has a strictly higher perplexity (of points with equal bits and perplexity, the
    first). Points with a non-finite value are never on the front. The result is in
    increasing bits (and decreasing perplexity).

    Example:
      >>> pareto_front([(4.0, 10.0), (3.0, 12.0), (4.5, 11.0), (3.0, 11.5), (2.0, float("nan"))])
      [3, 0]
    """
    order = sorted((i for i, (x, y) in enumerate(points)
                    if math.isfinite(x) and math.isfinite(y)),
                   key=lambda i: (points[i][0], points[i][1], i))
    front, best = [], math.inf
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _brief(row: dict) -> dict:
    return {"config": SweepConfig(row["method"], row["dtype"], row["bits"], row["block"]).label,
            "method": row["method"], "dtype": row["dtype"], "bits": row["bits"],
            "block": row["block"], "format": row["format"], "ppl": row["ppl"],
            "quant_bits_per_weight": round(row["quant_bits_per_weight"], 4),
            "model_bits_per_param": round(row["model_bits_per_param"], 4)}


def summarize(rows: Sequence[dict], meta: dict | None = None, bin_width: float = 1.0) -> dict:
    """The Pareto-optimal configurations and the best one per bits-per-weight bin.

    The x axis is ``quant_bits_per_weight``; whole-model bits per parameter is an increasing
    affine function of it for one model (the float part is fixed), so the front is the same
    on either axis.

    Args:
      rows: sweep rows (:func:`read_rows`).
      meta: sweep settings and dense baseline (``sweep.json``), copied into the summary.
      bin_width: width of the budget bins, in bits per weight.

    Returns:
      A JSON-ready dict.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    front = [ok[i] for i in pareto_front([(r["quant_bits_per_weight"], r["ppl"]) for r in ok])]
    bins: dict[int, list[dict]] = {}
    for r in ok:
        bins.setdefault(math.floor(r["quant_bits_per_weight"] / bin_width), []).append(r)
    return {
        "settings": meta or {},
        "x": "quant_bits_per_weight",
        "configs": len(rows),
        "ok": len(ok),
        "diverged": sorted(_brief(r)["config"] for r in rows if r["status"] == "diverged"),
        "errors": {_brief(r)["config"]: r["note"] for r in rows if r["status"] == "error"},
        "pareto": [_brief(r) for r in front],
        "best_per_bin": [{"quant_bits_per_weight": [k * bin_width, (k + 1) * bin_width],
                          "configs": len(v),
                          "best": _brief(min(v, key=lambda r: r["ppl"]))}
                         for k, v in sorted(bins.items())],
    }


def plot(rows: Sequence[dict], path: str, meta: dict | None = None) -> None:
    """Writes the perplexity-vs-bits PNG (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = meta or {}
    ok = [r for r in rows if r["status"] == "ok"]
    colors = {"int": "tab:blue", "float": "tab:orange", "nf": "tab:green"}
    markers = {"rtn": "o", "gptq": "^"}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    # 2-bit results reach 1e10 and would squash the useful range: the y-axis stops at 10x the
    # float baseline and the title counts what is above it.
    ceiling = 10 * meta["baseline_ppl"] if meta.get("baseline_ppl") else math.inf
    for method in METHODS:
        for dtype in DTYPES:
            pts = [r for r in ok if r["method"] == method and r["dtype"] == dtype]
            if pts:
                ax.scatter([r["quant_bits_per_weight"] for r in pts], [r["ppl"] for r in pts],
                           c=colors[dtype], marker=markers[method], s=28, alpha=0.75,
                           label=f"{method} {dtype}")
    front = [ok[i] for i in pareto_front([(r["quant_bits_per_weight"], r["ppl"]) for r in ok])]
    if front:
        xs = [r["quant_bits_per_weight"] for r in front]
        ys = [r["ppl"] for r in front]
        right = max(r["quant_bits_per_weight"] for r in ok)
        ax.plot([*xs, right], [*ys, ys[-1]], drawstyle="steps-post", color="black", lw=1.2,
                label="Pareto front")
        for r in front:
            if r["ppl"] > ceiling:
                continue
            ax.annotate(_brief(r)["config"], (r["quant_bits_per_weight"], r["ppl"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    if meta.get("baseline_ppl"):
        ax.axhline(meta["baseline_ppl"], color="gray", ls="--", lw=1,
                   label=f"float baseline ({meta['baseline_ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the quantized matrices (codes + scales + zero points)")
    ax.set_ylabel("perplexity (log scale)")
    bad = len(rows) - len(ok)
    title = f"k-bit sweep: {meta.get('model', '')}, {meta.get('corpus', '')} eval"
    if meta.get("eval_tokens"):
        title += f" ({meta['eval_tokens']:,} tokens)"
    if bad:
        title += f"; {bad} diverged/failed not shown"
    above = sum(r["ppl"] > ceiling for r in ok)
    if above:
        title += f"; {above} above {ceiling:.0f} (off the top)"
        ax.set_ylim(0.9 * meta["baseline_ppl"], ceiling)
    ax.set_title(title, fontsize=10)
    if ok:  # whole-model bits/param is affine in bits/weight for one model: a second axis
        r = ok[0]
        slope = r["quant_weights"] / r["model_params"]
        offset = 8 * (r["model_bytes"] - r["quant_bytes"]) / r["model_params"]
        top = ax.secondary_xaxis("top", functions=(lambda x: slope * x + offset,
                                                   lambda y: (y - offset) / slope))
        top.set_xlabel("whole-model bits per parameter (float embeddings included)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


@contextlib.contextmanager
def _atomic(path: str, mode: str = "w"):
    """Writes ``path`` via a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                               dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_report(out_dir: str) -> dict:
    """Plot and summary from ``out_dir``'s CSV (and ``sweep.json`` when present)."""
    csv_path = os.path.join(out_dir, CSV_NAME)
    if not os.path.exists(csv_path):
        raise JaxcompError(f"{csv_path} not found: nothing to plot")
    rows = read_rows(csv_path)
    meta = _read_meta(out_dir) or {}
    summary = summarize(rows, meta)
    with _atomic(os.path.join(out_dir, SUMMARY_NAME)) as tmp, open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    with _atomic(os.path.join(out_dir, PLOT_NAME)) as tmp:
        plot(rows, tmp, meta)
    return summary


def _read_meta(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, META_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


# --- CLI ------------------------------------------------------------------------------------------

def _check_out(args, settings: dict) -> dict | None:
    """Refuses an existing sweep without --resume, or a resumed one with other settings;
    returns the existing settings (with the baseline) when resuming."""
    csv_path = os.path.join(args.out, CSV_NAME)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise JaxcompError(f"--out {args.out} is not a directory")
    if os.path.exists(csv_path) and not args.resume:
        raise JaxcompError(f"{csv_path} exists; pass --resume to continue it or choose "
                           "another --out")
    old = _read_meta(args.out) if args.resume else None
    if old is not None:
        for key in META_KEYS:
            if old.get(key) != settings[key]:
                raise JaxcompError(f"--resume: {key} is {settings[key]!r} but the sweep in "
                                   f"{args.out} used {old.get(key)!r}")
    return old


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit code."""
    try:
        args = parse_args(argv)
        if args.plot_only:
            summary = write_report(args.out)
            print(f"{len(summary['pareto'])} Pareto-optimal of {summary['configs']} "
                  f"configurations; wrote {os.path.join(args.out, PLOT_NAME)}")
            return 0
        settings = {k: getattr(args, k) for k in META_KEYS}
        old = _check_out(args, settings)
        return _run(args, settings, old)
    except JaxcompError as e:
        print(f"kbit_sweep: error: {e}", file=sys.stderr)
        return 2


def _run(args, settings: dict, old: dict | None) -> int:
    from jaxcomp.data import calib_tokens, eval_tokens, eval_windows, sample_calibration
    from jaxcomp.eval import perplexity
    from jaxcomp.models import build_model
    from jaxcomp.models.loading import load_model

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    configs = make_grid(args.methods, args.bits, args.dtypes, args.blocks)
    for c in configs:
        c.format()
    loaded = load_model(args.model)
    if loaded.tokenizer is None:
        raise JaxcompError(f"model {args.model} has no tokenizer; evaluation needs one")
    model = build_model(loaded.config)
    windows = eval_windows(eval_tokens(loaded.tokenizer, args.corpus), args.seq_len,
                           args.eval_tokens)
    calib = None
    if "gptq" in args.methods:
        calib = sample_calibration(calib_tokens(loaded.tokenizer, args.corpus),
                                   args.calib_samples, args.calib_seq_len, seed=args.seed)
    meta = old
    if meta is None or "baseline_ppl" not in meta:
        start = time.perf_counter()
        base = perplexity(model, loaded.params, windows, args.batch_size, progress=progress,
                          desc="eval (float)")
        meta = {**settings, "model_source": loaded.source, "model_note": loaded.note,
                "eval_windows": int(windows.shape[0]), "baseline_ppl": base.ppl,
                "baseline_eval_s": round(time.perf_counter() - start, 3)}
        print(json.dumps({"baseline_ppl": base.ppl, "eval_windows": int(windows.shape[0])}),
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    with _atomic(os.path.join(args.out, META_NAME)) as tmp, open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    run_sweep(model, loaded.params, windows, calib, configs, os.path.join(args.out, CSV_NAME),
              batch_size=args.batch_size, resume=args.resume, progress=progress,
              on_row=lambda row: print(json.dumps(row), flush=True))
    summary = write_report(args.out)
    print(f"{summary['ok']} ok, {len(summary['diverged'])} diverged, {len(summary['errors'])} "
          f"failed of {summary['configs']} configurations; Pareto front: "
          + ", ".join(p["config"] for p in summary["pareto"]), flush=True)
    print(f"wrote {args.out}/{{{CSV_NAME},{PLOT_NAME},{SUMMARY_NAME},{META_NAME}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
