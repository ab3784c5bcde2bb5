"""Tensor-train / matrix-product-operator (MPO) matrices: the math on plain arrays and the leaf.

A ``(m, n)`` matrix with ``m = m_1 ... m_d`` and ``n = n_1 ... n_d`` is stored as ``d`` cores
``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` (``r_0 = r_d = 1``)::

    W[(i_1..i_d), (j_1..j_d)] = G_1[:, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, :]

with row index ``i = (i_1, ..., i_d)`` and column index ``j`` in row-major (C) order. The bond
dimensions ``r_k`` are the compression knob (CompactifAI's ``chi``). ``tt_svd`` is the TT-SVD of
Oseledets (2011): sequential truncated SVDs of the unfoldings. It minimizes the *weight* error;
``refine_to_outputs`` then moves the cores toward the layer's *outputs* on calibration inputs
(what the model sees), which TT-SVD ignores.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcomp.core.leaf import CompressedLeaf, factor_array, factor_num_params
from jaxcomp.errors import JaxcompError


def balanced_factors(n: int, num_factors: int) -> tuple[int, ...]:
    """Splits ``n`` into ``num_factors`` integer factors as equal as its divisors allow.

    Among all ascending factorizations, picks the one with the smallest largest-to-smallest
    ratio, so ``m`` and ``n`` factorizations pair small modes with small ones.

    Example:
      >>> balanced_factors(576, 3), balanced_factors(1536, 3)
      ((8, 8, 9), (8, 12, 16))
    """
    if n < 1 or num_factors < 1:
        raise JaxcompError(f"cannot split {n} into {num_factors} factors")

    def splits(rest, count, smallest):
        if count == 1:
            if rest >= smallest:
                yield (rest,)
            return
        f = smallest
        while f ** count <= rest:
            if rest % f == 0:
                for tail in splits(rest // f, count - 1, f):
                    yield (f, *tail)
            f += 1

    return min(splits(n, num_factors, 1), key=lambda fs: (fs[-1] / fs[0], fs[-1]))


def max_ranks(in_factors, out_factors) -> tuple[int, ...]:
    """Largest useful bond dimension at each of the ``d - 1`` cuts (the unfolding ranks)."""
    sizes = [a * b for a, b in zip(in_factors, out_factors, strict=True)]
    return tuple(min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes)))


def tt_ranks(in_factors, out_factors, max_bond_dim: int) -> tuple[int, ...]:
    """Bond dimensions ``(r_0, ..., r_d)`` when every cut is capped at ``max_bond_dim``."""
    return (1, *(min(max_bond_dim, r) for r in max_ranks(in_factors, out_factors)), 1)


def tt_num_params(in_factors, out_factors, ranks) -> int:
    """Scalars in the cores for bond dimensions ``ranks = (1, r_1, ..., 1)``."""
    return sum(ranks[k] * a * b * ranks[k + 1]
               for k, (a, b) in enumerate(zip(in_factors, out_factors, strict=True)))


def bond_dim_for_params(in_factors, out_factors, target_params: int, name: str = "") -> int:
    """The largest uniform ``max_bond_dim`` whose cores hold at most ``target_params`` scalars.

    Raises:
      JaxcompError: when even bond dimension 1 needs more.

    Example:
      >>> bond_dim_for_params((8, 8, 9), (8, 12, 16), 576 * 1536 // 3)
      54
    """
    count = lambda chi: tt_num_params(in_factors, out_factors,  # noqa: E731
                                      tt_ranks(in_factors, out_factors, chi))
    if count(1) > target_params:
        raise JaxcompError(f"{name or 'matrix'}: a target of {target_params:,} parameters cannot "
                           f"be met: bond dimension 1 already needs {count(1):,}")
    lo, hi = 1, max(max_ranks(in_factors, out_factors), default=1)
    while lo < hi:  # count is non-decreasing in chi
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mid) <= target_params else (lo, mid - 1)
    return lo


def check_factorization(shape, in_factors, out_factors, name: str = "") -> None:
    """Raises unless the factors multiply to ``shape`` and there are equally many."""
    where = f"{name}: " if name else ""
    if len(in_factors) != len(out_factors) or not in_factors:
        raise JaxcompError(f"{where}in_factors {tuple(in_factors)} and out_factors "
                           f"{tuple(out_factors)} must be non-empty and of equal length")
    for dim, factors, which in ((shape[0], in_factors, "in"), (shape[1], out_factors, "out")):
        if math.prod(factors) != dim or min(factors) < 1:
            raise JaxcompError(f"{where}{which}_factors {tuple(factors)} multiply to "
                               f"{math.prod(factors)}, not to the {which} dimension {dim}")


def tt_svd(w, in_factors, out_factors, max_bond_dim: int | None = None,
           rel_error: float | None = None, name: str = "") -> list[np.ndarray]:
    """TT-SVD of a matrix into cores ``(r_{k-1}, m_k, n_k, r_k)`` (numpy).

    Args:
      w: ``(m, n)`` matrix.
      in_factors, out_factors: ``(m_1..m_d)`` and ``(n_1..n_d)`` multiplying to ``m`` and ``n``.
      max_bond_dim: cap on every bond dimension (``>= 1``).
      rel_error: relative Frobenius error budget; each of the ``d - 1`` truncations drops at
        most ``rel_error / sqrt(d - 1) * ||W||``, so ``||W - TT|| <= rel_error * ||W||``
        (before ``max_bond_dim`` caps further).
      name: parameter path for error messages.

    Returns:
      The cores as numpy arrays (float64 for float64 input, else float32).

    Example:
      >>> cores = tt_svd(np.eye(6), (2, 3), (2, 3), max_bond_dim=4)
    """
    # float64 input is decomposed in float64 (exact checks); anything narrower in float32,
    # which halves the time and memory of the SVDs of 7B-sized unfoldings.
    w = np.asarray(w)
    w = w.astype(np.float64 if w.dtype == np.float64 else np.float32, copy=False)
    check_factorization(w.shape, in_factors, out_factors, name)
    if max_bond_dim is not None and max_bond_dim < 1:
        raise JaxcompError(f"{name or 'tt'}: max_bond_dim must be >= 1, got {max_bond_dim}")
    if rel_error is not None and not 0 <= rel_error < 1:
        raise JaxcompError(f"{name or 'tt'}: rel_error must be in [0, 1), got {rel_error}")
    d = len(in_factors)
    # (m_1..m_d, n_1..n_d) -> (m_1, n_1, m_2, n_2, ...): each core owns one (m_k, n_k) pair.
    t = w.reshape(*in_factors, *out_factors)
    t = t.transpose([ax for k in range(d) for ax in (k, d + k)])
    delta = (rel_error or 0.0) * np.linalg.norm(w) / math.sqrt(max(d - 1, 1))
    cores, rank, rest = [], 1, t
    for k in range(d - 1):
        unfold = rest.reshape(rank * in_factors[k] * out_factors[k], -1)
        u, s, vt = np.linalg.svd(unfold, full_matrices=False)
        keep = len(s)
        if rel_error is not None:  # smallest rank whose dropped tail is within delta
            tail = np.sqrt(np.cumsum((s * s)[::-1]))[::-1]  # tail[j] = ||s[j:]||
            keep = max(1, int(np.sum(tail > delta)))
        if max_bond_dim is not None:
            keep = min(keep, max_bond_dim)
        cores.append(u[:, :keep].reshape(rank, in_factors[k], out_factors[k], keep))
        rest, rank = s[:keep, None] * vt[:keep], keep
    cores.append(rest.reshape(rank, in_factors[-1], out_factors[-1], 1))
    return cores


def tt_to_matrix(cores) -> jax.Array:
    """Contracts cores ``(r_{k-1}, m_k, n_k, r_k)`` into the ``(m, n)`` matrix."""
    full = cores[0]  # (1, M, N, r) with M, N the row/column indices built so far
    for core in cores[1:]:
        _, big_m, big_n, _ = full.shape
        _, m, n, r = core.shape
        full = jnp.einsum("aMNr,rmns->aMmNns", full, core).reshape(1, big_m * m, big_n * n, r)
    return full[0, :, :, 0]


@functools.partial(jax.jit, static_argnames="steps")
def _lbfgs_output_fit(cores, w, gram, steps):
    """``steps`` L-BFGS iterations on ``tr(D^T G D)``, ``D = W - TT(cores)``; returns the cores
    and the loss before and after (``gram`` is pre-scaled so that ``tr(W^T G W) = 1``)."""
    def loss(cs):
        d = w - tt_to_matrix(cs)
        return jnp.sum(d * (gram @ d))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    def step(_, carry):
        cs, state = carry
        value, grad = value_and_grad(cs, state=state)
        updates, state = opt.update(grad, state, cs, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(cs, updates), state

    out, _ = jax.lax.fori_loop(0, steps, step, (cores, opt.init(cores)))
    return out, loss(cores), loss(out)


def refine_to_outputs(cores, w, gram, steps: int, name: str = ""
                      ) -> tuple[list[np.ndarray], float, float]:
    """Moves TT cores toward the layer's outputs: minimizes ``||X (W - TT)||_F / ||X W||_F``.

    TT-SVD minimizes the weight error, but a layer's inputs are strongly anisotropic (a few
    channels carry most of the energy), so a TT close to ``W`` can be far from ``X W``; on
    SmolLM2 it can even be worse than zeroing the matrix. Starting from the given cores (e.g.
    TT-SVD's), ``steps`` L-BFGS iterations on the output error with the input Gram matrix
    ``G = X^T X`` (float32; each costs a few ``G @ D`` products, ``m^2 n`` multiply-adds) keep
    the bond dimensions and the parameter count.

    Args:
      cores: ``(r_{k-1}, m_k, n_k, r_k)`` cores of ``w``'s approximation.
      w: the ``(m, n)`` matrix.
      gram: ``(m, m)`` input Gram matrix (any positive multiple of ``X^T X``).
      steps: L-BFGS iterations (``>= 1``).
      name: parameter path for error messages.

    Returns:
      ``(cores, error_before, error_after)``: float32 cores and the relative output errors.
      The given cores come back unchanged when the inputs or ``w`` are all zero, or when the
      iterations did not lower the error.
    """
    where = f"{name}: " if name else ""
    w = np.asarray(w, np.float64)
    gram = np.asarray(gram, np.float64)
    if steps < 1:
        raise JaxcompError(f"{where}refine_steps must be >= 1, got {steps}")
    if gram.shape != (w.shape[0], w.shape[0]):
        raise JaxcompError(f"{where}the Gram matrix is {gram.shape}, the matrix has "
                           f"{w.shape[0]} input channels")
    cores32 = [jnp.asarray(c, jnp.float32) for c in cores]
    energy = float(np.sum(w * (gram @ w)))  # ||X W||^2
    if not energy > 0:
        return [np.asarray(c) for c in cores32], 0.0, 0.0
    out, before, after = _lbfgs_output_fit(cores32, jnp.asarray(w, jnp.float32),
                                           jnp.asarray(gram / energy, jnp.float32), steps)
    before, after = float(before), float(after)
    if not after < before:  # not finite, or no progress: keep the starting point
        out, after = cores32, before
    return [np.asarray(c) for c in out], math.sqrt(max(before, 0.0)), math.sqrt(max(after, 0.0))


def contraction_flops(in_factors, out_factors, ranks, batch: int) -> dict[str, int]:
    """Multiply-adds of ``x @ W`` for ``batch`` rows: core by core in each direction, or by
    building ``W`` first (``dense``)."""
    d = len(in_factors)
    ltr = rtl = 0
    for k in range(d):
        core = ranks[k] * in_factors[k] * out_factors[k] * ranks[k + 1]
        ltr += math.prod(in_factors[k + 1:]) * math.prod(out_factors[:k]) * core
        rtl += math.prod(in_factors[:k]) * math.prod(out_factors[k + 1:]) * core
    build = sum(math.prod(in_factors[:k]) * math.prod(out_factors[:k]) * ranks[k]
                * in_factors[k] * out_factors[k] * ranks[k + 1] for k in range(1, d))
    m, n = math.prod(in_factors), math.prod(out_factors)
    return {"left_to_right": batch * ltr, "right_to_left": batch * rtl,
            "dense": build + batch * m * n}


def _apply_left_to_right(x, cores):
    """``x`` (B, m) through the cores from the first: state (B, m_k, M_rest, N_done, r)."""
    b = x.shape[0]
    rest = x.shape[1]
    t = x.reshape(b, 1, rest, 1, 1)
    for core in cores:
        r_in, m, n, r_out = core.shape
        rest //= m
        t = t.reshape(b, m, rest, -1, r_in)  # peel m_k off the remaining row modes
        t = jnp.einsum("bmMNr,rmns->bMNns", t, core)
    return t.reshape(b, -1)


def _apply_right_to_left(x, cores):
    """``x`` (B, m) through the cores from the last: state (B, M_rest, m_k, r, N_done)."""
    b = x.shape[0]
    rest = x.shape[1]
    t = x.reshape(b, rest, 1, 1)
    for core in reversed(cores):
        r_in, m, n, r_out = core.shape
        rest //= m
        t = t.reshape(b, rest, m, r_out, -1)
        t = jnp.einsum("bMmsN,rmns->bMrnN", t, core)
    return t.reshape(b, -1)


@flax.struct.dataclass
class TTMatrix(CompressedLeaf):
    """A ``(m, n)`` kernel as a tensor train (MPO) of ``d`` cores.

    Reconstruction invariant: ``W ≈ materialize() = tt_to_matrix(cores)`` with
    ``W[(i_1..i_d), (j_1..j_d)] = G_1[0, i_1, j_1, :] @ ... @ G_d[:, i_d, j_d, 0]`` (row-major
    multi-indices). A core may itself be a compressed leaf (a ``QArray`` of its
    ``(r_{k-1} m_k, n_k r_k)`` unfolding) after chaining the quantize transform.

    Attributes:
      cores: tuple of ``(r_{k-1}, m_k, n_k, r_k)`` arrays (or compressed unfoldings).
      core_shapes: the 4-D shape of every core (static).
      orig_dtype: dtype name of the original weights (static).
    """

    cores: tuple
    core_shapes: tuple = flax.struct.field(pytree_node=False)
    orig_dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def in_factors(self) -> tuple[int, ...]:
        return tuple(s[1] for s in self.core_shapes)

    @property
    def out_factors(self) -> tuple[int, ...]:
        return tuple(s[2] for s in self.core_shapes)

    @property
    def ranks(self) -> tuple[int, ...]:
        return (1, *(s[3] for s in self.core_shapes))

    @property
    def shape(self) -> tuple[int, int]:
        return math.prod(self.in_factors), math.prod(self.out_factors)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.orig_dtype)

    def core_arrays(self, dtype=None) -> list[jax.Array]:
        """The cores as 4-D arrays in ``dtype`` (dequantizing quantized cores)."""
        dtype = self.dtype if dtype is None else dtype
        return [factor_array(c, dtype).reshape(s)
                for c, s in zip(self.cores, self.core_shapes, strict=True)]

    def materialize(self) -> jax.Array:
        return tt_to_matrix(self.core_arrays())

    def left_matmul(self, x: jax.Array) -> jax.Array:
        """``x @ W`` core by core, in the direction with fewer multiply-adds for this batch
        (or by building ``W`` when that is cheaper, as for long prefill batches)."""
        lead, m = x.shape[:-1], x.shape[-1]
        rows = math.prod(lead)
        flops = contraction_flops(self.in_factors, self.out_factors, self.ranks, rows)
        best = min(flops, key=flops.get)
        cores = self.core_arrays(x.dtype)
        x2 = x.reshape(rows, m)
        if best == "dense":
            # As in QArray.left_matmul: depending on x keeps XLA from building every layer's W
            # at the start of the program and holding them all.
            cores[0] = cores[0] + (x2[0, 0] * 0).astype(cores[0].dtype)
            y = x2 @ tt_to_matrix(cores)
        elif best == "left_to_right":
            y = _apply_left_to_right(x2, cores)
        else:
            y = _apply_right_to_left(x2, cores)
        return y.reshape(*lead, -1)

    def map_factors(self, fn) -> TTMatrix:
        """Applies ``fn(matrix, name)`` to each core's ``(r_{k-1} m_k, n_k r_k)`` unfolding."""
        def unfold(c, s):  # an already compressed core goes to fn as it is (fn may refuse)
            return c if isinstance(c, CompressedLeaf) else jnp.reshape(c, (s[0] * s[1], -1))

        cores = tuple(fn(unfold(c, s), f"core{k}")
                      for k, (c, s) in enumerate(zip(self.cores, self.core_shapes, strict=True)))
        return self.replace(cores=cores)

    @property
    def num_params(self) -> int:
        return sum(factor_num_params(c) for c in self.cores)


def tt_matrix(w, in_factors=None, out_factors=None, *, num_cores: int = 3,
              max_bond_dim: int | None = None, rel_error: float | None = None,
              param_ratio: float | None = None, name: str = "") -> TTMatrix:
    """Factorizes a matrix into a :class:`TTMatrix` by TT-SVD.

    Args:
      w: ``(m, n)`` kernel.
      in_factors, out_factors: mode sizes; default :func:`balanced_factors` of each dimension
        into ``num_cores`` factors.
      num_cores: number of cores for the default factorization.
      max_bond_dim: cap on the bond dimensions.
      rel_error: relative Frobenius error budget (see :func:`tt_svd`).
      param_ratio: keep at most this fraction of ``m * n`` scalars; solves for the largest
        uniform bond dimension that fits (combined with ``max_bond_dim`` by taking the min).
      name: parameter path for error messages.

    Returns:
      A :class:`TTMatrix` with cores in ``w``'s dtype.

    Example:
      >>> tt = tt_matrix(w, num_cores=3, param_ratio=0.3)  # doctest: +SKIP
    """
    if np.ndim(w) != 2:
        raise JaxcompError(f"{name or 'tt'}: needs a 2-D matrix, got shape {np.shape(w)}")
    m, n = np.shape(w)
    if num_cores < 1:
        raise JaxcompError(f"{name or 'tt'}: num_cores must be >= 1, got {num_cores}")
    in_factors = tuple(in_factors) if in_factors else balanced_factors(m, num_cores)
    out_factors = tuple(out_factors) if out_factors else balanced_factors(n, num_cores)
    check_factorization((m, n), in_factors, out_factors, name)
    if param_ratio is not None:
        if not 0 < param_ratio <= 1:
            raise JaxcompError(f"{name or 'tt'}: param_ratio must be in (0, 1], got {param_ratio}")
        chi = bond_dim_for_params(in_factors, out_factors, int(param_ratio * m * n), name)
        max_bond_dim = chi if max_bond_dim is None else min(chi, max_bond_dim)
    cores = tt_svd(w, in_factors, out_factors, max_bond_dim, rel_error, name)
    dtype = jnp.dtype(w.dtype)
    return TTMatrix(cores=tuple(jnp.asarray(c, dtype) for c in cores),
                    core_shapes=tuple(tuple(c.shape) for c in cores), orig_dtype=dtype.name)
