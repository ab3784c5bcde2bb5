"""Mosaic GPU (Hopper) int4 group-quantized decode kernel: an experiment, not dispatched.

``y = x @ dequant(W)`` for M <= 16 rows of bfloat16 activations and an int4 ``QArray`` with
per-group scales, computed transposed ("swap AB") so the weights fill the 64-row side of the
tensor core: ``y^T (N, 16) = dequant(W)^T (N, K) @ x^T (K, 16)``. Per program (one warpgroup):
a ``block_n``-row slab of ``W^T`` and one K chunk (split-K, float32 partial sums added by XLA).
A TMA pipeline (``emit_pipeline``, ``max_concurrent_steps`` deep) streams each step's codes,
scale and zero rows and ``x^T`` rows into shared memory; each scale group's codes are loaded to
registers, converted int4 -> bfloat16 (Mosaic's upcast layout and bit-trick conversion),
dequantized as ``(code - zero) * scale`` in bfloat16 (Machete's order: the MMA then needs one
accumulator), and fed to ``wgmma`` with A from registers and ``x^T`` from shared memory; with
``wgmma_in_flight = n`` the last n steps' MMAs keep running while the next step dequantizes
(their ``x^T`` buffers are released n steps late, jax's Hopper matmul pattern).

Why it exists: the Triton kernel (``kernel.py``) is latency-bound on an H100 (1.48x dense bf16
at 4096x11008 against the 3x goal; BENCHMARKS.md): its weight tiles go through shared memory
and come back byte-wise, with a per-weight register shuffle. TMA + wgmma with the weights as
the MMA's register operand is the structural change that remains. It is **not yet timed on a
GPU**: ``scripts/bench/kernel_profile.py --paths mosaic`` (and ``--sweep mosaic=...``) times it
on prepared weights against dense bf16, and ``gpu_kernels.sh`` runs that; only a measured win
earns it a place in ``QArray.left_matmul``'s dispatch.

Layout: wgmma wants A rows along N with K contiguous, so the weights are re-laid once by
:func:`prepare` (the same transposition ``scripts/bench/patches/n_major_packed.patch``
proposes for all formats): ``codes`` (N, K) signed int4 = unsigned code - 8 (Mosaic converts
signed int4 to bfloat16 by a bit trick), ``zeros`` (K/g, N) =
zero point - 8 (so ``code - zero`` is unchanged), ``scales`` (K/g, N) bfloat16; K zero-padded
to a multiple of ``PAD_GROUPS`` groups (x gets as many zero columns per call).

Numerics: the dequantized weight is rounded to bfloat16 before the MMA (the XLA path's
``dequantize(bfloat16)`` does the same); accumulation is float32. Verification on the CPU:
Mosaic GPU's interpret mode runs the kernel (TMA copies, barriers, pipeline, wgmma) against a
float64 reference; the interpreter's wgmma reads A only from shared memory, so there the
dequantized tile is stored to a scratch buffer first -- the one difference from the GPU
program, whose register-A wgmma is checked by lowering for cuda (Mosaic's layout inference and
Python-side lowering run on the CPU; PTX generation happens in the CUDA plugin at compile
time, and that plugin needs a GPU). The interpreter's wgmma is synchronous: it checks the
delayed-release fetch schedule of ``wgmma_in_flight``, not that the overlap is race-free.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxcomp.quant.formats import IntFormat
from jaxcomp.quant.packing import unpack

MAX_M = 16  # x^T is padded to 16 columns: wgmma's N, and the smallest 32-byte swizzle of bf16
# prepare() zero-pads K to a multiple of this many scale groups, so that split K has divisors
# to choose from (LLaMA's 11008 = 86 groups of 128 = 43 two-group steps, a prime: unpadded,
# 64 programs on 132 SMs); costs at most 7 groups of zero rows (2.3% at 11008)
PAD_GROUPS = 8
SMEM_LIMIT = 227 * 1024  # shared memory one H100 block may use


@dataclasses.dataclass(frozen=True)
class HopperTiling:
    """Launch parameters of the Mosaic GPU kernel (data, like ``kernel.Tiling``)."""

    block_n: int = 64  # rows of W^T per program: one wgmma M (64) or a multiple
    groups_per_step: int = 2  # scale groups per pipeline step (TMA transfer: block_n x g*this)
    max_concurrent_steps: int = 4  # pipeline depth (shared memory buffers per input)
    min_programs: int = 528  # split K until the grid has this many programs (4 per H100 SM)
    # steps whose wgmma may still run while the next step dequantizes (their x^T buffers are
    # released that many steps later); 0 waits for each step's MMAs
    wgmma_in_flight: int = 0

    def __post_init__(self):
        if (self.block_n % 64 or self.groups_per_step < 1
                or not 0 <= self.wgmma_in_flight < self.max_concurrent_steps):
            raise ValueError(f"bad HopperTiling {self}: block_n must be a multiple of 64, "
                             "groups_per_step >= 1, 0 <= wgmma_in_flight < "
                             "max_concurrent_steps")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales", "zeros"],
                   meta_fields=["k"])
@dataclasses.dataclass(frozen=True)
class HopperWeights:
    """An int4 ``QArray`` re-laid for the kernel (:func:`prepare`)."""

    codes: jax.Array  # (N, K') int4, unsigned code - 8; K' = K padded to PAD_GROUPS groups
    scales: jax.Array  # (K'/g, N) bfloat16
    zeros: jax.Array  # (K'/g, N) bfloat16, zero point - 8
    k: int  # K, the activations' width


def unsupported_reason(q) -> str | None:
    """Why :func:`prepare` refuses ``q``, or ``None`` if it takes it."""
    fmt = q.fmt
    if not isinstance(fmt, IntFormat) or fmt.bits != 4 or fmt.granularity != "group":
        return f"needs an int4 group-quantized QArray, got {fmt.name}"
    if fmt.group_size % 128:
        return f"needs group_size a multiple of 128 (one swizzled int4 tile), got {fmt.group_size}"
    k, n = q.orig_shape
    if k % fmt.group_size or n % 64:
        return f"needs K a multiple of the group size and N of 64, got {q.orig_shape}"
    return None


def prepare(q) -> HopperWeights:
    """Re-lay an int4 group ``QArray`` for the kernel (once per weight, not per call)."""
    if (reason := unsupported_reason(q)) is not None:
        raise ValueError(f"kernel_mgpu.prepare: {reason}")
    k, n = q.orig_shape
    groups = k // q.fmt.group_size
    pad = -groups % PAD_GROUPS  # zero groups: codes, zeros and scales 0 (and x's rows are 0)
    codes = unpack(q.packed, 4, k).astype(jnp.int8) - 8
    codes = jnp.pad(codes, ((0, pad * q.fmt.group_size), (0, 0))).T.astype(jnp.int4)
    zeros = 8.0 if q.zeros is None else q.zeros.astype(jnp.float32)
    zeros = jnp.pad(jnp.broadcast_to(zeros, (groups, n)) - 8.0, ((0, pad), (0, 0)))
    scales = jnp.pad(jnp.broadcast_to(q.scales, (groups, n)), ((0, pad), (0, 0)))
    return HopperWeights(codes, scales.astype(jnp.bfloat16), zeros.astype(jnp.bfloat16), k)


def smem_bytes(tiling: HopperTiling, group_size: int) -> int:
    """Shared memory of one program, estimated: the pipeline's buffers of codes (int4), scale
    and zero rows and x^T rows, the output tile and the A staging tile (without Mosaic's
    alignment and barriers)."""
    block_k = group_size * tiling.groups_per_step
    step = (tiling.block_n * block_k // 2 + 2 * 2 * tiling.groups_per_step * tiling.block_n
            + block_k * MAX_M * 2)
    return tiling.max_concurrent_steps * step + tiling.block_n * MAX_M * 4 + 8 * 128 * 2


def _split_k(tiling: HopperTiling, programs: int, steps: int) -> int:
    """The largest divisor of ``steps`` that does not overshoot ``tiling.min_programs``."""
    want = -(-tiling.min_programs // programs)
    return max(d for d in range(1, steps + 1) if steps % d == 0 and d <= want)


def qmatmul_hopper(x: jax.Array, w: HopperWeights, group_size: int,
                   tiling: HopperTiling = HopperTiling(), interpret: bool = False) -> jax.Array:
    """``x @ dequant(W)`` with the Mosaic GPU kernel.

    Args:
      x: (M, K) bfloat16 activations, M <= 16.
      w: :func:`prepare`'s re-laid weights.
      group_size: the format's group size (K rows per scale row).
      tiling: launch parameters.
      interpret: run in Mosaic GPU's interpret mode (CPU).

    Returns:
      (M, N) bfloat16.

    Example:
      >>> y = qmatmul_hopper(x, prepare(q), q.fmt.group_size)  # doctest: +SKIP
    """
    n, k = w.codes.shape  # K padded by prepare()
    m = x.shape[0] if x.ndim == 2 else 0
    block_k = group_size * tiling.groups_per_step
    if x.dtype != jnp.bfloat16 or x.ndim != 2 or x.shape[1] != w.k or not 1 <= m <= MAX_M:
        raise ValueError(f"qmatmul_hopper: needs (M <= {MAX_M}, {w.k}) bfloat16 activations, "
                         f"got {x.shape} {x.dtype}")
    if k % block_k or n % tiling.block_n:
        raise ValueError(f"qmatmul_hopper: K={k} must be a multiple of {block_k} "
                         f"(group_size x groups_per_step) and N={n} of {tiling.block_n}")
    if (need := smem_bytes(tiling, group_size)) > SMEM_LIMIT:
        raise ValueError(f"qmatmul_hopper: {tiling} needs {need} bytes of shared memory, more "
                         f"than the {SMEM_LIMIT} a block has")
    steps = k // block_k
    split = _split_k(tiling, n // tiling.block_n, steps)
    xt = jnp.pad(x, ((0, MAX_M - m), (0, k - w.k))).T  # (K, 16): wgmma's B, K-major rows
    partial = _kernel(n, k, group_size, tiling, split, interpret)(
        w.codes, w.scales, w.zeros, xt)
    return partial.sum(0)[:, :m].T.astype(x.dtype)


@functools.cache
def _kernel(n: int, k: int, group_size: int, tiling: HopperTiling, split: int, interpret: bool):
    g, block_n, gps = group_size, tiling.block_n, tiling.groups_per_step
    chunk = k // split
    steps = chunk // (g * gps)
    row = plgpu.Layout.WGMMA.reduce(1)
    # the interpreter has no layouts; on the GPU the casts pin what layout inference may pick
    cast = (lambda v, _: v) if interpret else plgpu.layout_cast

    # Mosaic names the compiled kernel after this function: kernel_profile.py finds it by name
    def qmatmul_hopper_kernel(codes_gmem, scales_gmem, zeros_gmem, xt_gmem, out_gmem, out_smem,
                              a_smem):
        i, s = lax.axis_index("n"), lax.axis_index("split")
        rows = pl.ds(i * block_n, block_n)
        ks = pl.ds(s * chunk, chunk)
        gs = pl.ds(s * (chunk // g), chunk // g)

        def scope(acc_ref):
            def step(_, codes_smem, scales_smem, zeros_smem, xt_smem):
                for j in range(gps):
                    a = cast(codes_smem[:, j * g:(j + 1) * g].astype(jnp.bfloat16),
                             plgpu.Layout.WGMMA)
                    zero = lax.broadcast_in_dim(cast(zeros_smem[j], row), a.shape, (0,))
                    scale = lax.broadcast_in_dim(cast(scales_smem[j], row), a.shape, (0,))
                    a = (a - zero) * scale
                    if interpret:  # the interpreter's wgmma reads A from shared memory only
                        a_smem[...] = a
                        a = a_smem
                    plgpu.wgmma(acc_ref, a, xt_smem.at[j * g:(j + 1) * g])
                plgpu.wgmma_wait(tiling.wgmma_in_flight)

            plgpu.emit_pipeline(
                step, grid=(steps,), max_concurrent_steps=tiling.max_concurrent_steps,
                in_specs=[
                    plgpu.BlockSpec((block_n, g * gps), lambda t: (0, t), transforms=(
                        plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(64))),
                    plgpu.BlockSpec((gps, block_n), lambda t: (t, 0)),
                    plgpu.BlockSpec((gps, block_n), lambda t: (t, 0)),
                    plgpu.BlockSpec((g * gps, MAX_M), lambda t: (t, 0), transforms=(
                        plgpu.TilingTransform((8, 16)), plgpu.SwizzleTransform(32)),
                        delay_release=tiling.wgmma_in_flight),  # an in-flight wgmma's B
                ],
            )(codes_gmem.at[rows, ks], scales_gmem.at[gs, rows], zeros_gmem.at[gs, rows],
              xt_gmem.at[ks])
            plgpu.wgmma_wait(0)
            out_smem[...] = acc_ref[...]

        pl.run_scoped(scope, plgpu.ACC((block_n, MAX_M), jnp.float32))
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[s, rows])
        plgpu.wait_smem_to_gmem(0)

    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return plgpu.kernel(
        qmatmul_hopper_kernel, out_type=jax.ShapeDtypeStruct((split, n, MAX_M), jnp.float32),
        grid=(n // block_n, split), grid_names=("n", "split"),
        scratch_types=dict(
            out_smem=plgpu.SMEM((block_n, MAX_M), jnp.float32),
            # the interpreter's A staging tile; a minimal unused buffer on the GPU
            a_smem=plgpu.SMEM((block_n, g) if interpret else (8, 128), jnp.bfloat16)),
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=InterpretGPUParams() if interpret else None)
