"""GPT-2 in Flax linen (learned positions, LayerNorm, gelu_new, fused QKV).

Param tree (HF module names; HF's Conv1D already stores ``(in, out)``, Flax's layout)::

    wte/embedding, wpe/embedding
    h_{i}/ln_1/{scale,bias}, h_{i}/attn/c_attn/{kernel,bias}, h_{i}/attn/c_proj/{kernel,bias}
    h_{i}/ln_2/{scale,bias}, h_{i}/mlp/c_fc/{kernel,bias}, h_{i}/mlp/c_proj/{kernel,bias}
    ln_f/{scale,bias}
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcomp.models.config import ModelConfig
from jaxcomp.models.layers import (
    QUERY_CHUNK,
    Embed,
    LayerNorm,
    Linear,
    attention,
    update_cache,
)


class GPT2Attention(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, index=None):
        cfg = self.cfg
        b, t, d = x.shape
        qkv = Linear(3 * d, True, self.dtype, self.param_dtype, name="c_attn")(x)
        q, k, v = (a.reshape(b, t, cfg.num_heads, cfg.head_dim) for a in jnp.split(qkv, 3, -1))
        if layer_cache is None:
            k_positions, new_cache, chunk = positions[0], None, QUERY_CHUNK
        else:
            new_cache = update_cache(layer_cache, k, v, index)
            k, v = new_cache["k"].astype(self.dtype), new_cache["v"].astype(self.dtype)
            k_positions, chunk = jnp.arange(k.shape[1]), None
        out = attention(q, k, v, positions, k_positions, query_chunk=chunk).reshape(b, t, d)
        return Linear(d, True, self.dtype, self.param_dtype, name="c_proj")(out), new_cache


class GPT2MLP(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = Linear(self.cfg.intermediate_size, True, self.dtype, self.param_dtype, name="c_fc")(x)
        h = jax.nn.gelu(h, approximate=True)  # gelu_new is the tanh approximation
        return Linear(self.cfg.hidden_size, True, self.dtype, self.param_dtype, name="c_proj")(h)


class GPT2Block(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, index=None):
        eps = self.cfg.norm_eps
        h, new_cache = GPT2Attention(self.cfg, self.dtype, self.param_dtype, name="attn")(
            LayerNorm(eps, self.dtype, self.param_dtype, name="ln_1")(x), positions,
            layer_cache, index)
        x = x + h
        x = x + GPT2MLP(self.cfg, self.dtype, self.param_dtype, name="mlp")(
            LayerNorm(eps, self.dtype, self.param_dtype, name="ln_2")(x))
        return x, new_cache


class GPT2(nn.Module):
    """GPT-2 causal LM with the same call convention (``cache``, ``index``, ``hidden``) as
    :class:`jaxcomp.models.llama.Llama`."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False  # recompute each block's activations in the backward pass (training)

    @nn.compact
    def __call__(self, tokens: jax.Array, cache=None, index=None, hidden: bool = False):
        cfg = self.cfg
        b, t = tokens.shape
        start = 0 if index is None else index
        positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))
        wte = Embed(cfg.vocab_size, cfg.hidden_size, self.dtype, self.param_dtype, name="wte")
        wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, self.dtype, self.param_dtype,
                    name="wpe")
        x = wte(tokens) + wpe(positions)
        block = nn.remat(GPT2Block) if self.remat else GPT2Block
        new_cache = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache[i]
            x, c = block(cfg, self.dtype, self.param_dtype, name=f"h_{i}")(
                x, positions, layer_cache, index)
            new_cache.append(c)
        if hidden:  # the residual stream; decoder_parts(model).head makes the logits
            return x if cache is None else (x, new_cache)
        x = LayerNorm(cfg.norm_eps, self.dtype, self.param_dtype, name="ln_f")(x)
        logits = wte.attend(x).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)
