"""The one bit-packing definition (the Pallas kernels read the same layout).

Codes are unsigned integers ``0 <= c < 2**bits`` in a ``(K, N)`` array, packed along K (axis 0),
independently for each column n:

* rows are taken in groups of 8 (K is padded with zero codes to a multiple of 8);
* the 8 codes ``c_0 .. c_7`` of a group form one little-endian bitstream of ``8 * bits`` bits,
  ``c_j`` occupying bits ``[j*bits, (j+1)*bits)``;
* that bitstream is stored as ``bits`` bytes: packed row ``g*bits + b`` holds bits
  ``[8b, 8b+8)`` of group ``g``.

So int8 is one code per byte, int4 two per byte (``byte = c_even | c_odd << 4``), int2 four per
byte, and int3/5/6/7 straddle byte boundaries. Stored bytes per column: ``ceil(K/8) * bits``
(``= K*bits/8`` for K a multiple of 8). Arithmetic is done in uint32 (Triton rejects shifts on
8-bit ints) and stored as uint8 (orbax cannot store uint4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def packed_rows(num_rows: int, bits: int) -> int:
    """Number of packed uint8 rows for ``num_rows`` codes of ``bits`` bits."""
    return -(-num_rows // 8) * bits


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """Packs ``(K, ...)`` unsigned codes into ``(ceil(K/8)*bits, ...)`` uint8.

    Example:
      >>> pack(jnp.array([[1], [2], [3], [4], [5], [6], [7], [0]]), 4)[:, 0].tolist()
      [33, 67, 101, 7]
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    k = codes.shape[0]
    pad = (-k) % 8
    c = jnp.asarray(codes).astype(jnp.uint32)
    if pad:
        c = jnp.concatenate([c, jnp.zeros((pad, *c.shape[1:]), jnp.uint32)])
    c = c.reshape(-1, 8, *c.shape[1:])  # (groups, 8, ...)
    out = []
    for b in range(bits):  # output byte b of each group
        byte = jnp.zeros_like(c[:, 0])
        for j in range(8):
            lo = j * bits - 8 * b  # where code j's bit 0 lands within byte b
            if lo >= 8 or lo + bits <= 0:
                continue
            byte |= (c[:, j] << lo) if lo >= 0 else (c[:, j] >> -lo)
        out.append(byte & 0xFF)
    packed = jnp.stack(out, axis=1)  # (groups, bits, ...)
    return packed.reshape(-1, *c.shape[2:]).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int, num_rows: int) -> jax.Array:
    """Inverse of :func:`pack`: ``(ceil(K/8)*bits, ...)`` uint8 to ``(K, ...)`` uint32 codes."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    p = jnp.asarray(packed).astype(jnp.uint32)
    p = p.reshape(-1, bits, *p.shape[1:])  # (groups, bits, ...)
    mask = (1 << bits) - 1
    codes = []
    for j in range(8):
        code = jnp.zeros_like(p[:, 0])
        for b in range(bits):
            lo = j * bits - 8 * b
            if lo >= 8 or lo + bits <= 0:
                continue
            code |= (p[:, b] >> lo) if lo >= 0 else (p[:, b] << -lo)
        codes.append(code & mask)
    out = jnp.stack(codes, axis=1).reshape(-1, *p.shape[2:])
    return out[:num_rows]
