"""Kronecker-sum factorization with learned row/column permutations (TQCompressor style).

A kernel ``W`` of shape ``(m, n) = (a1 * b1, a2 * b2)`` is approximated by a permuted sum of
Kronecker products::

    S = sum_i kron(a[i], b[i])            # (m, n)
    W ≈ S[row_perm][:, col_perm]          # W[i, j] ≈ S[row_perm[i], col_perm[j]]

The factors are fitted by the Van Loan–Pitsianis rearrangement (a truncated SVD: the exact
Frobenius optimum for fixed permutations). The permutations are learned by alternating exact
minimization: with the factors fixed, the best row (or column) permutation is a linear
assignment problem; with the permutations fixed, the best factors are the SVD fit again. Each
step is an exact minimization over one block of variables, so the error never increases.

The math works on host numpy arrays in float64 (it runs once per matrix, offline); the result
is a :class:`KronMatrix` leaf whose :meth:`KronMatrix.left_matmul` runs under ``jax.jit``.
"""

from __future__ import annotations

import math

import einops
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.errors import JaxcompError

# Stop the permutation search when an iteration improves the error by less than this fraction.
_REL_TOL = 1e-6
# A relative error this small is float64 rounding: the fit is exact, nothing to search for.
_EXACT = 1e-13


@flax.struct.dataclass
class KronMatrix(CompressedLeaf):
    """A kernel ``W`` of shape ``(m, n) = (a1 * b1, a2 * b2)`` as a permuted Kronecker sum.

    Reconstruction invariant: with ``S = sum_i kron(a[i], b[i])`` (shape ``(m, n)``),
    ``W ≈ materialize() = S[row_perm][:, col_perm]``, i.e.
    ``W[i, j] ≈ S[row_perm[i], col_perm[j]]``. Identity permutations give a plain Kronecker sum.

    Attributes:
      a: ``(r, a1, a2)`` float factors.
      b: ``(r, b1, b2)`` float factors.
      row_perm: ``(m,)`` int32 permutation of the rows of ``S``.
      col_perm: ``(n,)`` int32 permutation of the columns of ``S``.
      orig_dtype: dtype name of the original weights (static).
    """

    a: jax.Array
    b: jax.Array
    row_perm: jax.Array
    col_perm: jax.Array
    orig_dtype: str = flax.struct.field(pytree_node=False, default="float32")

    @property
    def rank(self) -> int:
        """Number of Kronecker terms ``r``."""
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        _, a1, a2 = self.a.shape
        _, b1, b2 = self.b.shape
        return (a1 * b1, a2 * b2)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.orig_dtype)

    def kron_sum(self) -> jax.Array:
        """The un-permuted ``S = sum_i kron(a[i], b[i])`` of shape ``(m, n)``."""
        s = jnp.einsum("rps,rqt->pqst", self.a, self.b)
        return s.reshape(self.shape)

    def materialize(self) -> jax.Array:
        s = self.kron_sum()
        return s[self.row_perm][:, self.col_perm].astype(self.dtype)

    def _factored_cost_per_row(self) -> tuple[int, bool]:
        """Multiplies per row of ``x`` of the factored product, and whether ``b`` goes first."""
        r, a1, a2 = self.a.shape
        _, b1, b2 = self.b.shape
        m, n = self.shape
        b_first, a_first = r * (m * b2 + a1 * n), r * (m * a2 + b1 * n)
        return min(b_first, a_first), b_first <= a_first

    def uses_factors(self, x_shape: tuple[int, ...]) -> bool:
        """Whether :meth:`left_matmul` contracts with the factors for an input of this shape.

        The factored product costs ``rows * r * (m*b2 + a1*n)`` multiplies (or the other
        order), building ``W`` then multiplying ``r*m*n + rows*m*n``: with balanced factors the
        factors win only for small ranks (``r * (1/a2 + 1/b1) < 1``, about r < 14 for a
        576x1536 kernel; at the 3x-compression rank 153 they take 11x the multiplies of a
        dense matmul).
        """
        m, n = self.shape
        rows = math.prod(x_shape[:-1])
        return rows * self._factored_cost_per_row()[0] <= self.rank * m * n + rows * m * n

    def left_matmul(self, x: jax.Array) -> jax.Array:
        """``x @ W`` for ``x`` of shape ``(..., m)``, by the cheaper of two exact routes.

        :meth:`factored_matmul` (never builds ``S`` or ``W``) where :meth:`uses_factors` says
        it takes fewer multiplies, else ``x @ materialize()``. The choice depends only on static
        shapes, so it is fixed under ``jax.jit``.
        """
        if self.uses_factors(x.shape):
            return self.factored_matmul(x)
        # As in QArray.left_matmul: a data dependency on x keeps XLA from hoisting every
        # layer's reconstruction to the start of the program (and keeping them all alive).
        dep = (x.reshape(-1)[0] * 0).astype(self.a.dtype)
        w = self.replace(a=self.a + dep).materialize().astype(x.dtype)
        return jnp.matmul(x, w)

    def factored_matmul(self, x: jax.Array) -> jax.Array:
        """``x @ W`` for ``x`` of shape ``(..., m)`` without building ``S`` or ``W``.

        ``y[j] = sum_i x[i] S[row_perm[i], col_perm[j]] = (x' @ S)[col_perm[j]]`` with
        ``x'[k] = x[inverse(row_perm)[k]]``; ``x' @ S`` is two small contractions with the
        factors, in whichever order costs fewer multiplies.
        """
        _, a1, _ = self.a.shape
        _, b1, _ = self.b.shape
        a = self.a.astype(x.dtype)
        b = self.b.astype(x.dtype)
        x = x[..., jnp.argsort(self.row_perm)]
        x = einops.rearrange(x, "... (p q) -> ... p q", p=a1, q=b1)
        if self._factored_cost_per_row()[1]:
            t = jnp.einsum("...pq,rqt->...rpt", x, b)
            z = jnp.einsum("...rpt,rps->...st", t, a)
        else:
            t = jnp.einsum("...pq,rps->...rqs", x, a)
            z = jnp.einsum("...rqs,rqt->...st", t, b)
        z = einops.rearrange(z, "... s t -> ... (s t)")
        return z[..., self.col_perm]

    @property
    def num_params(self) -> int:
        """Float factor entries only: the permutations are indices, not trainable weights."""
        return int(np.prod(self.a.shape)) + int(np.prod(self.b.shape))


