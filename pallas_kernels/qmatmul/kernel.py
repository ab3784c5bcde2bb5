"""The Pallas kernel for ``y = x @ dequant(W_packed)``.

Layout it reads (jaxcomp/quant/packing.py): for ``bits`` in {2, 4, 8} a packed byte row ``r``
holds the codes of K rows ``r*P + j``, ``j < P = 8 // bits``, in bits ``[j*bits, (j+1)*bits)``.
So code plane ``j`` is ``(packed >> j*bits) & mask``, a ``(K/P, N)`` matrix that multiplies
the activation columns ``x[:, j::P]``; ``ops.py`` splits x into those planes (cheap: x is small)
and the kernel never interleaves rows (Triton has no value slicing or interleave).

Grid: ``(M / block_m, N / block_n, split_k)``; each program loops over its chunk of K in steps
of one scale group (``block_k`` rows of K, ``block_k / P`` packed rows). A step turns each
plane's ``(block_k/P, block_n)`` codes into floats that are exact -- ``code - zero`` for
integer formats (integers below 256 in magnitude: exact even in bfloat16), the codebook values
for NF4/fp4 -- multiplies them with x on the MMA in float32, and only then multiplies the
``(block_m, block_n)`` product by the group's scale row. The weights are never rounded to the
activation dtype after scaling, and the scale multiply leaves the per-weight loop. K chunks
are equal but for the last; their float32 partial sums are added by XLA (no split: the kernel
writes the result in its dtype). Rows of x past M (padding to ``block_m``) are masked, neither
read nor written. Weights are streamed exactly once per M block, which is what decode
(M <= 16) needs; split-K gives decode enough programs to occupy every SM.

Integer codes (2 and 4 bits) become floats in one of three ways (``Tiling.codes``, data per
backend): ``"convert"``, an int -> float conversion per weight; ``"mantissa"``, OR-ing the code
into the mantissa of bfloat16 128.0 (exponent 7: its seven mantissa bits count in ones, so
the bits read 128 + code) and subtracting ``128 + zero`` in bfloat16, exact and free of
conversions; and ``"ptx"``, the same with the bit work in inline PTX on four packed bytes at
a time (``prmt``, ``shr``, ``lop3``). Hopper converts int to float at a quarter of its
integer-logic rate; on an H100 ``"ptx"`` takes 14-18 % less time than ``"convert"``.
8-bit codes do not fit the seven mantissa bits and always convert. Codebook codes (NF4, fp4)
are looked up in a select chain over the 16 values (31 compares and selects per weight), or
with ``"ptx"`` and bfloat16 activations by a ``prmt`` byte-table lookup in inline PTX, four
weights at a time (:func:`ptx_codebook_asm`; the same bfloat16 weights as the chain, bit for
bit). With float32 activations the chain stays, so the codebook values keep float32.

Backends: GPU lowers through Pallas' **Triton** backend (selected explicitly with
``pallas.triton.CompilerParams``; Mosaic GPU is jax's default), TPU through Mosaic TPU, and
CPU runs it with ``interpret=True`` for correctness. Integer shifts are done in int32 (Triton
rejects pointwise ops on 8-bit ints), and every loaded tile has power-of-two dimensions (Triton
requires it; the number of groups need not be one: each step loads its one scale row).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

CODES = ("convert", "mantissa", "ptx")


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes and launch parameters (data, per backend and regime; see ``ops.TILINGS``)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    min_programs: int = 1  # split K until the grid has this many programs (decode: fill SMs)
    codes: str = "convert"  # how 2/4-bit codes become floats (module docstring)

    def __post_init__(self):
        if self.codes not in CODES:
            raise ValueError(f"Tiling.codes must be one of {CODES}, got {self.codes!r}")


@dataclasses.dataclass(frozen=True)
class KernelFormat:
    """What the kernel needs to know of a ``QArray`` format (static)."""

    bits: int  # 2, 4 or 8
    block_k: int  # K rows per loop step: the group size, or a tile of a per-channel format
    grouped: bool  # one scale row per step (else a single per-channel scale row)
    symmetric: bool  # int: no zero point
    codebook: tuple[float, ...] | None = None  # NF4 / fp4 values, or None for int

    @property
    def planes(self) -> int:
        return 8 // self.bits


_BF16_128 = 0x4300  # bfloat16 128.0: sign 0, exponent 7, mantissa 0 (counts in ones)


def ptx_code_asm(plane: int, bits: int) -> str:
    """Inline PTX: four packed bytes ($2) -> bfloat16 ``128 + code`` of ``plane`` for each byte,
    bytes 0,1 in $0 and 2,3 in $1. ``prmt`` spreads two bytes into the low bytes of two 16-bit
    halves, ``shr`` brings the plane's bits down, ``lop3`` computes ``(t & mask) | 0x4300``."""
    mask = ((1 << bits) - 1) * 0x10001
    shift = plane * bits
    lines = ["{", ".reg .b32 t0, t1, zero, mask, base;", "mov.b32 zero, 0;",
             f"mov.b32 mask, {mask};", "mov.b32 base, 0x43004300;",
             "prmt.b32 t0, $2, zero, 0x4140;", "prmt.b32 t1, $2, zero, 0x4342;"]
    if shift:
        lines += [f"shr.b32 t0, t0, {shift};", f"shr.b32 t1, t1, {shift};"]
    lines += ["lop3.b32 $0, t0, mask, base, 0xEA;", "lop3.b32 $1, t1, mask, base, 0xEA;", "}"]
    return "\n".join(lines)


