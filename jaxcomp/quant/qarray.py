"""``QArray``: a quantized ``(K, N)`` kernel holding bit-packed codes and group scales."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.quant.formats import Format, IntFormat
from jaxcomp.quant.packing import unpack


def group_rows(fmt: Format, num_rows: int) -> int:
    """Rows of K per scale group (the last group may be shorter)."""
    return fmt.group_size if fmt.granularity == "group" else num_rows


def expand_groups(per_group: jax.Array, rows: int, num_rows: int) -> jax.Array:
    """(G, N) per-group values -> (K, N) per-row values."""
    groups, n = per_group.shape
    full = jnp.broadcast_to(per_group[:, None, :], (groups, rows, n)).reshape(groups * rows, n)
    return full[:num_rows]


def dequantize_codes(codes, scales, zeros, fmt: Format, num_rows: int, dtype):
    """Codes (K, N) -> values in ``dtype``; the one dequantization rule of every format."""
    rows = group_rows(fmt, num_rows)
    scale = expand_groups(scales.astype(dtype), rows, num_rows)
    if isinstance(fmt, IntFormat):
        if fmt.symmetric:
            offset = jnp.asarray(2 ** (fmt.bits - 1), dtype)
        else:
            offset = expand_groups(zeros.astype(dtype), rows, num_rows)
        return (codes.astype(dtype) - offset) * scale
    table = jnp.asarray(fmt.values, dtype)
    return jnp.take(table, codes.astype(jnp.int32), axis=0) * scale


@flax.struct.dataclass
class QArray(CompressedLeaf):
    """A quantized kernel ``W`` of shape ``(K, N)``.

    Reconstruction invariant: ``W ≈ materialize()`` with, per column n and row k in group
    ``g = k // group_rows``:

    * asymmetric int: ``W[k, n] ≈ (code[k, n] - zeros[g, n]) * scales[g, n]``;
    * symmetric int: ``W[k, n] ≈ (code[k, n] - 2^(bits-1)) * scales[g, n]``;
    * codebook (NF, fp8, fp4): ``W[k, n] ≈ fmt.values[code[k, n]] * scales[g, n]``;

    and ``|W - materialize()| <= scales/2`` per element for int formats (half a step).
    ``code`` is stored bit-packed (:mod:`jaxcomp.quant.packing`).

    Attributes:
      packed: ``(ceil(K/8) * bits, N)`` uint8 packed codes.
      scales: ``(G, N)`` scales (``(1, 1)`` per tensor) in the format's scale dtype.
      zeros: ``(G, N)`` uint8 integer zero points (asymmetric int) or ``None``.
      fmt: the format (static).
      orig_shape: ``(K, N)`` (static).
      orig_dtype: dtype name of the original weights (static).
    """

    packed: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    fmt: Format = flax.struct.field(pytree_node=False)
    orig_shape: tuple[int, int] = flax.struct.field(pytree_node=False)
    orig_dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.orig_shape)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.orig_dtype)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def codes(self) -> jax.Array:
        """Unpacked ``(K, N)`` codes."""
        return unpack(self.packed, self.fmt.bits, self.orig_shape[0])

    def dequantize(self, dtype=None) -> jax.Array:
        """The ``(K, N)`` weights in ``dtype`` (default: the original dtype)."""
        dtype = self.dtype if dtype is None else dtype
        return dequantize_codes(self.codes(), self.scales, self.zeros, self.fmt,
                                self.orig_shape[0], dtype)

    def materialize(self) -> jax.Array:
        return self.dequantize()

    def left_matmul(self, x: jax.Array) -> jax.Array:
        """``x @ W``: the Pallas kernel where :mod:`jaxcomp.core.dispatch` picks it and the
        format/shape is supported, else dequantize-then-matmul in XLA."""
        from jaxcomp.core.dispatch import kernel_backend

        backend = kernel_backend()
        if backend is not None:
            from pallas_kernels.qmatmul import qmatmul, supported

            if supported(self, x.shape, backend):
                return qmatmul(x, self, backend)
        # Without a data dependency on x, XLA schedules every layer's dequantization at the
        # start of the program and keeps a dense copy of the whole model alive (measured:
        # 434 MB of temps for SmolLM2 vs 12 MB dense). Adding 0 * x[0] to the scales (not
        # foldable for floats: 0 * NaN is NaN) makes each dequantization wait for its input,
        # so one layer's dense weight lives at a time. (optimization_barrier is dropped by
        # XLA:CPU and did not help.)
        dep = (x.reshape(-1)[0] * 0).astype(self.scales.dtype)
        scales = self.scales + dep
        w = dequantize_codes(self.codes(), scales, self.zeros, self.fmt, self.orig_shape[0],
                             x.dtype)
        return jnp.matmul(x, w)

    @property
    def num_params(self) -> int:
        """Scalars stored: one code per weight (not per byte), plus scales and zeros."""
        k, n = self.orig_shape
        extra = 0 if self.zeros is None else int(np.prod(self.zeros.shape))
        return k * n + int(np.prod(self.scales.shape)) + extra
