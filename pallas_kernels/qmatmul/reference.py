"""Float64 NumPy reference for ``x @ dequant(W)``: unpack, dequantize, matmul (no JAX)."""

from __future__ import annotations

import numpy as np


def unpack_np(packed: np.ndarray, bits: int, num_rows: int) -> np.ndarray:
    """Codes from jaxcomp's packing (see ``jaxcomp/quant/packing.py``), bit by bit."""
    packed = np.asarray(packed, np.uint8)
    groups = packed.shape[0] // bits
    stream = np.unpackbits(packed.reshape(groups, bits, -1), axis=1, bitorder="little")
    # stream: (groups, 8*bits, N), bit t of the group's bitstream; code j = bits j*b..j*b+b-1
    weights = (1 << np.arange(bits)).reshape(1, 1, bits, 1)
    codes = (stream.reshape(groups, 8, bits, -1) * weights).sum(axis=2)
    return codes.reshape(groups * 8, -1)[:num_rows]


def dequantize_np(q) -> np.ndarray:
    """``QArray`` -> float64 (K, N), from its fields and format alone."""
    fmt = q.fmt
    k, n = q.orig_shape
    codes = unpack_np(np.asarray(q.packed), fmt.bits, k).astype(np.float64)
    rows = fmt.group_size if fmt.granularity == "group" else k
    scales = np.repeat(np.asarray(q.scales, np.float64), rows, axis=0)[:k]
    if hasattr(fmt, "values"):
        return np.asarray(fmt.values, np.float64)[codes.astype(np.int64)] * scales
    if fmt.symmetric:
        return (codes - 2 ** (fmt.bits - 1)) * scales
    zeros = np.repeat(np.asarray(q.zeros, np.float64), rows, axis=0)[:k]
    return (codes - zeros) * scales


def qmatmul_reference(x, q) -> np.ndarray:
    """``x @ dequant(q)`` in float64."""
    return np.asarray(x, np.float64) @ dequantize_np(q)
