"""The ``gptq`` transform: GPTQ (:mod:`jaxcomp.quant.gptq`) in the block-sequential pass.

Each decoder block's selected kernels get their Hessians ``X^T X`` from the activations of the
already quantized upstream blocks (:func:`jaxcomp.calib.run_blocks`), all kernels of a block
from one pass over its inputs (the reference implementation's default; quantizing a block's
layers one after another with re-collected inputs is "true sequential", not done here).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxcomp.calib import block_transform
from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import leaves_by_path, replace_leaves
from jaxcomp.core.transform import register_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.quant.formats import format_from_name, resolve_format
from jaxcomp.quant.gptq import gptq_quantize
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.transform import DEFAULT_IGNORE, DEFAULT_TARGETS


def _gptq_leaf(w, gram, fmt, name: str, **opts):
    """GPTQ of one kernel; an input-side wrapper (ActQuant) passes its inner kernel through
    with the Gram matrix of the inputs that kernel sees. Returns ``(new_leaf, info)``."""
    if not isinstance(w, CompressedLeaf):
        return gptq_quantize(w, gram, fmt, name=name, **opts)
    if not hasattr(w, "input_gram"):
        raise JaxcompError(f"{name} is already compressed ({type(w).__name__}); GPTQ quantizes "
                           "float kernels")
    infos = []

    def inner(m, _):
        if isinstance(m, CompressedLeaf):
            raise JaxcompError(f"{name} is already quantized")
        q, info = gptq_quantize(m, w.input_gram(gram), fmt, name=name, **opts)
        infos.append(info)
        return q

    return w.map_factors(inner), infos[0]


def _per_head_gptq(w, head_grams, fmt, name: str, **opts):
    """GPTQ of a LLaMA ``v_proj`` with one Hessian per kv head (its columns): the Gram of the
    attention-mixed inputs, so a value error counts as much as attention uses that value."""
    heads = head_grams.shape[0]
    if fmt.granularity == "tensor":  # one scale for all heads: one (summed) Hessian
        return gptq_quantize(w, head_grams.sum(0), fmt, name=name, **opts)
    width = w.shape[1] // heads
    parts = [gptq_quantize(w[:, h * width:(h + 1) * width], head_grams[h], fmt,
                           name=f"{name} (kv head {h})", **opts) for h in range(heads)]
    qs = [q for q, _ in parts]
    zeros = None if qs[0].zeros is None else jnp.concatenate([q.zeros for q in qs], axis=1)
    q = QArray(jnp.concatenate([q.packed for q in qs], axis=1),
               jnp.concatenate([q.scales for q in qs], axis=1), zeros, fmt, tuple(w.shape),
               qs[0].orig_dtype)
    return q, {"damp": max(info["damp"] for _, info in parts),
               "dead_inputs": max(info["dead_inputs"] for _, info in parts)}


def _gptq_block(block_params, ctx, selected, report, attention_values: bool):
    leaves = leaves_by_path(block_params)
    new = {}
    # Narrow inputs first and each layer's statistics dropped once it is quantized: a Gram
    # shared by q/k/v is freed after the last of them, and at LLaMA-2-7B only down_proj's
    # 1 GB float64 Hessian is alive while its Cholesky runs.
    all_stats = ctx.stats
    order = sorted(selected, key=lambda p: all_stats[p].gram.shape[0] if p in all_stats else 0)
    for path in order:
        args = selected[path]
        name = f"{ctx.prefix}/{path}"
        stats = all_stats.pop(path, None)
        if stats is None:
            raise JaxcompError(f"{name}: no calibration statistics (not a Linear kernel?)")
        opts = dict(block_size=args["block_size"], damp=args["damp"],
                    act_order=args["act_order"])
        w = leaves[path]
        # one yardstick for every layer: squared relative output error on the block's inputs
        # (gptq_quantize measures it with the Hessian it was given)
        if (attention_values and stats.head_grams is not None
                and not isinstance(w, CompressedLeaf)):
            new[path], info = _per_head_gptq(jnp.asarray(w), stats.head_grams,
                                             resolve_format(args), name, **opts)
            error = stats.output_error(w, new[path].materialize()) ** 2
        else:
            new[path], info = _gptq_leaf(w, stats.gram, resolve_format(args), name, **opts)
            error = info["proxy_error"]
        report[name] = {"proxy_error": round(error, 6), "damp": info["damp"]}
    return replace_leaves(block_params, new)


@register_transform("gptq")
def gptq(fmt=None, *, format: str = "int", bits: int | None = 4, group_size=128,
         symmetric: bool = False, scale_dtype: str = "bfloat16", block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, attention_values: bool = True,
         rules=None, targets=DEFAULT_TARGETS, ignore=DEFAULT_IGNORE, report_sink=None):
    """GPTQ quantization of the selected kernels into packed ``QArray`` leaves.

    Args:
      fmt: a format object; or build one from ``format``, ``bits``, ``group_size``,
        ``symmetric``, ``scale_dtype`` (the recipe form, as in ``quantize``).
      block_size: rows per lazy-update block.
      damp: Hessian damping (fraction of the mean diagonal); raised tenfold with a warning
        while the Hessian is not positive definite.
      act_order: rows in decreasing Hessian-diagonal order, with static groups.
      attention_values: LLaMA ``v_proj``: one Hessian per kv head from the attention-mixed
        inputs ``A_h X`` (the error that reaches the attention output) instead of ``X^T X``.
        Measured on SmolLM2 W4 g128: with the plain Hessian GPTQ moves the error of
        ``v_proj`` into the directions only the first token (an attention sink, which
        every query attends to) excites, and perplexity ends worse than RTN's. Costs
        ``kv_heads x in^2`` floats of statistics per layer (4 GB in float64 for LLaMA-2-7B).
      rules, targets, ignore: selection; a rule's ``args`` override the arguments above.
      report_sink: ``sink(kind, value)`` receiving per-layer proxy errors (the CLI's report).

    Returns:
      A calibrated transform ``(params, Calibration) -> params`` (block-sequential).

    Example:
      >>> q = gptq(int4(128))(params, Calibration(model, windows))  # doctest: +SKIP
    """
    if fmt is None:  # a bad format fails now, not in the first block
        format_from_name(format, bits, group_size, symmetric, scale_dtype)
    if not isinstance(block_size, int) or block_size < 1:
        raise JaxcompError(f"block_size must be an integer >= 1, got {block_size!r}")
    if not damp > 0:
        raise JaxcompError(f"damp must be > 0, got {damp!r}")
    report: dict = {}

    def step(block_params, ctx, selected):
        out = _gptq_block(block_params, ctx, selected, report, attention_values)
        if report_sink is not None:
            errors = [v["proxy_error"] for v in report.values()]
            report_sink("gptq", {"layers": len(report), "mean_proxy_error":
                                 round(sum(errors) / len(errors), 6),
                                 "max_proxy_error": max(errors),
                                 "damp_raised": sorted(k for k, v in report.items()
                                                       if v["damp"] != damp)})
        return out

    return block_transform(step, rules, targets=targets, ignore=ignore, desc="gptq", fmt=fmt,
                           format=format, bits=bits, group_size=group_size, symmetric=symmetric,
                           scale_dtype=scale_dtype, block_size=block_size, damp=damp,
                           act_order=act_order, head_grams=attention_values)