def _bf16_bits(values) -> list[int]:
    """The 16-bit patterns of ``values`` rounded to bfloat16 as the kernel's select chain
    rounds them (float32 first), so the lookup and the chain give the same weights."""
    return np.asarray(values, np.float32).astype(jnp.bfloat16).view(np.uint16).tolist()


def ptx_codebook_asm(plane: int, codebook: tuple[float, ...]) -> str:
    """Inline PTX: four packed bytes ($2) -> the bfloat16 codebook values of the 4-bit codes
    of ``plane``, bytes 0,1 in $0 and 2,3 in $1: a table lookup by ``prmt``, which picks bytes
    from a pair of registers by 3-bit indices, four at a time. The 16 values' low and high
    bytes are two 16-byte tables, four registers each; the low three code bits index both
    halves of a table and the fourth bit chooses between them (``lop3`` with a byte mask that
    ``prmt``'s sign mode spreads from bit 7 of each byte). 14-15 instructions per 4 weights
    besides the table constants, where the select chain takes 31 compares and selects per
    weight."""
    table = _bf16_bits(codebook) + [0] * (16 - len(codebook))
    word = lambda b: sum(b[i] << 8 * i for i in range(4))  # noqa: E731
    lows = [word([v & 0xFF for v in table[4 * r:4 * r + 4]]) for r in range(4)]
    highs = [word([v >> 8 for v in table[4 * r:4 * r + 4]]) for r in range(4)]
    regs = ".reg .b32 w, t, u, s, m, a, b, lo, hi, l0, l1, l2, l3, h0, h1, h2, h3, zero;"
    lines = ["{", regs, "mov.b32 zero, 0;"]
    lines += [f"mov.b32 l{r}, {lows[r]:#010x};" for r in range(4)]
    lines += [f"mov.b32 h{r}, {highs[r]:#010x};" for r in range(4)]
    if plane:  # high nibbles: bit 3 of each code is already bit 7 of its byte
        lines += ["shr.b32 w, $2, 4;", "prmt.b32 m, $2, zero, 0xBA98;"]
    else:
        lines += ["mov.b32 w, $2;", "shl.b32 u, $2, 4;", "prmt.b32 m, u, zero, 0xBA98;"]
    lines += [
        "and.b32 t, w, 0x07070707;",  # byte i: the low three bits of code i
        "shr.b32 u, t, 4;",
        "or.b32 s, t, u;",  # bytes 0 and 2: two codes' indices each, as nibbles
        "prmt.b32 s, s, zero, 0x20;",  # the low 16 bits: the four indices, a selector
        "prmt.b32 a, l0, l1, s;", "prmt.b32 b, l2, l3, s;",
        "lop3.b32 lo, a, b, m, 0xD8;",  # m ? b : a, bit by bit
        "prmt.b32 a, h0, h1, s;", "prmt.b32 b, h2, h3, s;",
        "lop3.b32 hi, a, b, m, 0xD8;",
        "prmt.b32 $0, lo, hi, 0x5140;", "prmt.b32 $1, lo, hi, 0x7362;", "}"]
    return "\n".join(lines)


