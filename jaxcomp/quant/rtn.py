"""Round-to-nearest quantization on plain arrays: the math, no pytrees.

``quantize_array`` turns a ``(K, N)`` kernel into a :class:`QArray`; ``fake_quantize`` returns
``dequantize(quantize(w))`` with a straight-through gradient for quantization-aware training.
Optional clip search (as in AWQ / LLMC): per group, try shrinking the range by ratios in
``[min_clip, 1]`` and keep the one with the lowest weight MSE.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.errors import JaxcompError
from jaxcomp.quant.formats import Format, IntFormat
from jaxcomp.quant.packing import pack
from jaxcomp.quant.qarray import QArray, group_rows


def _grouped(w: jax.Array, rows: int) -> jax.Array:
    """(K, N) -> (G, rows, N); the last group is zero-filled past K. Zero is exactly
    representable in every format, so the fill never changes a scale or a code."""
    k, n = w.shape
    groups = -(-k // rows)
    return jnp.pad(w, ((0, groups * rows - k), (0, 0))).reshape(groups, rows, n)


def _round_scale_up(scale: jax.Array, dtype: str) -> jax.Array:
    """Stores the scale in ``dtype``, rounding up so the group's range still fits."""
    if dtype == "float32":
        return scale
    stored = scale.astype(dtype)
    bumped = jnp.nextafter(stored, jnp.asarray(jnp.inf, dtype))
    return jnp.where(stored.astype(jnp.float32) < scale, bumped, stored)


def _reduce(x, fmt, op):
    axes = (0, 1, 2) if fmt.granularity == "tensor" else (1,)
    return op(x, axis=axes, keepdims=True)


def group_scale_zero(wg, fmt: Format, ratio=1.0):
    """Per-group scale (stored dtype, as float32) and zero point (asymmetric int, else None) of
    grouped weights ``wg`` ``(G, rows, N)``, for ranges shrunk by ``ratio``."""
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        lo = jnp.minimum(_reduce(wg, fmt, jnp.min), 0.0) * ratio
        hi = jnp.maximum(_reduce(wg, fmt, jnp.max), 0.0) * ratio
        scale = (hi - lo) / (2**fmt.bits - 1)
    else:
        amax = _reduce(jnp.abs(wg), fmt, jnp.max) * ratio
        top = 2 ** (fmt.bits - 1) - 1 if isinstance(fmt, IntFormat) else max(map(abs, fmt.values))
        scale = amax / top
        lo = None
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero group: any scale works
    scale = _round_scale_up(scale, fmt.scale_dtype).astype(jnp.float32)
    zero = None if lo is None else jnp.clip(jnp.round(-lo / scale), 0, 2**fmt.bits - 1)
    return scale, zero


def encode(wg, fmt: Format, scale, zero):
    """Codes (as float32) of weights under broadcastable ``scale``/``zero``: round to nearest."""
    if isinstance(fmt, IntFormat):
        if fmt.symmetric:
            half = 2 ** (fmt.bits - 1)
            return jnp.clip(jnp.round(wg / scale), -half, half - 1) + half
        return jnp.clip(jnp.round(wg / scale) + zero, 0, 2**fmt.bits - 1)
    values = np.asarray(fmt.values)
    midpoints = jnp.asarray((values[1:] + values[:-1]) / 2, jnp.float32)
    return jnp.searchsorted(midpoints, wg / scale).astype(jnp.float32)


def decode(codes, fmt: Format, scale, zero):
    """Values of float32 codes (the inverse of :func:`encode` up to rounding)."""
    if isinstance(fmt, IntFormat):
        offset = 2 ** (fmt.bits - 1) if fmt.symmetric else zero
        return (codes - offset) * scale
    return jnp.take(jnp.asarray(fmt.values, jnp.float32), codes.astype(jnp.int32)) * scale


