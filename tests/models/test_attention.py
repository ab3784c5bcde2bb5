"""Causal attention: query chunks give the same outputs and probabilities as one block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.models.layers import attention


def _reference(q, k, v, positions, window=None):
    """float64 numpy attention, one head at a time."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    probs = np.zeros((b, k.shape[2], g, t, t))
    for i in range(h):
        s = np.einsum("btd,bsd->bts", q[:, :, i], k[:, :, i // g]) / np.sqrt(d)
        qp, kp = positions[:, :, None], positions[:, None, :]
        mask = kp <= qp
        if window is not None:
            mask &= kp > qp - window
        s = np.where(mask, s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        probs[:, i // g, i % g] = p
        out[:, :, i] = np.einsum("bts,bsd->btd", p, v[:, :, i // g])
    return out, probs


@pytest.mark.parametrize("t,chunk,window", [(37, 8, None), (37, 64, None), (40, 10, 7),
                                            (16, 16, None)])
def test_query_chunks_match_the_reference(t, chunk, window):
    rng = np.random.default_rng(t + chunk)
    b, h, kvh, d = 2, 6, 2, 8
    q, k, v = (rng.standard_normal((b, t, n, d)) for n in (h, kvh, kvh))
    positions = np.broadcast_to(np.arange(5, 5 + t), (b, t))  # offset positions
    want_out, want_probs = _reference(q, k, v, positions, window)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    for query_chunk in (None, chunk):
        out, probs = jax.jit(lambda q, k, v, c=query_chunk: attention(
            q, k, v, f32(positions), f32(positions[0]), sliding_window=window,
            return_probs=True, query_chunk=c))(f32(q), f32(k), f32(v))
        np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-5)
        # chunk i: its queries against the keys up to its last query (the rest are masked)
        start = 0
        for p in probs:
            rows, keys = p.shape[-2:]
            assert keys == (start + rows if query_chunk else t)
            np.testing.assert_allclose(np.asarray(p), want_probs[..., start:start + rows, :keys],
                                       rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(want_probs[..., start:start + rows, keys:], 0)
            start += rows
        assert start == t
        assert len(probs) == (-(-t // chunk) if query_chunk else 1)


def test_query_chunks_need_self_attention():
    q = jnp.zeros((1, 4, 2, 8))
    kv = jnp.zeros((1, 6, 2, 8))
    with pytest.raises(ValueError, match="self-attention"):
        attention(q, kv, kv, jnp.zeros((1, 4)), jnp.arange(6), query_chunk=2)
