"""AWQ (Lin et al. 2023, activation-aware weight quantization) on plain arrays: the math.

A group of linear layers sharing one input ``X`` (``K`` features; e.g. q/k/v after the same
RMSNorm) is rewritten as ``X W = (X diag(s)^-1) (diag(s) W)``: the ``1/s`` goes into whatever
produces ``X`` (see :mod:`jaxcomp.quant.awq_transform`), the weights are quantized as
``Q(diag(s) W)``. Salient input channels (large activations) get ``s > 1``: their weights are
quantized with relatively finer steps, at the expense of quiet channels.

Both searches minimize the exact layer output error on the calibration inputs through their
Gram matrix ``G = X^T X`` (:class:`jaxcomp.calib.InputStats`): for a replacement ``W'`` of
``W``, ``||X W - X W'||_F^2 = tr(D^T G D)`` with ``D = W' - W``.

* :func:`search_scales`: ``s = m^alpha`` for ``alpha`` on a grid in ``[0, 1)``, where ``m``
  is the per-channel activation magnitude. AWQ uses ``mean |x|``; the statistics here keep
  ``X^T X``, so callers pass the channel RMS ``sqrt(diag(G) / count)`` (same role: a
  per-channel typical magnitude, weighted a bit more towards large values). ``alpha = 0``
  is plain RTN, so the chosen scales are never worse than RTN on the calibration inputs.
* :func:`search_clip`: AWQ's weight clipping. Per quantization group and output column, the
  weight range is shrunk by ratios in ``[min_clip, 1]`` and the ratio with the lowest output
  error of that group alone (``d_g^T G_gg d_g``, ignoring cross-group terms as AWQ does) is
  kept. :func:`clip_to_ratios` then clamps the *float* weights to the chosen range, so any
  later quantizer (RTN, GPTQ) that takes its range from the weights sees the clipped one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.errors import JaxcompError
from jaxcomp.quant.formats import Format, IntFormat
from jaxcomp.quant.qarray import group_rows
from jaxcomp.quant.rtn import _grouped, decode, encode, group_scale_zero

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames=("fmt",))
def quant_dequant(w: jax.Array, fmt: Format) -> jax.Array:
    """``dequantize(quantize(w))`` of a ``(K, N)`` kernel in float32 (RTN, no clipping).

    Args:
      w: ``(K, N)`` weights.
      fmt: the quantization format.

    Returns:
      ``(K, N)`` float32: what a ``QArray`` of ``w`` materializes to.

    Example:
      >>> quant_dequant(jnp.ones((128, 4)), int4(64)).shape
      (128, 4)
    """
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[0]
    wg = _grouped(w, group_rows(fmt, k))
    scale, zero = group_scale_zero(wg, fmt)
    return decode(encode(wg, fmt, scale, zero), fmt, scale, zero).reshape(-1, w.shape[1])[:k]


def output_error(w: jax.Array, w_hat: jax.Array, gram: jax.Array) -> jax.Array:
    """``tr(D^T G D)`` with ``D = w_hat - w``: the squared output error ``||X w - X w_hat||^2``
    for inputs with Gram matrix ``G = X^T X`` (divide ``G`` by the row count for a mean).

    Example:
      >>> float(output_error(jnp.eye(2), 2 * jnp.eye(2), jnp.eye(2)))
      2.0
    """
    d = jnp.asarray(w_hat, jnp.float32) - jnp.asarray(w, jnp.float32)
    return jnp.sum(d * jnp.matmul(jnp.asarray(gram, jnp.float32), d, precision=_HIGHEST))


def scale_candidates(act_scale: jax.typing.ArrayLike, alpha_grid: int = 20
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The candidate per-channel scales ``s = m^alpha / sqrt(max(m^alpha) min(m^alpha))``.

    Args:
      act_scale: ``(K,)`` per-channel activation magnitude ``m`` (e.g. channel RMS). Channels
        below ``1e-5 * max(m)`` (dead channels) are raised to that floor so ``1/s`` is finite.
      alpha_grid: number of exponents ``alpha = i / alpha_grid``, ``i = 0 .. alpha_grid-1``
        (AutoAWQ's grid; ``alpha = 0`` gives ``s = 1``, i.e. RTN).

    Returns:
      ``(alphas (A,), scales (A, K))`` in float64; each row is normalized so that
      ``sqrt(max(s) * min(s)) = 1`` (AutoAWQ), which centers the scales around 1.

    Example:
      >>> alphas, s = scale_candidates(np.array([1.0, 100.0]), 2)
      >>> s[1]  # alpha 0.5: sqrt([1, 100]) / sqrt(10)
      array([0.31622777, 3.16227766])
    """
    if not isinstance(alpha_grid, int) or isinstance(alpha_grid, bool) or alpha_grid < 1:
        raise JaxcompError(f"alpha_grid must be an integer >= 1, got {alpha_grid!r}")
    m = np.asarray(act_scale, np.float64)
    if m.ndim != 1 or not np.all(np.isfinite(m)):
        raise JaxcompError(f"activation scales must be a finite vector, got shape {m.shape}")
    top = float(m.max(initial=0.0))
    if top <= 0:  # no signal at all: nothing to weigh, keep s = 1
        m = np.ones_like(m)
    else:
        m = np.maximum(m, 1e-5 * top)
    alphas = np.arange(alpha_grid) / alpha_grid
    s = m[None, :] ** alphas[:, None]
    s = s / np.sqrt(s.max(axis=1, keepdims=True) * s.min(axis=1, keepdims=True))
    return alphas, s


