"""GPTQ (Frantar et al. 2023) on plain arrays: the math, no pytrees.

For a ``(K, N)`` kernel (Flax layout, ``y = x @ W``) and the Hessian ``H = X^T X`` of its
inputs, GPTQ quantizes the rows of ``W`` (input features) one at a time and spreads each row's
rounding error over the rows not yet quantized, weighted by the inverse Hessian, so the layer
output ``X W`` moves as little as possible:

    err_k = (w_k - q(w_k)) / U[k, k];   w_j -= U[k, j] * err_k   for j > k

with ``U`` the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``). Rows are processed in
blocks of ``block_size`` (lazy batch updates: rows past the block are updated once per block).

* Damping: ``H + damp * mean(diag H) * I``; a Hessian that is still not positive definite is
  retried with ten times more damping (with a warning naming the layer), then refused.
* Dead inputs (``H[k, k] == 0``: a channel that is always zero) get ``H[k, k] = 1`` and zero
  weights, as the reference implementation does.
* Groups: a group's scale and zero are computed when its first row is reached, from the
  already error-updated rows. With ``act_order`` (rows in order of decreasing ``H[k, k]``) the
  scales come from the original weights' natural groups before any update ("static groups"),
  so every group stays a contiguous run of rows and the packed layout is unchanged.
* Every format of :mod:`jaxcomp.quant.formats` (int asym/sym, NF, fp8/fp4 codebooks; per
  group, channel or tensor) quantizes through the same ``encode``/``decode`` as RTN; a group
  size that does not divide K leaves a shorter last group.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy.linalg import lapack

from jaxcomp.calib import relative_output_error
from jaxcomp.errors import JaxcompError
from jaxcomp.quant.formats import Format
from jaxcomp.quant.qarray import QArray, group_rows
from jaxcomp.quant.rtn import _grouped, build_qarray, decode, encode, group_scale_zero


def inverse_hessian_factor(hessian: np.ndarray, damp: float = 0.01, *, max_retries: int = 4,
                           name: str = "") -> tuple[np.ndarray, np.ndarray, float]:
    """Upper Cholesky factor ``U`` of ``(H + damping)^-1`` in float64.

    Args:
      hessian: ``(K, K)`` ``X^T X`` (any positive scale).
      damp: damping as a fraction of the mean diagonal.
      max_retries: times the damping is multiplied by 10 before giving up.
      name: layer path for messages.

    Returns:
      ``(U, dead, damp_used)``: ``U`` upper triangular with ``H^-1 = U^T U``; ``dead``: mask of
      input channels with zero Hessian diagonal.

    Example:
      >>> u, dead, d = inverse_hessian_factor(x.T @ x)  # doctest: +SKIP
    """
    hessian = np.asarray(hessian)
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise JaxcompError(f"{name}: Hessian must be square, got {hessian.shape}")
    if not np.isfinite(hessian).all():
        raise JaxcompError(f"{name}: Hessian has NaN or Inf (calibration activations overflowed?)")
    dead = np.diag(hessian) == 0
    mean_diag = float(np.mean(np.where(dead, 1.0, np.diag(hessian))))
    diag = np.diag_indices(len(hessian))
    for attempt in range(max_retries + 1):
        # LAPACK in place on one K x K float64 buffer (1 GB at K = 11008): H = C^T C, then
        # H^-1 from C, then its upper Cholesky factor (each call reads the upper triangle).
        a = np.array(hessian, np.float64, order="F")  # Fortran order: LAPACK works in place
        a[dead, :] = 0
        a[:, dead] = 0
        a[diag] += np.where(dead, 1.0, 0.0) + damp * mean_diag
        c, info = lapack.dpotrf(a, lower=0, overwrite_a=1)
        if info == 0:
            inv, info = lapack.dpotri(c, lower=0, overwrite_c=1)
            if info == 0:
                upper, info = lapack.dpotrf(inv, lower=0, overwrite_a=1)
                if info == 0 and np.isfinite(upper).all():
                    for i in range(0, len(upper), 1024):  # clear the lower triangle in place
                        upper[i:i + 1024] = np.triu(upper[i:i + 1024], i)
                    return upper, dead, damp
        del a
        if attempt == max_retries:
            break
        warnings.warn(f"{name}: Hessian not positive definite with damp={damp:g}; retrying with "
                      f"damp={damp * 10:g}", stacklevel=2)
        damp *= 10
    raise JaxcompError(f"{name}: Hessian not positive definite even with damp={damp:g}; raise "
                       "damp or use more calibration data")


def _row_quant(w_row, fmt, scale, zero):
    codes = encode(w_row, fmt, scale, zero)
    return codes, decode(codes, fmt, scale, zero)


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "dynamic_groups", "group"))
def _gptq_rows(w, u, scales, zeros, row_group, *, fmt, block_size, dynamic_groups, group):
    """The GPTQ sweep over padded rows. ``fmt=None`` is the identity quantizer (infinite bits).

    Shapes: w (Kp, N), u (Kp, Kp) upper, scales/zeros (G, N) (zeros ignored for formats
    without), row_group (Kp,) group of each row. Returns codes (Kp, N), the quantized values
    (Kp, N), scales and zeros (updated where groups are dynamic).
    """
    kp, n = w.shape
    nblocks = kp // block_size
    idx = jnp.arange(block_size)

    def quant(w_row, g, scales, zeros):
        if fmt is None:
            return w_row, w_row
        return _row_quant(w_row, fmt, scales[g], zeros[g])

    def block_step(b, carry):
        w, codes, values, scales, zeros = carry
        i1 = b * block_size
        w1 = jax.lax.dynamic_slice(w, (i1, 0), (block_size, n))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (block_size, block_size))

        def row_step(j, c):
            w1, c1, v1, e1, scales, zeros = c
            g = row_group[i1 + j]
            if dynamic_groups:  # a group starts here: its range from the updated rows
                def new_group(sz):
                    rows = jax.lax.dynamic_slice(w1, (j, 0), (group, n))
                    s, z = group_scale_zero(rows[None], fmt)
                    s_all = sz[0].at[g].set(s.reshape(n))
                    z_all = sz[1] if z is None else sz[1].at[g].set(z.reshape(n))
                    return s_all, z_all

                scales, zeros = jax.lax.cond(j % group == 0, new_group, lambda sz: sz,
                                             (scales, zeros))
            w_row = w1[j]
            code, q = quant(w_row, g, scales, zeros)
            err = (w_row - q) / u1[j, j]
            w1 = w1 - jnp.where((idx > j)[:, None], jnp.outer(u1[j], err), 0.0)
            return (w1, c1.at[j].set(code), v1.at[j].set(q), e1.at[j].set(err), scales, zeros)

        zeros_blk = jnp.zeros((block_size, n), w.dtype)
        _, c1, v1, e1, scales, zeros = jax.lax.fori_loop(
            0, block_size, row_step, (w1, zeros_blk, zeros_blk, zeros_blk, scales, zeros))
        # Lazy batch update of every later row (rows up to this block are masked: done).
        u_rows = jax.lax.dynamic_slice(u, (i1, 0), (block_size, kp))
        later = (jnp.arange(kp) >= i1 + block_size)[:, None]
        w = w - jnp.where(later, u_rows.T @ e1, 0.0)
        codes = jax.lax.dynamic_update_slice(codes, c1, (i1, 0))
        values = jax.lax.dynamic_update_slice(values, v1, (i1, 0))
        return w, codes, values, scales, zeros

    init = (w, jnp.zeros_like(w), jnp.zeros_like(w), scales, zeros)
    _, codes, values, scales, zeros = jax.lax.fori_loop(0, nblocks, block_step, init)
    return codes, values, scales, zeros


def gptq_quantize(w, hessian: np.ndarray, fmt: Format | None, *, block_size: int = 128,
                  damp: float = 0.01, act_order: bool = False, name: str = ""
                  ) -> tuple[QArray | jax.Array, dict]:
    """Quantizes a ``(K, N)`` kernel with GPTQ.

    Args:
      w: the kernel (Flax layout: rows are input features).
      hessian: ``(K, K)`` ``X^T X`` of the layer's inputs (e.g. ``InputStats.gram``).
      fmt: the target format; ``None`` is the identity quantizer ("infinite bits": the
        weights come back unchanged, a check of the error propagation).
      block_size: rows per lazy-update block (rounded up to a multiple of the group size).
      damp: Hessian damping as a fraction of its mean diagonal.
      act_order: quantize rows in order of decreasing ``H[k, k]``, with static groups.
      name: param path for messages.

    Returns:
      ``(q, info)``: a :class:`QArray` in ``fmt`` (the float weights when ``fmt`` is None) and
      ``{"damp": damping used, "dead_inputs": count, "proxy_error": tr(D^T H D) / tr(W^T H W)}``
      with ``D = W - dequant(q)``: the relative output error on the calibration inputs.

    Example:
      >>> q, info = gptq_quantize(w, stats.gram, int4(128))  # doctest: +SKIP
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise JaxcompError(f"{name}: GPTQ needs a 2-D kernel, got shape {w.shape}")
    if not bool(jnp.isfinite(w).all()):
        raise JaxcompError(f"{name}: weights contain NaN or Inf")
    k, n = w.shape
    if np.shape(hessian) != (k, k):
        raise JaxcompError(f"{name}: Hessian shape {np.shape(hessian)} does not match the "
                           f"kernel's {k} input features")
    perm = np.argsort(-np.diag(hessian), kind="stable") if act_order else np.arange(k)
    u, dead, damp_used = inverse_hessian_factor(
        np.asarray(hessian)[np.ix_(perm, perm)] if act_order else hessian, damp, name=name)
    grouped = fmt is not None and fmt.granularity == "group"
    rows = group_rows(fmt, k) if fmt is not None else k
    groups = -(-k // rows)
    block = block_size if not grouped else -(-block_size // rows) * rows
    kp = -(-k // block) * block
    # Padded rows: zero weights and identity Hessian rows; zero is exact in every format, so
    # they neither change a group's range nor spread any error.
    w32 = np.array(w, np.float32)
    w32[perm[dead]] = 0.0  # dead inputs: no signal, no weight (reference GPTQ)
    wp = w32[perm] if act_order else w32  # a copy only when permuted
    if kp > k:
        wp = np.concatenate([wp, np.zeros((kp - k, n), np.float32)])
        up = np.zeros((kp, kp), np.float32)
        up[:k, :k] = u
        up[np.arange(k, kp), np.arange(k, kp)] = 1.0
    else:
        up = jnp.asarray(u, jnp.float32)
    del u  # the float64 factor (1 GB at K = 11008)
    row_group = np.zeros(kp, np.int32)
    if grouped:
        row_group[:k] = (np.arange(k) // rows)[perm]
        # dynamic groups: padding past K forms its own all-zero groups; static: the last group
        row_group[k:] = np.arange(k, kp) // rows if not act_order else groups - 1
    dynamic = grouped and not act_order
    if fmt is None:
        scales = zeros = jnp.zeros((1, n), jnp.float32)
    else:
        # Static ranges (act_order, channel, tensor): from the original weights' groups.
        s, z = group_scale_zero(_grouped(jnp.asarray(w32), rows), fmt)
        scales = jnp.broadcast_to(s.reshape(-1, s.shape[-1]), (groups, n)).astype(jnp.float32)
        zeros = (jnp.zeros_like(scales) if z is None
                 else jnp.broadcast_to(z.reshape(-1, z.shape[-1]), (groups, n)))
        if dynamic:  # padded rows of the last block may fall in an extra (all-zero) group
            extra = -(-kp // rows) - groups
            scales = jnp.concatenate([scales, jnp.ones((extra, n), jnp.float32)])
            zeros = jnp.concatenate([zeros, jnp.zeros((extra, n), zeros.dtype)])
    codes, values, scales, zeros = _gptq_rows(
        jnp.asarray(wp), jnp.asarray(up), scales, zeros, jnp.asarray(row_group),
        fmt=fmt, block_size=block, dynamic_groups=dynamic, group=rows)
    inv = np.argsort(perm)
    values = np.asarray(values)[:k][inv]
    info = {"damp": damp_used, "dead_inputs": int(dead.sum()),
            "proxy_error": relative_output_error(hessian, np.asarray(w), values) ** 2}
    if fmt is None:
        return jnp.asarray(values, w.dtype), info
    codes = jnp.asarray(np.asarray(codes)[:k][inv])
    zero_out = None if (not hasattr(fmt, "symmetric") or fmt.symmetric) else zeros[:groups]
    if fmt.granularity == "tensor":
        scales, zero_out = scales[:1, :1], None if zero_out is None else zero_out[:1, :1]
    return build_qarray(codes, scales[:groups], zero_out, fmt, jnp.dtype(w.dtype).name), info
