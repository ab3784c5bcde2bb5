"""Kronecker-sum factorization with permutations: planted recovery, monotone search, the leaf."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxcomp.errors import JaxcompError
from jaxcomp.tensornet.kron import (
    KronMatrix,
    choose_kron_shapes,
    kron_factorize,
    kron_num_params,
    kron_rank_for_params,
    nearest_kron_sum,
)


def kron_sum(a, b):
    return sum(np.kron(a[i], b[i]) for i in range(a.shape[0]))


def rel_err(w, w_hat):
    return np.linalg.norm(w - w_hat) / np.linalg.norm(w)


def few_swaps(rng, n, k):
    """A permutation of range(n) made of k disjoint transpositions."""
    perm = np.arange(n)
    idx = rng.choice(n, 2 * k, replace=False)
    perm[idx[:k]], perm[idx[k:]] = idx[k:], idx[:k]
    return perm


def random_leaf(rng, rank, a_shape, b_shape):
    a = rng.normal(size=(rank, *a_shape)).astype(np.float32)
    b = rng.normal(size=(rank, *b_shape)).astype(np.float32)
    m, n = a_shape[0] * b_shape[0], a_shape[1] * b_shape[1]
    return KronMatrix(a=jnp.asarray(a), b=jnp.asarray(b),
                      row_perm=jnp.asarray(rng.permutation(m), jnp.int32),
                      col_perm=jnp.asarray(rng.permutation(n), jnp.int32))


# --- nearest_kron_sum -------------------------------------------------------------------------

def test_nearest_kron_sum_recovers_planted_rank2():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 4, 5)), rng.normal(size=(2, 3, 6))
    w = kron_sum(a, b)
    fa, fb = nearest_kron_sum(w, (4, 5), (3, 6), 2)
    assert fa.shape == (2, 4, 5) and fb.shape == (2, 3, 6)
    assert fa.dtype == np.float64 and fb.dtype == np.float64
    assert rel_err(w, kron_sum(fa, fb)) < 1e-9


def test_nearest_kron_sum_error_is_the_svd_tail():
    # Eckart–Young on the rearranged matrix: the error is the energy of the dropped singular
    # values of R[(p, s), (q, t)] = W[p*b1 + q, s*b2 + t].
    rng = np.random.default_rng(1)
    w = rng.normal(size=(12, 10))
    a_shape, b_shape, rank = (3, 2), (4, 5), 3
    r = w.reshape(3, 4, 2, 5).transpose(0, 2, 1, 3).reshape(6, 20)
    sv = np.linalg.svd(r, compute_uv=False)
    fa, fb = nearest_kron_sum(w, a_shape, b_shape, rank)
    expected = np.sqrt(np.sum(sv[rank:] ** 2) / np.sum(sv ** 2))
    np.testing.assert_allclose(rel_err(w, kron_sum(fa, fb)), expected, rtol=1e-10)


def test_nearest_kron_sum_dtypes():
    w = np.random.default_rng(2).normal(size=(6, 6))
    assert nearest_kron_sum(w.astype(np.float32), (2, 3), (3, 2), 1)[0].dtype == np.float32
    # Narrower floats come back as float32 factors.
    assert nearest_kron_sum(w.astype(ml_dtypes.bfloat16), (2, 3), (3, 2), 1)[1].dtype == (
        np.float32)


# --- kron_factorize: permutations -------------------------------------------------------------

@pytest.mark.parametrize("seed,rank", [(0, 1), (1, 1), (2, 2), (3, 2)])
def test_recovers_mildly_permuted_planted_sum(seed, rank):
    # Alternating minimization is a local search from the identity permutations: it cannot
    # provably find an arbitrary planted permutation (measured on fully random permutations of
    # a rank-1 8x8 (x) 8x8 sum: error 0.96 -> 0.85, stuck). A planted permutation made of a few
    # transpositions (4 row and 4 column swaps) leaves the un-permuted fit close enough that the
    # assignment steps find an exact solution (measured: 10/10 seeds for rank 1 and rank 2).
    # The recovered permutations may differ from the planted ones by a symmetry of the
    # Kronecker structure, so the test checks the error, not the permutations.
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(rank, 8, 8)), rng.normal(size=(rank, 8, 8))
    rows, cols = few_swaps(rng, 64, 4), few_swaps(rng, 64, 4)
    w = kron_sum(a, b)[rows][:, cols]
    leaf, errors = kron_factorize(w, rank, (8, 8), (8, 8), permute_iters=10)
    assert errors[0] > 0.3  # the permutation matters ...
    assert errors[-1] < 1e-9  # ... and is undone exactly
    # The leaf follows the same invariant as the search (stored in float32).
    np.testing.assert_array_less(rel_err(w, np.asarray(leaf.materialize(), np.float64)), 1e-6)


def test_random_permutation_reduces_error():
    # Fully random permutations are not recovered (see above), but the search still helps.
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(1, 6, 8)), rng.normal(size=(1, 5, 4))
    w = kron_sum(a, b)[rng.permutation(30)][:, rng.permutation(32)]
    _, errors = kron_factorize(w, 1, (6, 8), (5, 4), permute_iters=20)
    assert errors[-1] < 0.9 * errors[0]


def _structured(rng):
    # A planted rank-2 sum, scrambled by 3 row and 3 column swaps, plus 5% noise. Measured over
    # 10 seeds: error 0.58-0.69 -> 0.03-0.43 (the noise floor is about 0.035).
    a, b = rng.normal(size=(2, 6, 4)), rng.normal(size=(2, 5, 6))
    w = kron_sum(a, b)[few_swaps(rng, 30, 3)][:, few_swaps(rng, 24, 3)]
    return w + 0.05 * rng.normal(size=w.shape)


@pytest.mark.parametrize("case", ["gaussian", "gaussian_rank3", "heavy_tailed", "structured"])
def test_errors_never_increase(case):
    rng = np.random.default_rng(5)
    rank = {"gaussian_rank3": 3, "structured": 2}.get(case, 1)
    if case == "structured":
        w = _structured(rng)
    elif case == "heavy_tailed":
        w = rng.standard_t(2, size=(30, 24))
    else:
        w = rng.normal(size=(30, 24))
    iters = 15
    leaf, errors = kron_factorize(w, rank, (6, 4), (5, 6), permute_iters=iters)
    assert 1 <= len(errors) <= iters + 1
    assert all(e1 <= e0 for e0, e1 in zip(errors, errors[1:], strict=False)), errors
    # errors[0] is the plain nearest Kronecker sum; the last error is what the leaf holds.
    fa, fb = nearest_kron_sum(w, (6, 4), (5, 6), rank)
    np.testing.assert_allclose(errors[0], rel_err(w, kron_sum(fa, fb)), rtol=1e-6)
    np.testing.assert_allclose(rel_err(w, np.asarray(leaf.materialize(), np.float64)),
                               errors[-1], rtol=1e-5)
    if case == "structured":
        # This seed reaches the noise floor: 0.62 -> 0.039 in 2 iterations (measured).
        assert errors[-1] < 0.05 < 0.5 < errors[0]


def test_no_permutation_default_shapes_and_dtypes():
    w = np.random.default_rng(6).normal(size=(12, 18)).astype(np.float32)
    leaf, errors = kron_factorize(w, 2)
    assert len(errors) == 1
    assert leaf.a.shape == (2, 3, 3) and leaf.b.shape == (2, 4, 6)  # choose_kron_shapes
    assert leaf.row_perm.dtype == jnp.int32 and leaf.col_perm.dtype == jnp.int32
    np.testing.assert_array_equal(leaf.row_perm, np.arange(12))
    assert leaf.a.dtype == jnp.float32 and leaf.orig_dtype == "float32"
    assert leaf.shape == (12, 18) and leaf.dtype == jnp.float32 and leaf.rank == 2
    # One shape given: the other is derived.
    leaf2, _ = kron_factorize(w, 2, a_shape=(2, 3))
    assert leaf2.b.shape == (2, 6, 6)
    # bfloat16 weights give bfloat16 factors (the leaf stores what it saves).
    leaf3, _ = kron_factorize(w.astype(ml_dtypes.bfloat16), 2, permute_iters=2)
    assert leaf3.a.dtype == jnp.bfloat16 and leaf3.materialize().dtype == jnp.bfloat16


def test_full_rank_is_exact_and_stops():
    w = np.random.default_rng(7).normal(size=(6, 6))
    _, errors = kron_factorize(w, 4, (2, 2), (3, 3), permute_iters=5)
    assert errors[0] < 1e-12 and len(errors) == 1  # nothing left to improve: no search


def test_progress_bar(capsys):
    w = np.random.default_rng(8).normal(size=(8, 8))
    kron_factorize(w, 1, (2, 2), (4, 4), permute_iters=2, progress=True, name="mlp/up")
    assert "kron mlp/up" in capsys.readouterr().err


# --- the KronMatrix leaf ----------------------------------------------------------------------

# The two shapes take the two contraction orders of left_matmul (b first, then a first).
@pytest.mark.parametrize("a_shape,b_shape", [((2, 3), (4, 5)), ((4, 5), (2, 3))])
@pytest.mark.parametrize("batch", [(3,), (2, 5)])
def test_left_matmul_matches_materialize(a_shape, b_shape, batch):
    rng = np.random.default_rng(9)
    leaf = random_leaf(rng, 3, a_shape, b_shape)
    m, n = leaf.shape
    x = jnp.asarray(rng.normal(size=(*batch, m)), jnp.float32)
    dense = np.asarray(x, np.float64) @ np.asarray(leaf.materialize(), np.float64)
    # materialize() follows the documented invariant W[i, j] = S[row_perm[i], col_perm[j]].
    s = kron_sum(np.asarray(leaf.a), np.asarray(leaf.b))
    i, j = 4, 7
    np.testing.assert_allclose(leaf.materialize()[i, j],
                               s[int(leaf.row_perm[i]), int(leaf.col_perm[j])], rtol=1e-5)
    for method in ("factored_matmul", "left_matmul"):
        y = jax.jit(lambda leaf, x, method=method: getattr(leaf, method)(x))(leaf, x)
        assert y.shape == (*batch, n) and y.dtype == jnp.float32
        np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())


def _has_dense_intermediate(fn, x, shape):
    jaxpr = jax.make_jaxpr(fn)(x)
    return any(tuple(v.aval.shape) == shape for eqn in jaxpr.eqns for v in eqn.outvars)


def test_left_matmul_picks_the_cheaper_route():
    rng = np.random.default_rng(12)
    # Rank 1 of 8x8 (x) 8x8: 1024 multiplies per row through the factors vs 4096 dense.
    low = random_leaf(rng, 1, (8, 8), (8, 8))
    x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
    assert low.uses_factors(x.shape)
    assert not _has_dense_intermediate(low.left_matmul, x, (64, 64))
    # Rank 16 of 2x3 (x) 4x5: 16 * 70 per row through the factors vs 8 * 15 dense (after
    # building W once): a large batch goes dense, a single row still through the factors.
    high = random_leaf(rng, 16, (2, 3), (4, 5))
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    assert not high.uses_factors(x.shape) and high.uses_factors((1, 8))
    assert _has_dense_intermediate(high.left_matmul, x, (8, 15))
    assert not _has_dense_intermediate(high.factored_matmul, x, (8, 15))
    np.testing.assert_allclose(high.left_matmul(x), high.factored_matmul(x), rtol=1e-4,
                               atol=1e-5)


# Rank 8 with 4 rows: left_matmul takes the dense route; factored_matmul never does.
@pytest.mark.parametrize("method", ["factored_matmul", "left_matmul"])
def test_matmul_gradients_match_materialize(method):
    rng = np.random.default_rng(10)
    leaf = random_leaf(rng, 8, (3, 4), (5, 2))
    x = jnp.asarray(rng.normal(size=(4, 15)), jnp.float32)
    assert not leaf.uses_factors(x.shape)

    def loss_fast(leaf):
        return jnp.sum(jnp.sin(getattr(leaf, method)(x)))

    def loss_dense(leaf):
        return jnp.sum(jnp.sin(x @ leaf.materialize()))

    g_fast = jax.jit(jax.grad(loss_fast, allow_int=True))(leaf)
    g_dense = jax.grad(loss_dense, allow_int=True)(leaf)
    for field in ("a", "b"):
        got, want = getattr(g_fast, field), getattr(g_dense, field)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert np.abs(want).max() > 0
    # Integer permutations are not differentiable: their cotangents are float0.
    assert g_fast.row_perm.dtype == jax.dtypes.float0
    # The float factors alone, as a trainer would differentiate them.
    g_ab = jax.grad(lambda a, b: loss_fast(leaf.replace(a=a, b=b)), argnums=(0, 1))(leaf.a,
                                                                                    leaf.b)
    np.testing.assert_allclose(g_ab[0], g_dense.a, rtol=1e-5, atol=1e-5 * np.abs(g_dense.a).max())


def test_pytree_and_sizes():
    leaf = random_leaf(np.random.default_rng(11), 2, (2, 3), (4, 5))
    assert len(jax.tree_util.tree_leaves(leaf)) == 4
    assert leaf.num_params == 2 * 6 + 2 * 20 == kron_num_params((2, 3), (4, 5), 2)
    # Factors in float32 plus int32 permutations of length m = 8 and n = 15.
    assert leaf.nbytes == 52 * 4 + (8 + 15) * 4


# --- shapes and budgets -----------------------------------------------------------------------

def test_choose_kron_shapes():
    assert choose_kron_shapes(576, 1536) == ((24, 32), (24, 48))
    assert choose_kron_shapes(12, 18) == ((3, 3), (4, 6))
    assert choose_kron_shapes(7, 1) == ((1, 1), (7, 1))  # a prime has no balanced split


def test_rank_for_params():
    a_shape, b_shape = (24, 32), (24, 48)
    assert kron_num_params(a_shape, b_shape, 1) == 768 + 1152
    rank = kron_rank_for_params(576, 1536, a_shape, b_shape, 576 * 1536 // 3)
    assert rank == 153
    assert kron_num_params(a_shape, b_shape, rank) <= 576 * 1536 // 3
    assert kron_num_params(a_shape, b_shape, rank + 1) > 576 * 1536 // 3
    assert kron_rank_for_params(6, 6, (2, 2), (3, 3), 10**6) == 4  # capped at the exact rank
    with pytest.raises(JaxcompError, match="rank-1 .* more than the target 100"):
        kron_rank_for_params(576, 1536, a_shape, b_shape, 100)


# --- bad input --------------------------------------------------------------------------------

def test_bad_input():
    w = np.zeros((12, 18), np.float32)
    with pytest.raises(JaxcompError, match=r"layers_0/mlp/up.*2-D matrix.*\(2, 3, 4\)"):
        kron_factorize(np.zeros((2, 3, 4)), 1, name="layers_0/mlp/up")
    with pytest.raises(JaxcompError, match=r"rows do not factor: .* 5 \* 3 = 15.* m = 12"):
        kron_factorize(w, 1, (5, 3), (3, 6))
    with pytest.raises(JaxcompError, match=r"columns do not factor: .* 3 \* 5 = 15.* n = 18"):
        kron_factorize(w, 1, (3, 3), (4, 5))
    with pytest.raises(JaxcompError, match=r"a_shape \(5, 3\) does not divide"):
        kron_factorize(w, 1, a_shape=(5, 3))
    with pytest.raises(JaxcompError, match=r"q: rank must be in \[1, 9\].* got 0"):
        kron_factorize(w, 0, (3, 3), (4, 6), name="q")
    with pytest.raises(JaxcompError, match=r"rank must be in \[1, 9\].* got 10"):
        nearest_kron_sum(w, (3, 3), (4, 6), 10)
    with pytest.raises(JaxcompError, match="float weights"):
        kron_factorize(np.zeros((12, 18), np.int32), 1)
    with pytest.raises(JaxcompError, match="NaN"):
        kron_factorize(np.full((12, 18), np.nan, np.float32), 1, name="q")