@functools.partial(jax.jit, static_argnames=("fmts",))
def _scaled_errors(weights, fmts, gram, candidates):
    def error(s):
        total = jnp.zeros((), jnp.float32)
        for w, fmt in zip(weights, fmts, strict=True):
            w_hat = quant_dequant(w * s[:, None], fmt) / s[:, None]
            total = total + output_error(w, w_hat, gram)
        return total

    return jax.lax.map(error, candidates)


def search_scales(weights: Sequence[jax.typing.ArrayLike], fmts: Sequence[Format],
                  gram: jax.typing.ArrayLike, act_scale: jax.typing.ArrayLike,
                  alpha_grid: int = 20) -> tuple[np.ndarray, float, np.ndarray]:
    """AWQ's per-input-channel scale search for kernels sharing one input.

    Minimizes ``sum_i tr(D_i^T G D_i)`` with ``D_i = diag(s)^-1 Q_i(diag(s) W_i) - W_i``: the
    summed output error of the group's layers when their input is divided by ``s`` and their
    weights multiplied by it before quantization (``Q_i`` is RTN in ``fmts[i]``).

    Args:
      weights: ``(K, N_i)`` kernels sharing a ``K``-feature input.
      fmts: one format per kernel.
      gram: ``(K, K)`` Gram matrix of the input (any positive multiple: ``X^T X / count``).
      act_scale: ``(K,)`` per-channel activation magnitude (channel RMS; tied channels, e.g.
        grouped-query heads, carry equal values and so get equal scales).
      alpha_grid: exponents tried (see :func:`scale_candidates`).

    Returns:
      ``(scales (K,) float64, best alpha, errors (alpha_grid,))`` with ``errors[i]`` the
      objective at ``alpha = i / alpha_grid`` (``errors[0]`` is RTN's).

    Example:
      >>> s, alpha, errs = search_scales([w_q, w_k, w_v], [int4(128)] * 3, G, rms)  # doctest: +SKIP
      >>> errs.min() <= errs[0]  # doctest: +SKIP
      True
    """
    if len(weights) != len(fmts) or not weights:
        raise JaxcompError("search_scales needs one format per kernel and at least one kernel")
    ws = tuple(jnp.asarray(w, jnp.float32) for w in weights)
    k = ws[0].shape[0]
    if any(w.ndim != 2 or w.shape[0] != k for w in ws) or np.shape(gram) != (k, k):
        raise JaxcompError(f"kernels sharing an input need shape (K, N) and a (K, K) Gram "
                           f"matrix; got {[tuple(w.shape) for w in ws]} and {np.shape(gram)}")
    alphas, candidates = scale_candidates(act_scale, alpha_grid)
    if candidates.shape[1] != k:
        raise JaxcompError(f"{candidates.shape[1]} activation scales for {k} input channels")
    errors = np.asarray(_scaled_errors(ws, tuple(fmts), jnp.asarray(gram, jnp.float32),
                                       jnp.asarray(candidates, jnp.float32)), np.float64)
    if not np.all(np.isfinite(errors)):
        raise JaxcompError("the AWQ scale search produced a non-finite error (NaN/Inf weights "
                           "or statistics?)")
    best = int(np.argmin(errors))
    return candidates[best], float(alphas[best]), errors