def _prefix(name: str) -> str:
    return f"{name}: " if name else ""


def _check_shapes(m: int, n: int, a_shape, b_shape, name: str = "") -> None:
    """Raises unless ``a_shape`` and ``b_shape`` are pairs with ``a1*b1 == m``, ``a2*b2 == n``."""
    p = _prefix(name)
    for label, shp in (("a_shape", a_shape), ("b_shape", b_shape)):
        if len(tuple(shp)) != 2 or any(int(d) < 1 for d in shp):
            raise JaxcompError(f"{p}{label} must be a pair of positive ints, got {shp!r}")
    (a1, a2), (b1, b2) = a_shape, b_shape
    if a1 * b1 != m:
        raise JaxcompError(f"{p}rows do not factor: a_shape[0] * b_shape[0] = {a1} * {b1} = "
                           f"{a1 * b1}, but the matrix has m = {m} rows (shape ({m}, {n}))")
    if a2 * b2 != n:
        raise JaxcompError(f"{p}columns do not factor: a_shape[1] * b_shape[1] = {a2} * {b2} = "
                           f"{a2 * b2}, but the matrix has n = {n} columns (shape ({m}, {n}))")


def _check_rank(rank, a_shape, b_shape, name: str = "") -> None:
    max_rank = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
        raise JaxcompError(f"{_prefix(name)}rank must be an int, got {rank!r}")
    if not 1 <= rank <= max_rank:
        raise JaxcompError(f"{_prefix(name)}rank must be in [1, {max_rank}] for a_shape "
                           f"{tuple(a_shape)} and b_shape {tuple(b_shape)}, got {rank}")


def _as_matrix(w: ArrayLike, name: str = "") -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise JaxcompError(f"{_prefix(name)}Kronecker factorization needs a 2-D matrix, got "
                           f"shape {tuple(w.shape)}")
    # jnp.issubdtype also knows the ml_dtypes floats (bfloat16, fp8) that numpy does not.
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise JaxcompError(f"{_prefix(name)}expected float weights, got dtype {w.dtype}")
    return w


