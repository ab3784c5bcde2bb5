"""Low-rank factors: Eckart-Young optimality, activation awareness, apply and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.calib import InputStats
from jaxcomp.errors import JaxcompError
from jaxcomp.tensornet.lowrank import channel_scales, low_rank, rank_for_params, svd_factors


def test_svd_error_is_the_singular_value_tail():
    w = np.random.default_rng(0).standard_normal((40, 30))
    s = np.linalg.svd(w, compute_uv=False)
    for rank in (1, 7, 30):
        u, v = svd_factors(w, rank)
        assert u.shape == (40, rank) and v.shape == (rank, 30)
        np.testing.assert_allclose(np.linalg.norm(w - u @ v), np.sqrt(np.sum(s[rank:] ** 2)),
                                   atol=1e-10)


def _outlier_layer(rng, m=64, n=48, outliers=(3, 17)):
    x = rng.standard_normal((2000, m))
    x[:, list(outliers)] *= 30.0  # a few channels carry large activations (as in real LLMs)
    w = rng.standard_normal((m, n))
    return x, w, InputStats(x.T @ x, len(x))


def test_activation_aware_svd_lowers_the_output_error():
    x, w, stats = _outlier_layer(np.random.default_rng(1))
    plain = svd_factors(w, 12)
    aware = svd_factors(w, 12, in_scales=channel_scales(stats.gram, stats.count))
    err = lambda f: np.linalg.norm(x @ w - x @ f[0] @ f[1]) / np.linalg.norm(x @ w)  # noqa: E731
    assert err(aware) < 0.8 * err(plain)
    # The Gram-matrix shortcut gives the same output error as the activations themselves.
    np.testing.assert_allclose(stats.output_error(w, aware[0] @ aware[1]), err(aware), rtol=1e-9)


def test_left_matmul_and_gradients():
    rng = np.random.default_rng(2)
    leaf = low_rank(rng.standard_normal((20, 12)).astype(np.float32), 5)
    x = jnp.asarray(rng.standard_normal((3, 4, 20)), jnp.float32)
    got = jax.jit(lambda lf, x: lf.left_matmul(x))(leaf, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(x @ leaf.materialize()), rtol=1e-5,
                               atol=1e-5)
    g = jax.grad(lambda lf: jnp.sum(jnp.tanh(lf.left_matmul(x))))(leaf)
    h = jax.grad(lambda lf: jnp.sum(jnp.tanh(x @ lf.materialize())))(leaf)
    for got, want in ((g.u, h.u), (g.v, h.v)):  # float32 sums in different orders
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4,
                                   atol=1e-6 * float(np.abs(want).max()))
    assert leaf.num_params == 5 * 32 and leaf.nbytes == 4 * 5 * 32 and leaf.rank == 5


def test_sizes_and_bad_input():
    assert rank_for_params((576, 1536), 576 * 1536 // 3) == 139
    w = np.ones((10, 8))
    with pytest.raises(JaxcompError, match="cannot be met"):
        svd_factors(w, param_ratio=0.05)
    with pytest.raises(JaxcompError, match=r"rank must be in \[1, 8\]"):
        svd_factors(w, 0)
    with pytest.raises(JaxcompError, match="2-D"):
        svd_factors(np.ones(5), 1)
    with pytest.raises(JaxcompError, match="positive"):
        svd_factors(w, 2, in_scales=np.zeros(10))
