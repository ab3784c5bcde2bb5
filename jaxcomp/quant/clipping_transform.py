"""The ``learn_clip`` transform: learnable weight clipping (:mod:`jaxcomp.quant.clipping`,
OmniQuant's LWC) trained block by block in the block-sequential pass.

For each decoder block (:func:`jaxcomp.calib.run_blocks`), on the activations ``X`` the already
quantized upstream blocks produce:

1. the target is the block's own output with its float params, ``Y = block(params, X)``;
2. the clip logits of every selected kernel in the block start at strength 1 (so the starting
   point is round-to-nearest) and are trained *jointly* with Adam to minimize
   ``mean((block(fake_quant(params, logits), X_b) - Y_b)^2)`` over minibatches ``X_b`` of
   calibration windows (one jitted train step, compiled once for all blocks of a model);
3. each kernel is packed into a :class:`QArray` with its learned clipping. The packed block
   computes exactly the function the last train step saw (same dequantized weights).

The block's forward in training is the model's own block module (LLaMA family or GPT-2) in the
model's compute dtype; the loss is taken in float32. A selected kernel may be a plain array or
an input-side wrapper of one (``ActQuant`` after a rotation or SmoothQuant): the wrapper stays
and its inner kernel is clipped and quantized. Already quantized kernels are refused.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcomp.calib import BlockContext, block_transform
from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import leaves_by_path, make_rules, replace_leaves
from jaxcomp.core.transform import register_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.quant.clipping import (
    clip_strengths,
    fake_quant_clipped,
    init_clip_params,
    quantize_clipped,
)
from jaxcomp.quant.formats import resolve_format
from jaxcomp.quant.rtn import _check
from jaxcomp.quant.transform import DEFAULT_TARGETS


def _inner_kernel(leaf, name: str):
    """The float ``(K, N)`` kernel a selected leaf holds (itself, or inside an input-side
    wrapper), refusing anything already quantized or factorized."""
    if isinstance(leaf, CompressedLeaf):
        if not hasattr(leaf, "input_gram"):  # only input-side wrappers (ActQuant) pass through
            raise JaxcompError(f"{name} is already compressed ({type(leaf).__name__}); "
                               "learn_clip quantizes float kernels")
        inner = []
        leaf.map_factors(lambda m, _: inner.append(m) or m)
        if len(inner) != 1 or isinstance(inner[0], CompressedLeaf):
            kind = type(inner[0]).__name__ if inner else "nothing"
            raise JaxcompError(f"{name} is already compressed ({type(leaf).__name__} of "
                               f"{kind}); learn_clip quantizes float kernels")
        w = inner[0]
    else:
        w = leaf
    if np.ndim(w) != 2:
        raise JaxcompError(f"{name}: learn_clip needs a 2-D kernel, got shape {np.shape(w)}")
    _check(w, name)
    return w


def _with_kernel(leaf, fn):
    """``fn`` applied to the float kernel of a selected leaf (inside its wrapper, if any)."""
    if isinstance(leaf, CompressedLeaf):
        return leaf.map_factors(lambda m, _: fn(m))
    return fn(leaf)


def _fake_block(block_params, clip, fmts):
    leaves = leaves_by_path(block_params)
    new = {path: _with_kernel(leaves[path], functools.partial(fake_quant_clipped,
                                                              params=clip[path], fmt=fmt))
           for path, fmt in fmts}
    return replace_leaves(block_params, new)


def _block_loss(clip, block_params, x, y, block, fmts):
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    out = block.apply({"params": _fake_block(block_params, clip, fmts)}, x.astype(block.dtype),
                      positions)[0]
    return jnp.mean(jnp.square(out.astype(jnp.float32) - y))


@functools.partial(jax.jit, static_argnames=("block", "fmts", "optimizer"))
def _train_step(clip, opt_state, block_params, x, y, idx, block, fmts, optimizer):
    """One Adam step on a minibatch ``x[idx]``; returns the loss before the step."""
    loss, grads = jax.value_and_grad(_block_loss)(clip, block_params, x[idx], y[idx], block,
                                                  fmts)
    updates, opt_state = optimizer.update(grads, opt_state, clip)
    return optax.apply_updates(clip, updates), opt_state, loss



@functools.cache
def _adam(lr: float) -> optax.GradientTransformation:
    """One optimizer object per learning rate: the jitted train step takes it as a static
    argument, so transforms with the same lr share its compilation."""
    return optax.adam(lr)


def _minibatches(num: int, batch_size: int, steps: int, rng: np.random.Generator):
    """``(steps, batch_size)`` window indices: shuffled epochs of full batches."""
    order: list[int] = []
    while len(order) < steps * batch_size:
        perm = rng.permutation(num)
        order.extend(perm[:num - num % batch_size])
    return np.asarray(order[:steps * batch_size], np.int32).reshape(steps, batch_size)


def learn_clip_block(block_params, ctx: BlockContext, selected: Mapping[str, dict], *,
                     steps: int, lr: float, batch_size: int, seed: int = 0,
                     optimizer: optax.GradientTransformation | None = None):
    """Learns the clipping of a block's selected kernels jointly and packs them (one block
    step of :func:`learn_clip`).

    Args:
      block_params: the block's params (float kernels, or input-side wrappers of them).
      ctx: the block context (inputs from the already quantized upstream blocks).
      selected: block-relative kernel path -> arguments (format: ``fmt`` or ``format``,
        ``bits``, ``group_size``, ``symmetric``, ``scale_dtype``).
      steps: optimizer steps.
      lr: Adam learning rate of the clip logits (used when ``optimizer`` is None).
      batch_size: calibration windows per step (at most the number of windows).
      seed: minibatch order (mixed with the block index).
      optimizer: an optax optimizer replacing ``optax.adam(lr)`` (the train step compiles
        once per optimizer object).

    Returns:
      ``(block_params, info)``: the new block params (selected kernels as ``QArray``) and
      ``{"loss_first", "loss_last", "mean_strength"}``: the block-output MSE on the first
      minibatch at the start (round-to-nearest, fake-quantized) and of the packed block, and
      the mean clip strength over all groups of the block.

    Example:
      >>> bp, info = learn_clip_block(bp, ctx, {"mlp/up_proj/kernel": args}, steps=50,
      ...                             lr=5e-3, batch_size=4)  # doctest: +SKIP
    """
    leaves = leaves_by_path(block_params)
    fmts, kernels = [], {}
    for path in sorted(selected):
        name = f"{ctx.prefix}/{path}"
        if path not in leaves:
            raise JaxcompError(f"{name}: not found in the block params")
        fmts.append((path, resolve_format(selected[path], name)))
        kernels[path] = _inner_kernel(leaves[path], name)
    fmts = tuple(fmts)
    num = ctx.inputs.shape[0]
    batches = _minibatches(num, min(batch_size, num), steps,
                           np.random.default_rng((seed, ctx.index)))
    # Only the windows the steps visit need a target (fewer than all when steps * batch_size
    # is small): one forward pass of the float block over them.
    used, inverse = np.unique(batches.reshape(-1), return_inverse=True)
    batches = inverse.reshape(batches.shape).astype(np.int32)
    x = jnp.asarray(ctx.inputs, jnp.float32)
    x = x if len(used) == num else x[jnp.asarray(used)]
    y = ctx.run(block_params, x)  # the float block's output: the target
    block = ctx.block
    y = y.astype(jnp.float32)
    optimizer = _adam(lr) if optimizer is None else optimizer
    clip = {path: init_clip_params(kernels[path], fmt) for path, fmt in fmts}
    opt_state = optimizer.init(clip)
    first = None
    for idx in batches:
        clip, opt_state, loss = _train_step(clip, opt_state, block_params, x, y,
                                            jnp.asarray(idx), block, fmts, optimizer)
        first = float(loss) if first is None else first
    new = {path: _with_kernel(leaves[path], functools.partial(
        quantize_clipped, params=clip[path], fmt=fmt, name=f"{ctx.prefix}/{path}"))
        for path, fmt in fmts}
    packed = replace_leaves(block_params, new)
    # The packed block on the first minibatch (ctx.run: the forward the pass compiles anyway
    # to propagate the activations through this block).
    out = ctx.run(packed, x[batches[0]]).astype(jnp.float32)
    last = float(jnp.mean(jnp.square(out - y[batches[0]])))
    if not np.isfinite(last):
        raise JaxcompError(f"{ctx.prefix}: the block-output error became {last} after "
                           "learning the clipping (lower lr?)")
    strengths = [s for p in clip.values() for s in clip_strengths(p).values()]
    mean_strength = float(sum(jnp.sum(s) for s in strengths) / sum(s.size for s in strengths))
    return packed, {"loss_first": first, "loss_last": last, "mean_strength": mean_strength}


def _positive_int(value, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise JaxcompError(f"learn_clip: {key} must be an integer >= 1, got {value!r}")
    return value


@register_transform("learn_clip")
def learn_clip(fmt=None, *, format: str = "int", bits: int | None = 4, group_size=128,
               symmetric: bool = False, scale_dtype: str = "bfloat16", steps: int = 100,
               lr: float = 0.02, batch_size: int = 4, seed: int = 0, rules=None,
               targets=DEFAULT_TARGETS, ignore=(), report_sink=None):
    """Learnable weight clipping (OmniQuant LWC), block by block, then packed ``QArray``s.

    Every selected kernel of a decoder block gets one learnable clip strength per
    quantization group and column (two for asymmetric int: the lower and upper end of the
    range; see :mod:`jaxcomp.quant.clipping`), starting at round-to-nearest. The strengths of
    all the block's kernels are trained together with Adam to make the block's output with
    fake-quantized weights match its float output on the calibration activations (from the
    already quantized upstream blocks), then every kernel is packed.

    Args:
      fmt: a format object (``int3(128)``, ``nf4()``, ...); or build one from ``format``,
        ``bits``, ``group_size``, ``symmetric``, ``scale_dtype`` (the recipe form, as in
        ``quantize``).
      steps: Adam steps per block.
      lr: learning rate of the clip logits (a step moves a strength by about ``lr / 2``).
        SmolLM2 block 0 at 3 bits, 50 steps: block-output MSE 0.54x RTN's at 0.02, 0.73x at
        0.005 (the recipes' value is this default).
      batch_size: calibration windows per step.
      seed: minibatch order.
      rules: ordered rules; a rule's ``args`` override the format arguments above for the
        kernels it selects (mixed precision); steps, lr and batch_size are per block.
      targets, ignore: kernels selected / skipped. Default: every kernel in the decoder
        blocks.
      report_sink: ``sink(kind, value)`` receiving, after each block, the per-block
        ``loss_first`` (round-to-nearest) and ``loss_last`` (learned) block-output MSE on the
        block's first minibatch (the CLI's report).

    Returns:
      A calibrated transform ``transform(params, Calibration(model, windows)) -> params``.

    Example:
      >>> t = learn_clip(bits=3, group_size=128, steps=50)
      >>> q = t(params, Calibration(build_model(cfg), windows))  # doctest: +SKIP
    """
    steps = _positive_int(steps, "steps")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise JaxcompError(f"learn_clip: lr must be a number > 0, got {lr!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise JaxcompError(f"learn_clip: seed must be an integer, got {seed!r}")
    defaults = dict(fmt=fmt, format=format, bits=bits, group_size=group_size,
                    symmetric=symmetric, scale_dtype=scale_dtype)
    resolve_format(defaults, "learn_clip")  # a bad format or rule fails now, not in the first block
    for r in make_rules(rules):
        if not r.skip and r.args:
            resolve_format({**defaults, **r.args}, f"learn_clip rule {r.pattern!r}")
    report: dict[str, dict] = {}

    def step(block_params, ctx, selected):
        out, info = learn_clip_block(block_params, ctx, selected, steps=steps, lr=lr,
                                     batch_size=batch_size, seed=seed)
        report[ctx.prefix] = {k: float(f"{v:.6g}") for k, v in info.items()}
        if report_sink is not None:
            firsts = [v["loss_first"] for v in report.values()]
            lasts = [v["loss_last"] for v in report.values()]
            report_sink("learn_clip", {"blocks": len(report),
                                       "mean_loss_first": float(f"{np.mean(firsts):.6g}"),
                                       "mean_loss_last": float(f"{np.mean(lasts):.6g}"),
                                       "per_block": dict(report)})
        return out

    return block_transform(step, rules, targets=targets, ignore=ignore, desc="learn_clip",
                           **defaults)