def _result_dtype(dtype: np.dtype) -> np.dtype:
    # float64 stays float64 (exact tests); everything narrower comes back as float32.
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def _divisor_near(k: int, target: float) -> int:
    """The divisor of ``k`` closest to ``target`` (the smaller one on a tie)."""
    divs = [d for d in range(1, k + 1) if k % d == 0]
    return min(divs, key=lambda d: (abs(d - target), d))


def choose_kron_shapes(m: int, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """A balanced default factorization: ``a1`` nearest ``sqrt(m)``, ``a2`` nearest ``sqrt(n)``.

    Args:
      m: rows of ``W`` (in_features).
      n: columns of ``W`` (out_features).

    Returns:
      ``((a1, a2), (b1, b2))`` with ``a1 * b1 == m`` and ``a2 * b2 == n``; ``a1`` (``a2``) is the
      divisor of ``m`` (``n``) closest to its square root, the smaller one on a tie.

    Example:
      >>> choose_kron_shapes(576, 1536)
      ((24, 32), (24, 48))
    """
    if m < 1 or n < 1:
        raise JaxcompError(f"matrix dimensions must be positive, got ({m}, {n})")
    a1 = _divisor_near(m, math.sqrt(m))
    a2 = _divisor_near(n, math.sqrt(n))
    return (a1, a2), (m // a1, n // a2)


def kron_num_params(a_shape: tuple[int, int], b_shape: tuple[int, int], rank: int) -> int:
    """Float factor entries of a rank-``rank`` Kronecker sum: ``rank * (a1*a2 + b1*b2)``.

    Args:
      a_shape: ``(a1, a2)``.
      b_shape: ``(b1, b2)``.
      rank: number of Kronecker terms.

    Returns:
      The number of factor entries (permutations not counted).

    Example:
      >>> kron_num_params((24, 32), (24, 48), 2)
      3840
    """
    return int(rank) * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1])


