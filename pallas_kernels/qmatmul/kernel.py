"""The Pallas kernel for ``y = x @ dequant(W_packed)``.

Layout it reads (jaxcomp/quant/packing.py): for ``bits`` in {2, 4, 8} a packed byte row ``r``
holds the codes of K rows ``r*P + j``, ``j < P = 8 // bits``, in bits ``[j*bits, (j+1)*bits)``.
So code plane ``j`` is ``(packed >> j*bits) & mask``, a ``(K/P, N)`` matrix that multiplies
the activation columns ``x[:, j::P]``; ``ops.py`` splits x into those planes (cheap: x is small)
and the kernel never interleaves rows (Triton has no value slicing or interleave).

Grid: ``(M / block_m, N / block_n, split_k)``; each program loops over its share of K in steps
of one scale group (``block_k`` rows of K, ``block_k / P`` packed rows), dequantizing a
``(block_k/P, block_n)`` tile per plane in the activation dtype and accumulating ``x_j @ w_j``
in float32; the ``split_k`` partial sums are added by XLA. Weights are streamed exactly once
per M block, which is what decode (M <= 16) needs; split-K gives decode enough programs to
occupy every SM.

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
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Tile sizes and launch parameters (data, per backend and regime; see ``ops.TILINGS``)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    min_programs: int = 1  # split K until the grid has this many programs (decode: fill SMs)


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


def _dequant_tile(code, scale, zero, kf: KernelFormat, dtype):
    """(rows, bn) int32 codes -> values in ``dtype``."""
    if kf.codebook is not None:
        # A select chain over the (static) codebook: no gather in the kernel.
        value = jnp.zeros(code.shape, jnp.float32)
        for i, v in enumerate(kf.codebook):
            value = jnp.where(code == i, jnp.float32(v), value)
    elif kf.symmetric:
        value = (code - 2 ** (kf.bits - 1)).astype(jnp.float32)
    else:
        value = code.astype(jnp.float32) - zero
    return (value * scale).astype(dtype)


def _kernel(x_ref, p_ref, s_ref, z_ref, o_ref, *, kf: KernelFormat, num_steps: int):
    rows = kf.block_k // kf.planes  # packed rows per step
    first = pl.program_id(2) * num_steps  # this program's share of K (split-K)
    mask = (1 << kf.bits) - 1

    def row(ref, i):  # this step's (1, bn) scale or zero-point row, as float32
        if ref is None:
            return None
        return ref[pl.ds(i if kf.grouped else 0, 1), :].astype(jnp.float32)

    def step(i, acc):
        i = first + i
        start = pl.multiple_of(i * rows, rows)
        packed = p_ref[pl.ds(start, rows), :].astype(jnp.int32)
        scale, zero = row(s_ref, i), row(z_ref, i)
        for j in range(kf.planes):
            code = (packed >> (j * kf.bits)) & mask if kf.planes > 1 else packed
            x = x_ref[j, :, pl.ds(start, rows)]
            w = _dequant_tile(code, scale, zero, kf, x.dtype)
            # HIGHEST keeps f32 activations in f32 on GPUs (no TF32 rounding).
            acc += jnp.dot(x, w, preferred_element_type=jnp.float32,
                           precision=jax.lax.Precision.HIGHEST)
        return acc

    acc = jax.lax.fori_loop(0, num_steps, step, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc


def qmatmul_planes(x_planes, packed, scales, zeros, kf: KernelFormat, tiling: Tiling, *,
                   backend: str, split_k: int = 1):
    """Runs the kernel on pre-split activations.

    Args:
      x_planes: (P, M, K/P) activations, plane j holding ``x[:, j::P]``; M a multiple of
        ``tiling.block_m``, K a multiple of ``kf.block_k``.
      packed: (K/P, N) uint8 packed codes; N a multiple of ``tiling.block_n``.
      scales: (G, N) scales; zeros: (G, N) zero points or ``None``.
      kf: the format; tiling: tile sizes.
      backend: ``"gpu"`` (Triton), ``"tpu"`` (Mosaic) or ``"interpret"``.
      split_k: number of K chunks (must divide the number of K steps).

    Returns:
      (M, N) float32 ``x @ dequant(W)``.
    """
    planes, m, kp = x_planes.shape
    n = packed.shape[1]
    bm, bn = tiling.block_m, tiling.block_n
    num_steps = kp // (kf.block_k // kf.planes) // split_k
    in_specs = [
        pl.BlockSpec((planes, bm, kp), lambda i, j, s: (0, i, 0)),
        pl.BlockSpec((kp, bn), lambda i, j, s: (0, j)),
        pl.BlockSpec((scales.shape[0], bn), lambda i, j, s: (0, j)),
    ]
    args = [x_planes, packed, scales]
    if zeros is not None:
        in_specs.append(pl.BlockSpec((zeros.shape[0], bn), lambda i, j, s: (0, j)))
        args.append(zeros)
        kernel = functools.partial(_kernel, kf=kf, num_steps=num_steps)
    else:
        def kernel(x_ref, p_ref, s_ref, o_ref):
            _kernel(x_ref, p_ref, s_ref, None, o_ref, kf=kf, num_steps=num_steps)
    params = {}
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        params["compiler_params"] = pltriton.CompilerParams(num_warps=tiling.num_warps,
                                                            num_stages=tiling.num_stages)
    elif backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        params["compiler_params"] = pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel"))
    partial = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split_k, m, n), jnp.float32),
        grid=(m // bm, n // bn, split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bm, bn), lambda i, j, s: (s, i, j)),
        interpret=backend == "interpret",
        name=f"qmatmul_{'cb' if kf.codebook else 'int'}{kf.bits}",
        **params,
    )(*args)
    return partial[0] if split_k == 1 else partial.sum(axis=0)
