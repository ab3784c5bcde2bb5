"""jit wrapper for the packed low-bit matmul: support check, tiling choice, padding, VJP.

``qmatmul(x, q)`` computes ``x @ q.materialize()`` for a ``QArray`` ``q`` with the Pallas
kernel on the rows of K that fill whole steps, and the XLA dequantize path for the short tail
group (SmolLM2's 576 = 4*128 + 64). Tile sizes are data (``TILINGS``), per backend and regime:
decode (M <= 16: memory-bound, one M block streams the weights once) and prefill; a regime
without a tiling on a backend goes to the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.qmatmul.kernel import KernelFormat, Tiling, qmatmul_planes

TILINGS: dict[str, dict[str, Tiling]] = {
    # H100 decode, by device time from `scripts/bench/kernel_profile.py --sweep`
    # (BENCHMARKS.md): 64-column blocks, 4 warps, 3 stages, K split until about four programs
    # per SM (132 SMs), codes to bf16 in inline PTX. No GPU prefill tiling: the previous kernel
    # measured slower than XLA's dequantize + cuBLAS matmul there, so prefill takes XLA.
    "gpu": {"decode": Tiling(16, 64, num_warps=4, num_stages=3, min_programs=528, codes="ptx")},
    # TPU: blocks' last two dims must be multiples of (8, 128) (16 rows for bf16).
    "tpu": {"decode": Tiling(16, 128), "prefill": Tiling(128, 128)},
    # CPU tests: decode checks the mantissa trick's arithmetic, prefill the plain conversion.
    "interpret": {"decode": Tiling(16, 64, codes="mantissa"), "prefill": Tiling(64, 128)},
}
DECODE_MAX_M = 16
BACKENDS = tuple(TILINGS)


def kernel_format(q) -> KernelFormat | None:
    """The kernel's view of ``q.fmt``, or ``None`` if the kernel does not handle it."""
    from jaxcomp.quant.formats import CodebookFormat, IntFormat

    fmt = q.fmt
    if fmt.bits not in (2, 4, 8):
        return None
    planes = 8 // fmt.bits
    if isinstance(fmt, CodebookFormat):
        if fmt.bits != 4 or fmt.granularity != "group":
            return None
        codebook, symmetric = tuple(fmt.values), True
    elif isinstance(fmt, IntFormat):
        codebook, symmetric = None, fmt.symmetric
    else:
        return None
    if fmt.granularity == "group":
        block_k = fmt.group_size
        if (block_k // planes) % 16 or block_k % planes:
            return None  # the per-plane dot needs >= 16 rows, in multiples of 16
        return KernelFormat(fmt.bits, block_k, True, symmetric, codebook)
    return KernelFormat(fmt.bits, 64 * planes, False, symmetric, codebook)


def _tiling(backend: str, m: int, n: int) -> Tiling | None:
    tiling = TILINGS[backend].get("decode" if m <= DECODE_MAX_M else "prefill")
    if tiling is None:
        return None
    for block_n in (tiling.block_n, 64, 32):
        if backend == "tpu" and block_n % 128:
            break
        if n % block_n == 0:
            return dataclasses.replace(tiling, block_n=block_n)
    return None


def supported(q, x_shape, backend: str) -> bool:
    """Whether the kernel handles this ``QArray`` and activation shape on ``backend``."""
    kf = kernel_format(q)
    k, n = q.orig_shape
    m = int(np.prod(x_shape[:-1]))
    return (kf is not None and backend in TILINGS and k >= kf.block_k
            and _tiling(backend, m, n) is not None)


def _split_k(tiling: Tiling, programs: int, steps: int) -> int:
    """K chunks that bring the grid to ``tiling.min_programs`` (at most one per K step)."""
    return min(steps, -(-tiling.min_programs // programs))


def _split_planes(x, planes: int):
    """(M, K) -> (P, M, K/P), plane j = x[:, j::P]."""
    m, k = x.shape
    return jnp.moveaxis(x.reshape(m, k // planes, planes), 2, 0)


def _forward(x2, q, backend: str):
    from jaxcomp.quant.qarray import QArray

    kf = kernel_format(q)
    k, n = q.orig_shape
    m = x2.shape[0]
    k_main = (k // kf.block_k) * kf.block_k
    tiling = _tiling(backend, m, n)
    pad = (-m) % tiling.block_m
    xp = jnp.pad(x2[:, :k_main], ((0, pad), (0, 0))) if pad else x2[:, :k_main]
    main_rows = k_main * kf.bits // 8
    groups = k_main // kf.block_k if kf.grouped else 1
    scales = jnp.broadcast_to(q.scales, (q.scales.shape[0], n))
    zeros = None if q.zeros is None else jnp.broadcast_to(q.zeros, (q.zeros.shape[0], n))
    y = qmatmul_planes(
        _split_planes(xp, kf.planes), q.packed[:main_rows], scales[:groups],
        None if zeros is None else zeros[:groups], kf, tiling, backend=backend,
        split_k=_split_k(tiling, (m + pad) // tiling.block_m * (n // tiling.block_n),
                         k_main // kf.block_k),
        m_valid=None if backend == "tpu" else m,
        out_dtype=x2.dtype if k_main == k else jnp.float32)[:m]
    if k_main < k:  # the short last group through XLA
        tail = QArray(q.packed[main_rows:], scales[groups:] if kf.grouped else scales,
                      None if zeros is None else (zeros[groups:] if kf.grouped else zeros),
                      q.fmt, (k - k_main, n), q.orig_dtype)
        y = y + jnp.matmul(x2[:, k_main:], tail.dequantize(x2.dtype),
                           preferred_element_type=jnp.float32,
                           precision=jax.lax.Precision.HIGHEST)
    return y.astype(x2.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _qmatmul(x2, q, backend):
    return _forward(x2, q, backend)


def _fwd(x2, q, backend):
    return _forward(x2, q, backend), q


def _bwd(backend, q, g):
    # Only the activations get a gradient (QAT trains master weights elsewhere);
    # dx = g @ W^T through the XLA dequantize path.
    dx = jnp.matmul(g, q.dequantize(g.dtype).T)
    zero = jax.tree_util.tree_map(
        lambda a: np.zeros(a.shape, jax.dtypes.float0) if jnp.issubdtype(a.dtype, jnp.integer)
        else jnp.zeros_like(a), q)
    return dx, zero


_qmatmul.defvjp(_fwd, _bwd)


def qmatmul(x: jax.Array, q, backend: str) -> jax.Array:
    """``x @ q.materialize()`` with the Pallas kernel.

    Args:
      x: (..., K) activations (f32 or bf16); accumulation is in f32.
      q: a ``QArray`` that :func:`supported` accepts.
      backend: ``"gpu"`` (Triton), ``"tpu"`` or ``"interpret"`` (CPU, for tests).

    Returns:
      (..., N) in ``x``'s dtype; differentiable with respect to ``x``.
    """
    if not supported(q, x.shape, backend):
        raise ValueError(f"qmatmul does not support {q.fmt} of shape {q.orig_shape} with "
                         f"activations {x.shape} on {backend}")
    lead = x.shape[:-1]
    y = _qmatmul(x.reshape(-1, x.shape[-1]), q, backend)
    return y.reshape(*lead, y.shape[-1])
