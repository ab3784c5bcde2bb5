"""Tensor-train / MPO matrices: planted recovery, exactness, contraction orders, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.calib import relative_output_error
from jaxcomp.errors import JaxcompError
from jaxcomp.tensornet import tt
from jaxcomp.tensornet.tt import TTMatrix, tt_matrix, tt_svd, tt_to_matrix


def _random_tt(rng, in_factors, out_factors, ranks):
    return [rng.standard_normal((ranks[k], in_factors[k], out_factors[k], ranks[k + 1]))
            for k in range(len(in_factors))]


def _dense(cores):
    """Independent float64 reference: W[i, j] = prod_k G_k[:, i_k, j_k, :] by multi-indices."""
    cores = [np.asarray(c, np.float64) for c in cores]
    fin, fout = [c.shape[1] for c in cores], [c.shape[2] for c in cores]
    w = np.zeros((int(np.prod(fin)), int(np.prod(fout))))
    for i, ii in enumerate(np.ndindex(*fin)):
        for j, jj in enumerate(np.ndindex(*fout)):
            acc = np.ones((1, 1))
            for c, a, b in zip(cores, ii, jj, strict=True):
                acc = acc @ c[:, a, b, :]
            w[i, j] = acc[0, 0]
    return w


@pytest.mark.parametrize("in_factors,out_factors,ranks", [
    ((4, 3, 5), (2, 6, 3), (1, 3, 4, 1)),
    ((2, 3, 2, 2), (3, 2, 2, 2), (1, 2, 5, 3, 1)),
    ((6, 4), (5, 7), (1, 4, 1)),
])
def test_planted_ranks_are_recovered_in_float64(in_factors, out_factors, ranks):
    rng = np.random.default_rng(0)
    w = _dense(_random_tt(rng, in_factors, out_factors, ranks))
    cores = tt_svd(w, in_factors, out_factors, rel_error=1e-12)
    back = _dense(cores)
    assert tuple(c.shape[3] for c in cores[:-1]) == ranks[1:-1]
    assert np.linalg.norm(back - w) / np.linalg.norm(w) < 1e-9


def test_full_rank_decomposition_reproduces_the_matrix():
    w = np.random.default_rng(1).standard_normal((24, 30))
    cores = tt_svd(w, (2, 3, 4), (5, 3, 2))  # no truncation at all
    back = _dense(cores)
    assert np.linalg.norm(back - w) / np.linalg.norm(w) < 1e-12
    assert tuple(c.shape[3] for c in cores[:-1]) == tt.max_ranks((2, 3, 4), (5, 3, 2))


def test_rel_error_budget_is_respected():
    w = np.random.default_rng(2).standard_normal((48, 60))
    for eps in (0.05, 0.3, 0.6):
        cores = tt_svd(w, (4, 3, 4), (3, 5, 4), rel_error=eps)
        back = _dense(cores)
        assert np.linalg.norm(back - w) / np.linalg.norm(w) <= eps * (1 + 1e-5)


def test_bond_dim_is_capped_and_error_decreases_with_it():
    w = np.random.default_rng(3).standard_normal((64, 72)).astype(np.float32)
    errors = []
    for chi in (1, 4, 16, 64):
        leaf = tt_matrix(w, (4, 4, 4), (4, 3, 6), max_bond_dim=chi)
        assert max(leaf.ranks) <= chi
        errors.append(float(jnp.linalg.norm(leaf.materialize() - w) / np.linalg.norm(w)))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5


@pytest.mark.parametrize("batch", [(1,), (3,), (2, 5), (64,)])
def test_left_matmul_equals_materialized_matmul(batch):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((72, 96)).astype(np.float32)
    leaf = tt_matrix(w, num_cores=3, max_bond_dim=6)
    x = rng.standard_normal((*batch, 72)).astype(np.float32)
    want = x @ np.asarray(leaf.materialize())
    got = jax.jit(lambda leaf, x: leaf.left_matmul(x))(leaf, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_jax_contraction_matches_the_reference():
    cores = _random_tt(np.random.default_rng(7), (3, 4, 2), (2, 5, 3), (1, 3, 2, 1))
    got = np.asarray(tt_to_matrix([jnp.asarray(c, jnp.float32) for c in cores]))
    np.testing.assert_allclose(got, _dense(cores), rtol=1e-5, atol=1e-5)


def test_every_contraction_order_is_exact():
    rng = np.random.default_rng(5)
    cores = [jnp.asarray(c, jnp.float32) for c in _random_tt(rng, (3, 4, 2), (2, 5, 3),
                                                             (1, 3, 2, 1))]
    x = jnp.asarray(rng.standard_normal((7, 24)), jnp.float32)
    want = np.asarray(x @ tt_to_matrix(cores))
    for apply in (tt._apply_left_to_right, tt._apply_right_to_left):
        np.testing.assert_allclose(np.asarray(apply(x, cores)), want, rtol=1e-5, atol=1e-5)


def test_cheaper_order_is_chosen_by_flop_count():
    fin, fout = (8, 8, 9), (8, 12, 16)
    ranks = tt.tt_ranks(fin, fout, 54)
    one = tt.contraction_flops(fin, fout, ranks, batch=1)
    many = tt.contraction_flops(fin, fout, ranks, batch=4096)
    assert min(one, key=one.get) != "dense"
    assert min(many, key=many.get) == "dense"  # long prefill: build W once, then one matmul
    # Dense matmul of one row is 576 * 1536 multiply-adds.
    assert one["dense"] - 576 * 1536 == many["dense"] - 4096 * 576 * 1536


def test_gradients_flow_into_the_cores():
    rng = np.random.default_rng(6)
    leaf = tt_matrix(rng.standard_normal((12, 20)).astype(np.float32), (3, 4), (4, 5),
                     max_bond_dim=3)
    x = jnp.asarray(rng.standard_normal((5, 12)), jnp.float32)
    grads = jax.grad(lambda lf: jnp.sum(jnp.sin(lf.left_matmul(x))))(leaf)
    want = jax.grad(lambda lf: jnp.sum(jnp.sin(x @ lf.materialize())))(leaf)
    for g, h in zip(grads.cores, want.cores, strict=True):
        assert float(jnp.abs(g).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5)


def test_param_counts_and_bond_dim_solver():
    fin, fout = (8, 8, 9), (8, 12, 16)
    chi = tt.bond_dim_for_params(fin, fout, 576 * 1536 // 3)
    count = lambda c: tt.tt_num_params(fin, fout, tt.tt_ranks(fin, fout, c))  # noqa: E731
    assert count(chi) <= 576 * 1536 // 3 < count(chi + 1)
    leaf = tt_matrix(np.zeros((576, 1536), np.float32), param_ratio=1 / 3)
    assert leaf.num_params == count(chi) and leaf.nbytes == 4 * count(chi)
    assert (leaf.in_factors, leaf.out_factors) == (fin, fout)


def test_balanced_factors():
    assert tt.balanced_factors(576, 3) == (8, 8, 9)
    assert tt.balanced_factors(4096, 4) == (8, 8, 8, 8)
    assert tt.balanced_factors(13, 2) == (1, 13)


def test_bad_input_is_refused_clearly():
    w = np.ones((12, 20), np.float32)
    with pytest.raises(JaxcompError, match="max_bond_dim must be >= 1"):
        tt_matrix(w, (3, 4), (4, 5), max_bond_dim=0)
    with pytest.raises(JaxcompError, match=r"in_factors \(3, 5\) multiply to 15, not to the in "
                                           r"dimension 12"):
        tt_matrix(w, (3, 5), (4, 5), max_bond_dim=2)
    with pytest.raises(JaxcompError, match="equal length"):
        tt_matrix(w, (3, 4), (20,), max_bond_dim=2)
    with pytest.raises(JaxcompError, match="2-D matrix"):
        tt_matrix(np.ones((2, 3, 4)), max_bond_dim=2)
    with pytest.raises(JaxcompError, match="cannot be met"):
        tt_matrix(w, (3, 4), (4, 5), param_ratio=0.01)


def test_leaf_is_a_pytree_with_static_shapes():
    leaf = tt_matrix(np.ones((12, 20), np.float32), (3, 4), (4, 5), max_bond_dim=2)
    assert isinstance(leaf, TTMatrix)
    assert len(jax.tree_util.tree_leaves(leaf)) == 2 and leaf.shape == (12, 20)


def _anisotropic_gram(rng, m, rows=400):
    """Inputs whose channels span three orders of magnitude, as LLM activations do."""
    x = rng.standard_normal((rows, m)) * np.geomspace(30.0, 0.03, m)[rng.permutation(m)]
    return x.T @ x


def test_refinement_reaches_the_closed_form_optimum_of_a_two_core_low_rank_train():
    """Cores (m, 1) x (1, n) are a rank-r product U V, whose output-optimal value is known:
    ``G^{-1/2} [G^{1/2} W]_r`` (reduced-rank regression, as in SVD-LLM)."""
    rng = np.random.default_rng(7)
    m, n, r = 20, 16, 4
    w = rng.standard_normal((m, n))
    gram = _anisotropic_gram(rng, m)
    lam, vec = np.linalg.eigh(gram)
    root, inv_root = (vec * np.sqrt(lam)) @ vec.T, (vec / np.sqrt(lam)) @ vec.T
    u, s, vt = np.linalg.svd(root @ w)
    optimum = inv_root @ (u[:, :r] * s[:r]) @ vt[:r]
    best = relative_output_error(gram, w, optimum)

    cores = tt_svd(w, (m, 1), (1, n), max_bond_dim=r)
    refined, before, after = tt.refine_to_outputs(cores, w, gram, steps=1000)
    assert [c.shape for c in refined] == [c.shape for c in cores]
    got = relative_output_error(gram, w, np.asarray(tt_to_matrix(refined), np.float64))
    assert before == pytest.approx(relative_output_error(gram, w, _dense(cores)), rel=1e-4)
    assert after == pytest.approx(got, rel=1e-3)
    assert best < 0.8 * before  # the case is one where the weight-optimal fit is far off
    assert got == pytest.approx(best, rel=1e-4)  # converged: 3,000 steps reach 2e-7


def test_refinement_lowers_the_output_error_of_a_three_core_train():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((24, 30))
    gram = _anisotropic_gram(rng, 24)
    cores = tt_svd(w, (2, 3, 4), (3, 2, 5), max_bond_dim=3)
    refined, before, after = tt.refine_to_outputs(cores, w, gram, steps=50)
    got = relative_output_error(gram, w, np.asarray(tt_to_matrix(refined), np.float64))
    assert got == pytest.approx(after, rel=1e-3) and after < 0.85 * before


def test_refinement_keeps_the_start_when_there_is_nothing_to_fit():
    rng = np.random.default_rng(9)
    w = rng.standard_normal((6, 6))
    cores = tt_svd(w, (2, 3), (3, 2), max_bond_dim=2)
    same, before, after = tt.refine_to_outputs(cores, w, np.zeros((6, 6)), steps=5)
    assert before == after == 0.0
    for a, b in zip(same, cores, strict=True):
        np.testing.assert_array_equal(a, b.astype(np.float32))
    with pytest.raises(JaxcompError, match="refine_steps must be >= 1"):
        tt.refine_to_outputs(cores, w, np.eye(6), steps=0)
    with pytest.raises(JaxcompError, match=r"q: the Gram matrix is \(5, 5\), the matrix has 6"):
        tt.refine_to_outputs(cores, w, np.eye(5), steps=5, name="q")

