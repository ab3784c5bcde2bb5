"""Learnable weight clipping (OmniQuant's LWC) on plain arrays: the math, no pytrees.

A ``(K, N)`` kernel is grouped along K as every format groups it (:mod:`jaxcomp.quant.formats`):
one scale (and zero point) per group of rows and output column. Learnable weight clipping
shrinks each group's range by learned strengths before the scale is derived from it:

* asymmetric int: ``hi = s_up * max(w_g, 0)``, ``lo = s_low * min(w_g, 0)``,
  ``scale = (hi - lo) / (2^bits - 1)``, ``zero = round(-lo / scale)``;
* symmetric int and codebooks (NF4, fp4, fp8): ``scale = s_abs * max|w_g| / top`` with ``top``
  the largest code magnitude (``2^(bits-1) - 1``, or ``max |values|``).

Each strength is ``s = 2 * sigmoid(logit)``, one logit per group and column. OmniQuant uses
``sigmoid(logit)`` initialized at logit 4 (strength 0.982); the factor 2 with logits starting
at 0 makes the initial strength exactly 1, so the starting point *is* round-to-nearest
(bit for bit, see :func:`quantize_clipped`), and a step of Adam's size moves the strength by
about half the learning rate. Strengths above 1 widen the range; the optimizer may choose
that, it does not pay off in practice.

Fake quantization (:func:`fake_quant_clipped`) rounds with a straight-through estimator:
the rounding of ``w / scale`` (and of the zero point) passes gradients as the identity, the
clamp to the code range passes none outside it, and the weights themselves are constants.
So the gradient reaches the logits through the scale and zero point, as in LWC. The forward
values are computed with exactly the operations of :func:`jaxcomp.quant.rtn.encode` /
:func:`jaxcomp.quant.rtn.decode`, so they equal the packed :class:`QArray`'s dequantization
bit for bit. Scales are rounded up to the format's scale dtype in the forward pass (as stored),
with the identity as gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.errors import JaxcompError
from jaxcomp.quant.formats import Format, IntFormat
from jaxcomp.quant.qarray import QArray, group_rows
from jaxcomp.quant.rtn import (
    _check,
    _grouped,
    _reduce,
    _round_scale_up,
    build_qarray,
    decode,
    encode,
)

ClipParams = dict[str, jax.Array]


def _ste(value: jax.Array, surrogate: jax.Array) -> jax.Array:
    """``value`` in the forward pass (exactly: ``surrogate - surrogate`` is 0), the gradient
    of ``surrogate`` in the backward pass."""
    return jax.lax.stop_gradient(value) + (surrogate - jax.lax.stop_gradient(surrogate))


def _param_names(fmt: Format) -> tuple[str, ...]:
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        return ("lower", "upper")
    return ("absmax",)


def _param_shape(fmt: Format, shape: tuple[int, int]) -> tuple[int, int]:
    k, n = shape
    if fmt.granularity == "tensor":
        return (1, 1)
    return (-(-k // group_rows(fmt, k)), n)


def _check_params(params, fmt: Format, shape: tuple[int, int], name: str | None) -> None:
    where = f"{name}: " if name else ""
    names = _param_names(fmt)
    if not isinstance(params, dict) or set(params) != set(names):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise JaxcompError(f"{where}clip params for {fmt.name} must have keys {list(names)}, "
                           f"got {got}")
    want = _param_shape(fmt, shape)
    for key in names:
        if tuple(np.shape(params[key])) != want:
            raise JaxcompError(f"{where}clip params {key!r} must have shape {want} for a "
                               f"{shape} kernel in {fmt.name}, got {tuple(np.shape(params[key]))}")


def init_clip_params(w: jax.typing.ArrayLike, fmt: Format) -> ClipParams:
    """Clip logits of a ``(K, N)`` kernel at strength 1 (round-to-nearest's range).

    Args:
      w: the kernel (only its shape is used).
      fmt: an :class:`IntFormat` or :class:`CodebookFormat`.

    Returns:
      ``{"lower": (G, N), "upper": (G, N)}`` float32 zero logits for asymmetric int, else
      ``{"absmax": (G, N)}``; ``G`` is the number of groups along K (``(1, 1)`` per tensor).

    Example:
      >>> p = init_clip_params(jnp.ones((200, 8)), int3(64))
      >>> {k: v.shape for k, v in p.items()}
      {'lower': (4, 8), 'upper': (4, 8)}
    """
    if np.ndim(w) != 2:
        raise JaxcompError(f"clipping needs a 2-D kernel, got shape {np.shape(w)}")
    shape = _param_shape(fmt, tuple(np.shape(w)))
    return {key: jnp.zeros(shape, jnp.float32) for key in _param_names(fmt)}


def clip_strengths(params: ClipParams) -> ClipParams:
    """The range factors ``2 * sigmoid(logit)`` of clip params (1 = no clipping).

    Example:
      >>> clip_strengths({"absmax": jnp.zeros((1, 2))})["absmax"]
      Array([[1., 1.]], dtype=float32)
    """
    return {k: 2.0 * jax.nn.sigmoid(jnp.asarray(v, jnp.float32)) for k, v in params.items()}


def clipped_scale_zero(wg: jax.Array, params: ClipParams, fmt: Format):
    """Per-group scale and zero point of grouped weights under learned clipping.

    Args:
      wg: ``(G, rows, N)`` float32 grouped weights (:func:`jaxcomp.quant.rtn._grouped`).
      params: clip logits (:func:`init_clip_params`).
      fmt: the format.

    Returns:
      ``(scale, zero)`` broadcastable to ``wg``: the scale as stored (rounded up to the scale
      dtype) and the integer zero point (asymmetric int, else ``None``), both as float32 and
      differentiable in ``params`` (straight-through rounding).
    """
    strength = {k: v.reshape(v.shape[0], 1, v.shape[1]) for k, v in clip_strengths(params).items()}
    # Bit-exact in every compilation (the packed QArray must match what training saw): XLA:CPU
    # fuses ``a * b - c * d`` into a fused multiply-add in compiled code but not op by op, so
    # no product feeds a sum here directly (the min/max sit between them); and a division by a
    # constant is written as the product with its reciprocal, which is what XLA compiles it
    # to (as in rtn.group_scale_zero under jit) but not op by op.
    lo = None
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        lo = jnp.minimum(_reduce(wg, fmt, jnp.min) * strength["lower"], 0.0)
        hi = jnp.maximum(_reduce(wg, fmt, jnp.max) * strength["upper"], 0.0)
        scale = (hi - lo) * np.float32(1 / (2**fmt.bits - 1))
    else:
        amax = _reduce(jnp.abs(wg), fmt, jnp.max) * strength["absmax"]
        top = 2 ** (fmt.bits - 1) - 1 if isinstance(fmt, IntFormat) else max(map(abs, fmt.values))
        scale = amax * np.float32(1 / top)
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero group: any scale works
    stored = _round_scale_up(jax.lax.stop_gradient(scale), fmt.scale_dtype).astype(jnp.float32)
    scale = _ste(stored, scale)
    if lo is None:
        return scale, None
    z = -lo / scale
    return scale, jnp.clip(_ste(jnp.round(z), z), 0, 2**fmt.bits - 1)


def fake_quant_clipped(w: jax.Array, params: ClipParams, fmt: Format) -> jax.Array:
    """``dequantize(quantize(w))`` under learned clipping, differentiable in ``params``.

    The forward values equal ``quantize_clipped(w, params, fmt).dequantize()`` exactly. The
    weights are constants (no gradient to ``w``); rounding is straight-through, so the
    logits get OmniQuant's LWC gradient through the scale and zero point.

    Args:
      w: ``(K, N)`` kernel (any float dtype; computed in float32).
      params: clip logits from :func:`init_clip_params`.
      fmt: an :class:`IntFormat` or :class:`CodebookFormat`.

    Returns:
      The fake-quantized kernel in ``w``'s dtype.

    Example:
      >>> p = init_clip_params(w, int3(128))
      >>> loss = lambda p: jnp.sum((x @ fake_quant_clipped(w, p, int3(128)) - x @ w) ** 2)
      >>> grads = jax.grad(loss)(p)  # doctest: +SKIP
    """
    w = jnp.asarray(w)
    _check_params(params, fmt, w.shape, None)
    k, n = w.shape
    wg = _grouped(jax.lax.stop_gradient(w).astype(jnp.float32), group_rows(fmt, k))
    scale, zero = clipped_scale_zero(wg, params, fmt)
    x = wg / scale
    if isinstance(fmt, IntFormat):
        q = _ste(jnp.round(x), x)
        if fmt.symmetric:
            half = 2 ** (fmt.bits - 1)
            codes = jnp.clip(q, -half, half - 1) + half
        else:
            codes = jnp.clip(q + zero, 0, 2**fmt.bits - 1)
        deq = decode(codes, fmt, scale, zero)
    else:
        # Codes index a table: the value is straight-through over the clamped ratio.
        values = jnp.take(jnp.asarray(fmt.values, jnp.float32),
                          encode(wg, fmt, scale, zero).astype(jnp.int32))
        deq = _ste(values, jnp.clip(x, min(fmt.values), max(fmt.values))) * scale
    return deq.reshape(-1, n)[:k].astype(w.dtype)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _codes(w, params, fmt: Format):
    k, n = w.shape
    wg = _grouped(w.astype(jnp.float32), group_rows(fmt, k))
    scale, zero = clipped_scale_zero(wg, params, fmt)
    return encode(wg, fmt, scale, zero).reshape(-1, n)[:k], scale, zero


def quantize_clipped(w: jax.typing.ArrayLike, params: ClipParams, fmt: Format, *,
                     name: str | None = None) -> QArray:
    """Packs a ``(K, N)`` kernel into a :class:`QArray` with learned clipping.

    ``quantize_clipped(w, init_clip_params(w, fmt), fmt)`` is exactly
    :func:`jaxcomp.quant.rtn.quantize_array` (same codes, scales and zero points), and
    ``quantize_clipped(...).dequantize()`` equals :func:`fake_quant_clipped`'s forward values.

    Args:
      w: the kernel.
      params: clip logits (:func:`init_clip_params`, then learned).
      fmt: an :class:`IntFormat` or :class:`CodebookFormat`.
      name: param path for error messages.

    Returns:
      The :class:`QArray`.

    Example:
      >>> q = quantize_clipped(w, init_clip_params(w, int4(128)), int4(128))  # RTN
    """
    _check(w, name)
    w = jnp.asarray(w)
    _check_params(params, fmt, w.shape, name)
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    if not all(bool(jnp.isfinite(v).all()) for v in params.values()):
        raise JaxcompError(f"{name + ': ' if name else ''}clip params contain NaN or Inf")
    codes, scale, zero = _codes(w, params, fmt)
    return build_qarray(codes, scale, zero, fmt, jnp.dtype(w.dtype).name)
