"""Low-rank matrices ``W ≈ U @ V``: truncated SVD and activation-aware SVD (ASVD).

The plain SVD minimizes the weight error ``||W - UV||_F``. What matters is the layer's output
error ``||X W - X U V||_F`` on real inputs ``X``; ASVD (Yuan et al., 2023) scales input channel
``j`` by ``s_j = rms_j(X)^alpha`` before the SVD and unscales ``U`` after, so channels that carry
large activations are approximated more carefully.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf, factor_array, factor_num_params
from jaxcomp.errors import JaxcompError


@flax.struct.dataclass
class LowRank(CompressedLeaf):
    """A ``(m, n)`` kernel of rank ``r``: ``W ≈ materialize() = u @ v``.

    Attributes:
      u: ``(m, r)`` factor (or a compressed leaf of it after chaining quantize).
      v: ``(r, n)`` factor (likewise).
      orig_shape: ``(m, n)`` (static).
      orig_dtype: dtype name of the original weights (static).
    """

    u: jax.Array
    v: jax.Array
    orig_shape: tuple[int, int] = flax.struct.field(pytree_node=False)
    orig_dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.orig_shape)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.orig_dtype)

    @property
    def rank(self) -> int:
        return self.u.shape[1]

    def materialize(self) -> jax.Array:
        return factor_array(self.u, self.dtype) @ factor_array(self.v, self.dtype)

    def left_matmul(self, x: jax.Array) -> jax.Array:
        """``(x @ u) @ v``: ``r (m + n)`` multiply-adds per row instead of ``m n``."""
        return (x @ factor_array(self.u, x.dtype)) @ factor_array(self.v, x.dtype)

    def map_factors(self, fn) -> LowRank:
        return self.replace(u=fn(self.u, "u"), v=fn(self.v, "v"))

    @property
    def num_params(self) -> int:
        return factor_num_params(self.u) + factor_num_params(self.v)


def rank_for_params(shape, target_params: int, name: str = "") -> int:
    """The largest rank whose factors hold at most ``target_params`` scalars."""
    m, n = shape
    rank = min(target_params // (m + n), min(m, n))
    if rank < 1:
        raise JaxcompError(f"{name or 'matrix'}: a target of {target_params:,} parameters cannot "
                           f"be met: rank 1 already needs {m + n:,}")
    return rank


def channel_scales(gram, count: int, alpha: float = 0.5) -> np.ndarray:
    """ASVD's per-input-channel scales ``rms(x_j)^alpha`` from an input Gram matrix ``X^T X``
    over ``count`` rows (zero-activity channels get the smallest non-zero scale)."""
    rms = np.sqrt(np.maximum(np.diag(np.asarray(gram, np.float64)), 0.0) / max(count, 1))
    positive = rms[rms > 0]
    floor = positive.min() if positive.size else 1.0
    return np.maximum(rms, floor) ** alpha


def svd_factors(w, rank: int | None = None, param_ratio: float | None = None,
                in_scales=None, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Rank-``r`` factors ``(u, v)`` of ``w`` (float64 numpy), optionally activation-aware.

    Args:
      w: ``(m, n)`` matrix.
      rank: target rank; or ``param_ratio``: keep at most this fraction of ``m * n`` scalars.
      in_scales: ``(m,)`` positive input-channel scales (ASVD); ``None`` for the plain SVD.
      name: parameter path for error messages.

    Returns:
      ``u`` ``(m, r)`` and ``v`` ``(r, n)`` with the singular values split evenly
      (``sqrt(s)`` on each side), so both factors have comparable scale for training.

    Example:
      >>> u, v = svd_factors(np.eye(4), rank=2)
    """
    if np.ndim(w) != 2:
        raise JaxcompError(f"{name or 'svd'}: needs a 2-D matrix, got shape {np.shape(w)}")
    w = np.asarray(w, np.float64)
    m, n = w.shape
    if param_ratio is not None:
        if not 0 < param_ratio <= 1:
            raise JaxcompError(f"{name or 'svd'}: param_ratio must be in (0, 1], "
                               f"got {param_ratio}")
        rank = rank_for_params(w.shape, int(param_ratio * m * n), name)
    if rank is None or not 1 <= rank <= min(m, n):
        raise JaxcompError(f"{name or 'svd'}: rank must be in [1, {min(m, n)}], got {rank}")
    s_in = np.ones(m) if in_scales is None else np.asarray(in_scales, np.float64)
    if s_in.shape != (m,) or not np.all(s_in > 0):
        raise JaxcompError(f"{name or 'svd'}: in_scales must be {m} positive numbers")
    u, s, vt = np.linalg.svd(s_in[:, None] * w, full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root) / s_in[:, None], root[:, None] * vt[:rank]


def low_rank(w, rank: int | None = None, *, param_ratio: float | None = None, in_scales=None,
             name: str = "") -> LowRank:
    """Factorizes ``w`` into a :class:`LowRank` leaf (see :func:`svd_factors`).

    Example:
      >>> lr = low_rank(w, param_ratio=0.3)  # doctest: +SKIP
    """
    u, v = svd_factors(w, rank, param_ratio, in_scales, name)
    dtype = jnp.dtype(w.dtype)
    return LowRank(u=jnp.asarray(u, dtype), v=jnp.asarray(v, dtype), orig_shape=tuple(w.shape),
                   orig_dtype=dtype.name)