def _ptx_bf16(asm: str, packed):
    """uint8 (rows, bn) -> bfloat16 (rows, bn) by ``asm`` on four packed bytes at a time."""
    [out] = pltriton.elementwise_inline_asm(
        asm, args=[packed], constraints="=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, jnp.bfloat16)])
    return out


def _plane_weights(packed, plane: int, zero, kf: KernelFormat, codes: str, dtype):
    """One plane of a (rows, bn) uint8 tile as exact floats in ``dtype``: ``code - zero`` for
    integer formats (``zero`` a (1, bn) float32 row), the codebook values otherwise."""
    if kf.codebook is not None and codes == "ptx" and dtype == jnp.bfloat16:
        return _ptx_bf16(ptx_codebook_asm(plane, kf.codebook), packed)
    if kf.codebook is None and kf.bits <= 4 and codes != "convert":
        if codes == "ptx":
            biased = _ptx_bf16(ptx_code_asm(plane, kf.bits), packed)
        else:
            code = (packed.astype(jnp.int32) >> (plane * kf.bits)) & ((1 << kf.bits) - 1)
            biased = jax.lax.bitcast_convert_type((code | _BF16_128).astype(jnp.uint16),
                                                  jnp.bfloat16)
        # (128 + code) - (128 + zero): both sides and the result are exact in bfloat16.
        return (biased - (zero + 128).astype(jnp.bfloat16)).astype(dtype)
    code = packed.astype(jnp.int32)  # Triton rejects pointwise ops on 8-bit ints
    if kf.planes > 1:
        code = (code >> (plane * kf.bits)) & ((1 << kf.bits) - 1)
    if kf.codebook is None:
        return (code.astype(jnp.float32) - zero).astype(dtype)
    # A select chain over the (static) codebook: no gather in the kernel.
    value = jnp.zeros(code.shape, jnp.float32)
    for i, v in enumerate(kf.codebook):
        value = jnp.where(code == i, jnp.float32(v), value)
    return value.astype(dtype)


def _kernel(x_ref, p_ref, s_ref, z_ref, o_ref, *, kf: KernelFormat, codes: str,
            num_steps: int, chunk: int, m_valid: int | None):
    rows = kf.block_k // kf.planes  # packed rows per step
    first = pl.program_id(2) * chunk  # this program's share of K (split-K): steps first..
    # ..first + chunk, fewer in the last program where chunk does not divide num_steps.
    trip = chunk if num_steps % chunk == 0 else jnp.minimum(chunk, num_steps - first)
    bm = o_ref.shape[0]
    valid = None  # padding rows of x are neither read nor written: a decode M = 1 reads 1/16
    if m_valid is not None and m_valid % bm:
        valid = pl.program_id(0) * bm + jax.lax.broadcasted_iota(jnp.int32, (bm, 1), 0) < m_valid

    def row(ref, i):  # this step's (1, bn) scale or zero-point row, as float32
        return ref[pl.ds(i if kf.grouped else 0, 1), :].astype(jnp.float32)

    def step(i, acc):
        i = first + i
        start = pl.multiple_of(i * rows, rows)
        packed = p_ref[pl.ds(start, rows), :]
        zero = None
        if kf.codebook is None:
            zero = row(z_ref, i) if z_ref is not None else jnp.float32(2 ** (kf.bits - 1))
        d = None
        for j in range(kf.planes):
            if valid is None:
                x = x_ref[j, :, pl.ds(start, rows)]
            else:
                x = pltriton.load(x_ref.at[jnp.int32(j), :, pl.ds(start, rows)], mask=valid,
                                   other=0)
            w = _plane_weights(packed, j, zero, kf, codes, x.dtype)
            # HIGHEST keeps f32 activations in f32 on GPUs (no TF32 rounding).
            dj = jnp.dot(x, w, preferred_element_type=jnp.float32,
                         precision=jax.lax.Precision.HIGHEST)
            d = dj if d is None else d + dj
        return acc + d * row(s_ref, i)

    acc = jax.lax.fori_loop(0, trip, step, jnp.zeros(o_ref.shape, jnp.float32))
    if valid is None:
        o_ref[...] = acc.astype(o_ref.dtype)
    else:
        pltriton.store(o_ref, acc.astype(o_ref.dtype), mask=valid)


def qmatmul_planes(x_planes, packed, scales, zeros, kf: KernelFormat, tiling: Tiling, *,
                   backend: str, split_k: int = 1, m_valid: int | None = None,
                   out_dtype=jnp.float32):
    """Runs the kernel on pre-split activations.

    Args:
      x_planes: (P, M, K/P) activations, plane j holding ``x[:, j::P]``; M a multiple of
        ``tiling.block_m``, K a multiple of ``kf.block_k``.
      packed: (K/P, N) uint8 packed codes; N a multiple of ``tiling.block_n``.
      scales: (G, N) scales; zeros: (G, N) zero points or ``None``.
      kf: the format; tiling: tile sizes.
      backend: ``"gpu"`` (Triton), ``"tpu"`` (Mosaic) or ``"interpret"``.
      split_k: number of K chunks (at most the number of K steps; chunks of equal size but
        the last, whose float32 partial sums XLA adds).
      m_valid: the rows of ``x_planes`` that hold activations (the rest pad M to a multiple
        of ``block_m``): padding rows are then masked, neither read nor written (Triton and
        interpret only: Mosaic TPU has no masked loads). ``None``: every row is read.
      out_dtype: the result's dtype (written by the kernel itself when ``split_k`` is 1).

    Returns:
      (m_valid or M, N) ``x @ dequant(W)`` in ``out_dtype``.
    """
    if tiling.codes == "ptx" and backend != "gpu":
        raise ValueError(f"Tiling.codes='ptx' is inline PTX, for the gpu backend only, not "
                         f"{backend}")
    planes, m, kp = x_planes.shape
    n = packed.shape[1]
    bm, bn = tiling.block_m, tiling.block_n
    num_steps = kp // (kf.block_k // kf.planes)
    chunk = -(-num_steps // split_k)
    split_k = -(-num_steps // chunk)  # no empty chunks
    rows_out = m if m_valid is None else m_valid
    in_specs = [
        pl.BlockSpec((planes, bm, kp), lambda i, j, s: (0, i, 0)),
        pl.BlockSpec((kp, bn), lambda i, j, s: (0, j)),
        pl.BlockSpec((scales.shape[0], bn), lambda i, j, s: (0, j)),
    ]
    args = [x_planes, packed, scales]
    if zeros is not None:
        in_specs.append(pl.BlockSpec((zeros.shape[0], bn), lambda i, j, s: (0, j)))
        args.append(zeros)
        kernel = functools.partial(_kernel, kf=kf, codes=tiling.codes, num_steps=num_steps,
                                   chunk=chunk, m_valid=m_valid)
    else:
        def kernel(x_ref, p_ref, s_ref, o_ref):
            _kernel(x_ref, p_ref, s_ref, None, o_ref, kf=kf, codes=tiling.codes,
                    num_steps=num_steps, chunk=chunk, m_valid=m_valid)
    params = {}
    if backend == "gpu":
        params["compiler_params"] = pltriton.CompilerParams(num_warps=tiling.num_warps,
                                                            num_stages=tiling.num_stages)
    elif backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel"))
    if split_k == 1:  # the kernel writes the result (an M block may overhang m_valid rows)
        out_shape = jax.ShapeDtypeStruct((rows_out, n), out_dtype)
        out_spec = pl.BlockSpec((bm, bn), lambda i, j, s: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((split_k, rows_out, n), jnp.float32)
        out_spec = pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(m // bm, n // bn, split_k),
        in_specs=in_specs,
        out_specs=out_spec,
        interpret=backend == "interpret",
        name=f"qmatmul_{'cb' if kf.codebook else 'int'}{kf.bits}",
        **params,
    )(*args)
    return out if split_k == 1 else out.sum(axis=0).astype(out_dtype)