def kron_rank_for_params(m: int, n: int, a_shape: tuple[int, int], b_shape: tuple[int, int],
                         target_params: int) -> int:
    """The largest rank whose factor count is at most ``target_params``.

    The rank is also capped at ``min(a1*a2, b1*b2)``, where the fit is already exact.

    Args:
      m: rows of ``W``.
      n: columns of ``W``.
      a_shape: ``(a1, a2)``.
      b_shape: ``(b1, b2)``, with ``a1*b1 == m`` and ``a2*b2 == n``.
      target_params: budget of factor entries.

    Returns:
      The rank.

    Raises:
      JaxcompError: the shapes do not factor ``(m, n)``, or rank 1 already exceeds the budget.

    Example:
      >>> kron_rank_for_params(576, 1536, (24, 32), (24, 48), 576 * 1536 // 3)
      153
    """
    _check_shapes(m, n, a_shape, b_shape)
    per_rank = kron_num_params(a_shape, b_shape, 1)
    if per_rank > target_params:
        raise JaxcompError(f"a rank-1 Kronecker sum with a_shape {tuple(a_shape)} and b_shape "
                           f"{tuple(b_shape)} has {per_rank} params, more than the target "
                           f"{target_params}")
    max_rank = min(a_shape[0] * a_shape[1], b_shape[0] * b_shape[1])
    return min(int(target_params) // per_rank, max_rank)


def _rearrange(w: np.ndarray, a_shape, b_shape) -> np.ndarray:
    """Van Loan–Pitsianis: ``(m, n)`` -> ``(a1*a2, b1*b2)``, row ``(p, s)`` = vec of block (p, s).

    ``kron(A, B)`` maps to the rank-1 matrix ``vec(A) vec(B)^T``, so a Kronecker sum of rank r
    is a matrix of rank r.
    """
    (a1, a2), (b1, b2) = a_shape, b_shape
    return einops.rearrange(w, "(p q) (s t) -> (p s) (q t)", p=a1, q=b1, s=a2, t=b2)


def _nearest_kron_sum_f64(w: np.ndarray, a_shape, b_shape, rank: int):
    (a1, a2), (b1, b2) = a_shape, b_shape
    u, sv, vt = np.linalg.svd(_rearrange(w, a_shape, b_shape), full_matrices=False)
    # Split each singular value evenly so the two factors have comparable scale.
    root = np.sqrt(sv[:rank])
    a = (u[:, :rank] * root).T.reshape(rank, a1, a2)
    b = (vt[:rank] * root[:, None]).reshape(rank, b1, b2)
    return a, b


def nearest_kron_sum(w: ArrayLike, a_shape: tuple[int, int], b_shape: tuple[int, int],
                     rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Best Frobenius approximation of ``w`` by a sum of ``rank`` Kronecker products.

    Van Loan–Pitsianis: rearrange ``w`` into ``R`` of shape ``(a1*a2, b1*b2)`` whose rows are
    the vectorized ``(b1, b2)`` blocks of ``w``; the truncated SVD of ``R`` is the optimum
    (Eckart–Young). Computed in float64 with ``np.linalg.svd``.

    Args:
      w: ``(m, n)`` float matrix, ``m = a1*b1``, ``n = a2*b2``.
      a_shape: ``(a1, a2)``.
      b_shape: ``(b1, b2)``.
      rank: number of terms, ``1 <= rank <= min(a1*a2, b1*b2)``.

    Returns:
      ``(a, b)`` numpy arrays of shapes ``(rank, a1, a2)`` and ``(rank, b1, b2)`` with
      ``w ≈ sum_i kron(a[i], b[i])``; float64 for float64 input, float32 otherwise (bf16,
      float16 and float32 weights all give float32 factors).

    Example:
      >>> a, b = nearest_kron_sum(np.kron(np.eye(2), np.ones((3, 3))), (2, 2), (3, 3), 1)
    """
    w = _as_matrix(w)
    _check_shapes(*w.shape, a_shape, b_shape)
    _check_rank(rank, a_shape, b_shape)
    a, b = _nearest_kron_sum_f64(w.astype(np.float64), a_shape, b_shape, int(rank))
    dtype = _result_dtype(w.dtype)
    return a.astype(dtype), b.astype(dtype)


def _kron_sum_f64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    _, a1, a2 = a.shape
    _, b1, b2 = b.shape
    return np.einsum("rps,rqt->pqst", a, b).reshape(a1 * b1, a2 * b2)


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.size)
    return inv


def _best_row_perm(w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The permutation p minimizing ``||w - s[p]||_F`` (rows of ``s`` assigned to rows of ``w``).

    ``cost[i, k] = ||w_i||^2 + ||s_k||^2 - 2 w_i·s_k``; the norm terms add the same total to
    every permutation, so only ``-w @ s.T`` is needed (and it avoids cancellation).
    """
    from scipy.optimize import linear_sum_assignment

    # For a square cost matrix the returned row indices are 0..m-1 in order.
    _, perm = linear_sum_assignment(-(w @ s.T))
    return perm.astype(np.int64)


def kron_factorize(w: ArrayLike, rank: int, a_shape: tuple[int, int] | None = None,
                   b_shape: tuple[int, int] | None = None, permute_iters: int = 0,
                   progress: bool = False, name: str = "") -> tuple[KronMatrix, list[float]]:
    """Fits ``W ≈ S[row_perm][:, col_perm]`` with ``S`` a rank-``rank`` Kronecker sum.

    Without permutations this is :func:`nearest_kron_sum`. With ``permute_iters > 0``, each
    iteration (1) with the factors fixed, picks the best row permutation exactly as a linear
    assignment problem (``scipy.optimize.linear_sum_assignment``), (2) refits the factors on the
    un-permuted ``W[inv_row][:, inv_col]``, (3)-(4) the same for the columns. Each sub-step
    minimizes the error exactly over its block of variables, so the error never increases (a
    step that would raise it by rounding is discarded). It stops early when an iteration
    improves the error by less than 1e-6 relative. Alternating minimization finds a local
    optimum: it need not find a planted permutation from the identity start.

    Args:
      w: ``(m, n)`` float kernel (Flax layout, ``y = x @ w``).
      rank: number of Kronecker terms, ``1 <= rank <= min(a1*a2, b1*b2)``.
      a_shape: ``(a1, a2)``; default from :func:`choose_kron_shapes` (or derived from
        ``b_shape`` when only that is given).
      b_shape: ``(b1, b2)``, with ``a1*b1 == m`` and ``a2*b2 == n``.
      permute_iters: maximum number of permutation iterations (0: identity permutations).
      progress: show a tqdm progress bar with the current error.
      name: the param path, for error messages and the progress bar.

    Returns:
      ``(leaf, errors)``: a :class:`KronMatrix` (factors in the weights' dtype, ``orig_dtype``
      the weights' dtype) and the relative Frobenius errors ``||W - W_hat|| / ||W||`` in
      float64 before casting: ``errors[0]`` without permutations, ``errors[k]`` after
      iteration ``k``.

    Raises:
      JaxcompError: ``w`` is not a 2-D float matrix or is not finite, the shapes do not
        factor it, or the rank is out of range.

    Example:
      >>> leaf, errors = kron_factorize(w, rank=8, permute_iters=5)  # w: (576, 1536)
    """
    w_in = _as_matrix(w, name)
    m, n = w_in.shape
    if a_shape is None and b_shape is None:
        a_shape, b_shape = choose_kron_shapes(m, n)
    elif a_shape is None or b_shape is None:
        given, label = (a_shape, "a_shape") if b_shape is None else (b_shape, "b_shape")
        if len(tuple(given)) != 2 or m % given[0] or n % given[1]:
            raise JaxcompError(f"{_prefix(name)}{label} {given!r} does not divide the matrix "
                               f"shape ({m}, {n})")
        other = (m // given[0], n // given[1])
        a_shape, b_shape = (given, other) if label == "a_shape" else (other, given)
    a_shape, b_shape = tuple(int(d) for d in a_shape), tuple(int(d) for d in b_shape)
    _check_shapes(m, n, a_shape, b_shape, name)
    _check_rank(rank, a_shape, b_shape, name)
    if isinstance(permute_iters, bool) or int(permute_iters) != permute_iters or permute_iters < 0:
        raise JaxcompError(f"{_prefix(name)}permute_iters must be an int >= 0, "
                           f"got {permute_iters!r}")
    w64 = w_in.astype(np.float64)
    if not np.all(np.isfinite(w64)):
        raise JaxcompError(f"{_prefix(name)}weights contain NaN or inf")

    norm = np.linalg.norm(w64)
    scale = norm if norm > 0 else 1.0

    def fit(row_perm, col_perm):
        # Best factors for fixed permutations, and the resulting relative error.
        a, b = _nearest_kron_sum_f64(w64[_inverse(row_perm)][:, _inverse(col_perm)], a_shape,
                                     b_shape, rank)
        s = _kron_sum_f64(a, b)
        err = float(np.linalg.norm(w64 - s[row_perm][:, col_perm]) / scale)
        return a, b, s, err

    row_perm, col_perm = np.arange(m), np.arange(n)
    a, b, s, err = fit(row_perm, col_perm)
    errors = [err]

    from tqdm import tqdm

    bar = tqdm(total=permute_iters, desc=f"kron {name}".rstrip(), disable=not progress,
               leave=False)
    bar.set_postfix(err=f"{err:.4g}")
    for _ in range(permute_iters):
        if err <= _EXACT:
            break
        prev = err
        new_rows = _best_row_perm(w64, s[:, col_perm])
        if not np.array_equal(new_rows, row_perm):  # unchanged: the refit would be too
            cand = fit(new_rows, col_perm)
            if cand[3] <= err:
                row_perm, (a, b, s, err) = new_rows, cand
        # Columns of W against columns of S[row_perm]: the same problem on the transposes.
        new_cols = _best_row_perm(w64.T, s[row_perm].T)
        if not np.array_equal(new_cols, col_perm):
            cand = fit(row_perm, new_cols)
            if cand[3] <= err:
                col_perm, (a, b, s, err) = new_cols, cand
        errors.append(err)
        bar.update(1)
        bar.set_postfix(err=f"{err:.4g}")
        if prev - err <= _REL_TOL * prev:
            break
    bar.close()

    # float64 becomes float32 unless jax_enable_x64 is on: record what is actually stored.
    dtype = jax.dtypes.canonicalize_dtype(w_in.dtype)
    leaf = KronMatrix(a=jnp.asarray(a.astype(dtype)), b=jnp.asarray(b.astype(dtype)),
                      row_perm=jnp.asarray(row_perm, jnp.int32),
                      col_perm=jnp.asarray(col_perm, jnp.int32), orig_dtype=dtype.name)
    return leaf, errors