def _clip_bounds(wg, fmt: Format, ratio):
    """Range a group keeps at ``ratio``: the one :func:`group_scale_zero` quantizes over."""
    if isinstance(fmt, IntFormat) and not fmt.symmetric:
        lo = jnp.minimum(jnp.min(wg, axis=1, keepdims=True), 0.0) * ratio
        hi = jnp.maximum(jnp.max(wg, axis=1, keepdims=True), 0.0) * ratio
        return lo, hi
    top = jnp.max(jnp.abs(wg), axis=1, keepdims=True) * ratio
    return -top, top


def _diagonal_blocks(gram, groups: int, rows: int):
    """(K, K) -> (G, rows, rows): the Gram matrix of each quantization group's rows (the
    padding past K is zero, like the padded weight rows)."""
    k = gram.shape[0]
    padded = jnp.pad(gram, ((0, groups * rows - k), (0, groups * rows - k)))
    idx = jnp.arange(groups)
    return padded.reshape(groups, rows, groups, rows)[idx, :, idx, :]


@functools.partial(jax.jit, static_argnames=("fmt", "clip_grid"))
def _clip_ratios(w, gram, fmt: Format, min_clip, clip_grid: int):
    k, n = w.shape
    rows = group_rows(fmt, k)
    wg = _grouped(w, rows)
    blocks = _diagonal_blocks(gram, wg.shape[0], rows)

    def step(best, ratio):
        lo, hi = _clip_bounds(wg, fmt, ratio)
        clipped = jnp.clip(wg, lo, hi)
        scale, zero = group_scale_zero(clipped, fmt)
        d = decode(encode(clipped, fmt, scale, zero), fmt, scale, zero) - wg
        gd = jnp.einsum("gij,gjn->gin", blocks, d, precision=_HIGHEST)
        err = jnp.sum(d * gd, axis=1, keepdims=True)  # (G, 1, N): d_g^T G_gg d_g
        better = err < best[0]
        return (jnp.where(better, err, best[0]), jnp.where(better, ratio, best[1])), None

    shape = (wg.shape[0], 1, n)
    init = (jnp.full(shape, jnp.inf), jnp.ones(shape))
    (_, ratios), _ = jax.lax.scan(step, init, jnp.linspace(1.0, min_clip, clip_grid))
    return ratios


def search_clip(w: jax.typing.ArrayLike, fmt: Format, gram: jax.typing.ArrayLike, *,
                min_clip: float = 0.5, clip_grid: int = 20) -> jax.Array:
    """AWQ's clip search: per group and output column, the range-shrink ratio minimizing
    that group's output error ``d_g^T G_gg d_g`` (``d_g`` the group's rows of
    ``Q(clip(W)) - W``).

    Args:
      w: ``(K, N)`` kernel (already scaled, if AWQ scales are used).
      fmt: the format it will be quantized in (``"group"`` or ``"channel"`` granularity).
      gram: ``(K, K)`` Gram matrix of the kernel's input (after any AWQ scaling).
      min_clip: smallest ratio tried.
      clip_grid: ratios tried in ``linspace(1, min_clip, clip_grid)`` (1 keeps the range).

    Returns:
      ``(G, 1, N)`` float32 ratios (``G`` quantization groups), for :func:`clip_to_ratios`.

    Example:
      >>> ratios = search_clip(w, int4(128), G)  # doctest: +SKIP
      >>> w_clipped = clip_to_ratios(w, int4(128), ratios)  # doctest: +SKIP
    """
    if fmt.granularity == "tensor":
        raise JaxcompError("clip search needs per-group or per-channel scales, not 'tensor'")
    if not 0 < min_clip <= 1 or not isinstance(clip_grid, int) or clip_grid < 1:
        raise JaxcompError(f"min_clip must be in (0, 1] and clip_grid an integer >= 1, got "
                           f"{min_clip!r}, {clip_grid!r}")
    w = jnp.asarray(w, jnp.float32)
    return _clip_ratios(w, jnp.asarray(gram, jnp.float32), fmt, float(min_clip), clip_grid)


def clip_to_ratios(w: jax.typing.ArrayLike, fmt: Format, ratios: jax.Array) -> jax.Array:
    """Clamps each group/column of a ``(K, N)`` kernel to its range shrunk by ``ratios``
    (``(G, 1, N)`` from :func:`search_clip`), in float32.

    The clamped group's own range is then exactly the shrunk one, so RTN (or GPTQ) of the
    result uses the scale the search chose.
    """
    w = jnp.asarray(w, jnp.float32)
    k = w.shape[0]
    wg = _grouped(w, group_rows(fmt, k))
    lo, hi = _clip_bounds(wg, fmt, ratios)
    return jnp.clip(wg, lo, hi).reshape(-1, w.shape[1])[:k]
