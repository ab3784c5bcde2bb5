"""SmoothQuant (Xiao et al. 2023) on plain arrays: the smoothing-scale math.

Per-token activation quantization suffers from a few input channels with huge magnitudes
(outliers that persist across tokens); weights are easy to quantize. SmoothQuant rewrites a
group of linears sharing an input ``X`` as ``X W = (X diag(s)^-1) (diag(s) W)`` with

    ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``

(``max|W_j|`` over every output column of every kernel in the group), which moves part of
each channel's range from the activations to the weights. After smoothing, channel ``j`` has
``max|X_j / s_j| = max|X_j|^(1-alpha) max|W_j|^(1-alpha)`` and
``max|s_j W_j| = max|X_j|^alpha max|W_j|^alpha``: at ``alpha = 0.5`` both are
``sqrt(max|X_j| max|W_j|)``, balanced. The ``1/s`` is folded into the op producing ``X``
(:mod:`jaxcomp.quant.awq_transform`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from jaxcomp.errors import JaxcompError


def weight_absmax(weights: Sequence[jax.typing.ArrayLike]) -> np.ndarray:
    """Per-input-channel ``max |W_j|`` over all output columns of kernels sharing an input.

    Args:
      weights: ``(K, N_i)`` kernels.

    Returns:
      ``(K,)`` float64.

    Example:
      >>> weight_absmax([np.array([[1.0, -3.0]]), np.array([[2.0]])])
      array([3.])
    """
    rows = [np.max(np.abs(np.asarray(w, np.float64)), axis=1) for w in weights]
    if not rows or any(r.shape != rows[0].shape for r in rows):
        raise JaxcompError("kernels sharing an input must have the same number of rows, got "
                           f"{[np.shape(w) for w in weights]}")
    return np.max(np.stack(rows), axis=0)


def smooth_scales(act_absmax: jax.typing.ArrayLike, w_absmax: jax.typing.ArrayLike,
                  alpha: float = 0.5, eps: float = 1e-5) -> np.ndarray:
    """SmoothQuant's scales ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)``.

    Args:
      act_absmax: ``(K,)`` per-channel ``max |X_j|`` over the calibration tokens.
      w_absmax: ``(K,)`` per-channel ``max |W_j|`` (:func:`weight_absmax`).
      alpha: migration strength in ``[0, 1]`` (0.5 balances the two; larger moves more of the
        activation range into the weights).
      eps: a channel whose activation or weight maximum is below ``eps`` (dead in the
        calibration data, or with all-zero weights) keeps ``s_j = 1``: there is nothing to
        balance, and an extreme scale would blow up inputs the calibration never showed.

    Returns:
      ``(K,)`` float64 positive scales: divide the input by them, multiply weight rows.

    Example:
      >>> smooth_scales(np.array([100.0, 1.0]), np.array([1.0, 1.0]), alpha=0.5)
      array([10.,  1.])
    """
    if not 0.0 <= alpha <= 1.0:
        raise JaxcompError(f"alpha must be in [0, 1], got {alpha!r}")
    ax = np.asarray(act_absmax, np.float64)
    aw = np.asarray(w_absmax, np.float64)
    if ax.shape != aw.shape or ax.ndim != 1:
        raise JaxcompError(f"activation and weight maxima must be (K,) vectors of one length, "
                           f"got {ax.shape} and {aw.shape}")
    if not (np.all(np.isfinite(ax)) and np.all(np.isfinite(aw))):
        raise JaxcompError("activation or weight maxima contain NaN or Inf")
    live = (ax > eps) & (aw > eps)
    ax, aw = np.where(live, ax, 1.0), np.where(live, aw, 1.0)
    return np.where(live, ax**alpha / aw ** (1.0 - alpha), 1.0)