def _best_ratios(wg, fmt: Format, min_clip: float, grid: int):
    """Per-group clip ratio in ``linspace(1, min_clip, grid)`` with the lowest weight MSE."""
    shape = jax.eval_shape(lambda: _reduce(wg, fmt, jnp.max)).shape

    def step(best, ratio):
        scale, zero = group_scale_zero(wg, fmt, ratio)
        err = _reduce(jnp.square(decode(encode(wg, fmt, scale, zero), fmt, scale, zero) - wg),
                      fmt, jnp.sum)
        better = err < best[0]
        return (jnp.where(better, err, best[0]), jnp.where(better, ratio, best[1])), None

    init = (jnp.full(shape, jnp.inf), jnp.ones(shape))
    (_, ratios), _ = jax.lax.scan(step, init, jnp.linspace(1.0, min_clip, grid))
    return ratios


@functools.partial(jax.jit, static_argnames=("fmt", "clip_search", "min_clip", "grid"))
def _quantize(w, fmt: Format, clip_search: bool, min_clip: float, grid: int):
    w = w.astype(jnp.float32)
    k = w.shape[0]
    wg = _grouped(w, group_rows(fmt, k))
    ratio = _best_ratios(wg, fmt, min_clip, grid) if clip_search else 1.0
    scale, zero = group_scale_zero(wg, fmt, ratio)
    codes = encode(wg, fmt, scale, zero)
    return codes.reshape(-1, w.shape[1])[:k], scale, zero


def _check(w, name: str | None) -> None:
    where = f"{name}: " if name else ""
    if np.ndim(w) != 2:
        raise JaxcompError(f"{where}quantization needs a 2-D kernel, got shape {np.shape(w)}")
    if not bool(jnp.isfinite(w).all()):
        raise JaxcompError(f"{where}weights contain NaN or Inf")


def quantize_array(w: jax.Array, fmt: Format, *, clip_search: bool = False,
                   min_clip: float = 0.5, clip_grid: int = 20, name: str | None = None) -> QArray:
    """Round-to-nearest quantization of a ``(K, N)`` kernel.

    Args:
      w: the kernel (Flax layout, groups along K).
      fmt: an :class:`IntFormat` or :class:`CodebookFormat`.
      clip_search: search a per-group clip ratio minimizing the weight MSE.
      min_clip: smallest clip ratio tried.
      clip_grid: number of ratios tried in ``[min_clip, 1]``.
      name: param path for error messages.

    Returns:
      The :class:`QArray` (see its reconstruction invariant).

    Example:
      >>> q = quantize_array(jnp.ones((576, 1536)), int4(group_size=128))
      >>> q.packed.shape, q.scales.shape
      ((288, 1536), (5, 1536))
    """
    _check(w, name)
    codes, scale, zero = _quantize(jnp.asarray(w), fmt, clip_search, float(min_clip),
                                   int(clip_grid))
    return build_qarray(codes, scale, zero, fmt, jnp.dtype(w.dtype).name)


def build_qarray(codes, scale, zero, fmt: Format, orig_dtype: str = "float32") -> QArray:
    """Packs ``(K, N)`` codes with per-group ``scale``/``zero`` (any shape reshaping to
    ``(G, N)``, or one value per tensor) into a :class:`QArray`."""
    scales = scale.reshape(-1, scale.shape[-1]).astype(fmt.scale_dtype)
    zeros = None if zero is None else zero.reshape(-1, zero.shape[-1]).astype(jnp.uint8)
    return QArray(pack(jnp.asarray(codes).astype(jnp.uint32), fmt.bits), scales, zeros, fmt,
                  tuple(int(d) for d in np.shape(codes)), orig_dtype)


def fake_quantize(w: jax.Array, fmt: Format) -> jax.Array:
    """``dequantize(quantize(w))`` in ``w``'s dtype with a straight-through gradient.

    The forward pass sees quantized weights; the backward pass treats quantization as the
    identity (``d/dw = 1``), so master weights keep training (QAT).

    Example:
      >>> jax.grad(lambda w: fake_quantize(w, int4(32)).sum())(jnp.ones((64, 8)))  # all ones
    """
    codes, scale, zero = _quantize(jax.lax.stop_gradient(w), fmt, False, 1.0, 1)
    k = w.shape[0]
    rows = group_rows(fmt, k)
    codes_g = _grouped(codes, rows)
    deq = decode(codes_g, fmt, scale, zero).reshape(-1, w.shape[1])[:k].astype(w.dtype)
    return w + jax.lax.stop_gradient(deq - w)
