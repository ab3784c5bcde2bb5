"""Building blocks shared by the models: every linear layer goes through ``core.dense``."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcomp.core.dense import dense
from jaxcomp.core.leaf import CompressedLeaf

Dtype = Any


def _stored_or_new(module: nn.Module, name: str, init, shape, dtype):
    # A compressed leaf in the slot would fail linen's shape check in `self.param`, so read
    # the stored value directly when there is one (apply), and create it only during init.
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    return module.param(name, init, shape, dtype)


class Linear(nn.Module):
    """``y = x @ kernel (+ bias)`` whose kernel may be a plain array or a compressed leaf."""

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _stored_or_new(self, "kernel", nn.initializers.normal(0.02),
                                (x.shape[-1], self.features), self.param_dtype)
        bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
                if self.use_bias else None)
        if self.is_mutable_collection("calib"):  # a calibration pass (jaxcomp.calib) asks
            rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            self.sow("calib", "gram", jnp.matmul(rows.T, rows, precision="highest"))
            self.sow("calib", "absmax", jnp.max(jnp.abs(rows), axis=0))
        return dense(x.astype(self.dtype), kernel, bias)


class Embed(nn.Module):
    """Token (or position) embedding; ``attend`` gives tied-LM-head logits."""

    num_embeddings: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = _stored_or_new(self, "embedding", nn.initializers.normal(0.02),
                                        (self.num_embeddings, self.features), self.param_dtype)

    def _table(self) -> jax.Array:
        table = self.embedding
        if isinstance(table, CompressedLeaf):
            table = table.materialize()
        return table.astype(self.dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self._table(), ids, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        return dense(x.astype(self.dtype), self._table().T)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalizes in float32, scales in the compute dtype (as HF does)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * x32.astype(self.dtype)


class LayerNorm(nn.Module):
    """GPT-2 LayerNorm (statistics in float32)."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> jax.Array:
    """RoPE inverse frequencies, with the llama3 long-context rescaling when asked."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling.get("rope_type", "default") == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates ``x`` (B, T, heads, head_dim) by ``positions`` (B, T), HF's rotate-half layout."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, head_dim/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


# Queries per chunk of causal self-attention: each chunk is scored against the keys up to its
# own end only (about 5/8 of the full work at 512 tokens; 3x faster on this CPU than one block).
QUERY_CHUNK = 128


def attention(q, k, v, q_positions, k_positions, *, sliding_window=None, return_probs=False,
              query_chunk=None):
    """Causal grouped-query attention.

    Args:
      q: (B, T, H, D) queries; k, v: (B, S, KVH, D) keys/values with H a multiple of KVH.
      q_positions: (B, T) absolute positions; k_positions: (S,) absolute key positions
        (keys at positions after a query are masked, which also hides unwritten cache slots).
      sliding_window: if set, keys more than this many positions back are masked too.
      return_probs: also return the attention probabilities.
      query_chunk: self-attention only (k, v at q's own increasing positions, S == T): queries
        are taken this many at a time, each chunk against the keys up to its own last query.
        The keys left out are ones the causal mask hides, so the result is the same.

    Returns:
      (B, T, H, D) attention output in q's dtype; with ``return_probs`` also the probabilities
      as a list over query chunks of (B, KVH, H/KVH, T_chunk, S_chunk) arrays, chunk ``i``
      covering the first ``S_chunk`` keys (one chunk of all T queries and S keys without
      ``query_chunk``).
    """
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    if query_chunk and s != t:
        raise ValueError(f"query_chunk needs self-attention (as many keys as queries), got "
                         f"{t} queries and {s} keys")
    # (B, KVH, G*T, D) x (B, KVH, D, S): plain batched matmuls, the layout XLA's CPU dot runs
    # fastest (the equivalent einsum on the (B, T, KVH, G, D) layout is 1.4x slower)
    qh = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4)
    kh, vh = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
    step = query_chunk or t
    outs, probs = [], []
    for start in range(0, t, step):
        stop = min(start + step, t)
        keys = stop if query_chunk else s
        rows = stop - start
        scores = jnp.matmul(qh[:, :, :, start:stop].reshape(b, kvh, g * rows, d), kh[..., :keys],
                            preferred_element_type=jnp.float32)
        scores = scores.reshape(b, kvh, g, rows, keys) / math.sqrt(d)
        qpos = q_positions[:, None, None, start:stop, None]
        kpos = k_positions[None, None, None, None, :keys]
        mask = kpos <= qpos
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        p = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.matmul(p.reshape(b, kvh, g * rows, keys), vh[:, :, :keys])
                    .reshape(b, kvh, g, rows, d))
        probs.append(p)
    out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
    return (out, probs) if return_probs else out


def update_cache(layer_cache, k, v, index):
    """Writes new keys/values at ``index`` into a (B, S_max, KVH, D) cache; returns all of it."""
    ck = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                             index, axis=1)
    cv = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                             index, axis=1)
    return {"k": ck, "v": cv}
