"""Quantization-aware training: ``QATArray``, a trainable master weight seen through fake
quantization, and the conversions from and to packed ``QArray`` leaves.

Forward: the layer multiplies by ``dequantize(quantize(w))``. Backward: a straight-through
estimator inside the format's range (``d/dw = 1`` where ``w`` is not clipped, 0 where it is).
With learned step sizes (LSQ, Esser et al. 2020) the group scales are trainable too, with LSQ's
gradient ``q - w/s`` inside the range and the clipping bound outside, scaled by
``1/sqrt(group_rows * q_max)``.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.quant.formats import Format, IntFormat
from jaxcomp.quant.packing import pack
from jaxcomp.quant.qarray import QArray, expand_groups, group_rows
from jaxcomp.quant.rtn import fake_quantize, quantize_array


def _code_range(fmt: Format) -> tuple[float, float]:
    """Range of ``u = w / s (+ zero)`` in the quantized domain."""
    if isinstance(fmt, IntFormat):
        if fmt.symmetric:
            return -(2.0 ** (fmt.bits - 1)), 2.0 ** (fmt.bits - 1) - 1
        return 0.0, 2.0**fmt.bits - 1
    return float(min(fmt.values)), float(max(fmt.values))


def _round(u: jax.Array, fmt: Format) -> jax.Array:
    """Nearest representable value in the quantized domain (no gradient)."""
    if isinstance(fmt, IntFormat):
        return jnp.round(u)
    values = np.asarray(fmt.values, np.float32)
    mid = jnp.asarray((values[1:] + values[:-1]) / 2)
    return jnp.asarray(values)[jnp.searchsorted(mid, u)]


def _lsq_fake_quant(w, scales, zeros, fmt: Format) -> jax.Array:
    """``w`` fake-quantized with the given (learnable) group scales, LSQ gradients."""
    k = w.shape[0]
    rows = group_rows(fmt, k)
    lo, hi = _code_range(fmt)
    # LSQ's gradient scale for the step size; the forward value is unchanged.
    g = 1.0 / np.sqrt(rows * max(abs(lo), abs(hi)))
    s = scales * g + jax.lax.stop_gradient(scales - scales * g)
    # The forward pass sees the scale as stored (bf16 by default), the gradient the float.
    stored = jax.lax.stop_gradient(s.astype(fmt.scale_dtype).astype(s.dtype) - s)
    s = expand_groups(s + stored, rows, k)
    z = 0.0 if zeros is None else expand_groups(zeros.astype(w.dtype), rows, k)
    u = w / s + z
    clipped = jnp.clip(u, lo, hi)
    q = clipped + jax.lax.stop_gradient(_round(clipped, fmt) - clipped)
    return (q - z) * s


@flax.struct.dataclass
class QATArray(CompressedLeaf):
    """A ``(K, N)`` kernel trained through fake quantization in format ``fmt``.

    Reconstruction invariant: ``materialize()`` equals ``to_qarray().materialize()`` (the
    packed weights the training forward pass saw), up to float rounding.

    Attributes:
      w: ``(K, N)`` float32 master weights (trainable).
      scales: ``(G, N)`` float32 learned group scales (LSQ), or ``None``: scales follow ``w``
        by round-to-nearest at every step.
      zeros: ``(G, N)`` uint8 zero points for learned asymmetric scales (fixed), else ``None``.
      fmt: the format (static).
    """

    w: jax.Array
    scales: jax.Array | None
    zeros: jax.Array | None
    fmt: Format = flax.struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.w.shape)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.w.dtype)

    def materialize(self) -> jax.Array:
        if self.scales is None:
            return fake_quantize(self.w, self.fmt)
        return _lsq_fake_quant(self.w, self.scales, self.zeros, self.fmt)

    def to_qarray(self) -> QArray:
        """The packed ``QArray`` holding exactly the weights the forward pass used."""
        if self.scales is None:
            return quantize_array(self.w, self.fmt)
        k, n = self.w.shape
        rows = group_rows(self.fmt, k)
        lo, hi = _code_range(self.fmt)
        scales = self.scales.astype(self.fmt.scale_dtype)
        s = expand_groups(scales.astype(jnp.float32), rows, k)
        z = 0.0 if self.zeros is None else expand_groups(self.zeros.astype(jnp.float32), rows, k)
        q = _round(jnp.clip(self.w.astype(jnp.float32) / s + z, lo, hi), self.fmt)
        if isinstance(self.fmt, IntFormat):
            codes = q - lo  # symmetric codes are offset by 2^(bits-1), asymmetric by 0
        else:
            codes = jnp.searchsorted(jnp.asarray(self.fmt.values, jnp.float32), q)
        return QArray(pack(codes.astype(jnp.uint32), self.fmt.bits), scales, self.zeros,
                      self.fmt, (k, n), "float32")


def to_qat(q: QArray, lsq: bool = False, master: jax.Array | None = None) -> QATArray:
    """A packed ``QArray`` as trainable master weights: ``master`` (e.g. the unquantized
    weights it came from) or else its dequantized values; its scales are the initial learned
    step sizes when ``lsq``."""
    w = q.dequantize(jnp.float32) if master is None else jnp.asarray(master, jnp.float32)
    if not lsq:
        return QATArray(w, None, None, q.fmt)
    return QATArray(w, q.scales.astype(jnp.float32), q.zeros, q.fmt)


def _is_q(x) -> bool:
    return isinstance(x, (QArray, QATArray))


def prepare_qat(tree, lsq: bool = False, originals=None):
    """Every ``QArray`` in ``tree`` (nested ones included, e.g. quantized TT cores) becomes a
    ``QATArray``; the rest is unchanged.

    Args:
      tree: a params pytree.
      lsq: learn the group scales (LSQ) instead of following the master weights by RTN.
      originals: optional pytree of the same paths (the uncompressed params): a ``QArray``
        whose path holds a dense array of the same shape there starts from those weights
        (standard QAT from full precision), others from their dequantized values.
    """
    masters = {}
    if originals is not None:
        masters = {jax.tree_util.keystr(k): v
                   for k, v in jax.tree_util.tree_flatten_with_path(originals)[0]}

    def convert(path, x):
        if not isinstance(x, QArray):
            return x
        master = masters.get(jax.tree_util.keystr(path))
        if master is not None and tuple(np.shape(master)) != x.shape:
            master = None
        return to_qat(x, lsq, master)

    return jax.tree_util.tree_map_with_path(convert, tree, is_leaf=_is_q)


def finalize_qat(tree):
    """Every ``QATArray`` in ``tree`` becomes the packed ``QArray`` it was trained as."""
    return jax.tree.map(lambda x: x.to_qarray() if isinstance(x, QATArray) else x, tree,
                        is_leaf=_is_q)
