"""LLaMA-family decoder (LLaMA 1-3, Mistral, Qwen2, SmolLM2) in Flax linen.

Param tree (HF module names, Flax kernel layout ``(in, out)``)::

    embed_tokens/embedding                     (vocab, hidden)
    layers_{i}/input_layernorm/scale
    layers_{i}/self_attn/{q,k,v,o}_proj/kernel (+ bias for Qwen2 q/k/v)
    layers_{i}/post_attention_layernorm/scale
    layers_{i}/mlp/{gate,up,down}_proj/kernel
    norm/scale
    lm_head/kernel                             (hidden, vocab), absent when tied

Rotations untie: an ``lm_head`` present in the params is used even when the config ties the
embeddings (``rotate`` rotates the embedding and the LM head differently, so it writes one).
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
    Linear,
    RMSNorm,
    apply_rope,
    attention,
    rope_inv_freq,
    update_cache,
)


class LlamaAttention(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, index=None):
        cfg = self.cfg
        b, t, _ = x.shape
        lin = lambda n, bias, name: Linear(n * cfg.head_dim, bias, self.dtype,  # noqa: E731
                                           self.param_dtype, name=name)
        q = lin(cfg.num_heads, cfg.qkv_bias, "q_proj")(x).reshape(b, t, cfg.num_heads, -1)
        k = lin(cfg.num_kv_heads, cfg.qkv_bias, "k_proj")(x).reshape(b, t, cfg.num_kv_heads, -1)
        v = lin(cfg.num_kv_heads, cfg.qkv_bias, "v_proj")(x).reshape(b, t, cfg.num_kv_heads, -1)
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, dict(cfg.rope_scaling))
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if layer_cache is None:
            k_positions, new_cache, chunk = positions[0], None, QUERY_CHUNK
        else:
            new_cache = update_cache(layer_cache, k, v, index)
            k, v = new_cache["k"].astype(self.dtype), new_cache["v"].astype(self.dtype)
            k_positions, chunk = jnp.arange(k.shape[1]), None
        if self.is_mutable_collection("calib_heads"):  # calibration of v_proj (see below)
            out, probs = attention(q, k, v, positions, k_positions, query_chunk=chunk,
                                   sliding_window=cfg.sliding_window, return_probs=True)
            # A value error reaches the output weighted by attention: token s's value is used
            # with weight a_ts by every query t (attention sinks: ~1 for the first token). The
            # output error of kv head h is ||A_h X D_h||^2, so v_proj's Hessian per kv head is
            # X^T M_h X with M_h = sum of A^T A over h's query heads, summed over the windows.
            # (M first, chunk by chunk over the causal probabilities: 1.5x cheaper than the
            # Gram of the attention-mixed inputs A X.)
            m = 0
            for p in probs:  # (B, KVH, G, rows, keys): the first `keys` of all t keys
                p = p.astype(jnp.float32).reshape(b, cfg.num_kv_heads, -1, p.shape[-1])
                pad = t - p.shape[-1]
                m += jnp.pad(jnp.matmul(p.transpose(0, 1, 3, 2), p),
                             ((0, 0), (0, 0), (0, pad), (0, pad)))
            x32 = x.astype(jnp.float32)
            gram = jnp.einsum("btd,bkte->kde", x32, jnp.matmul(m, x32[:, None]),
                              precision="highest")
            self.sow("calib_heads", "v_proj_head_grams", gram)
        else:
            out = attention(q, k, v, positions, k_positions, query_chunk=chunk,
                            sliding_window=cfg.sliding_window)
        out = Linear(cfg.hidden_size, cfg.o_bias, self.dtype, self.param_dtype,
                     name="o_proj")(out.reshape(b, t, -1))
        return out, new_cache


class LlamaMLP(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = Linear(cfg.intermediate_size, cfg.mlp_bias, self.dtype, self.param_dtype,
                      name="gate_proj")(x)
        up = Linear(cfg.intermediate_size, cfg.mlp_bias, self.dtype, self.param_dtype,
                    name="up_proj")(x)
        return Linear(cfg.hidden_size, cfg.mlp_bias, self.dtype, self.param_dtype,
                      name="down_proj")(nn.silu(gate) * up)


class LlamaBlock(nn.Module):
    cfg: ModelConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, positions, layer_cache=None, index=None):
        eps = self.cfg.norm_eps
        h = RMSNorm(eps, self.dtype, self.param_dtype, name="input_layernorm")(x)
        h, new_cache = LlamaAttention(self.cfg, self.dtype, self.param_dtype, name="self_attn")(
            h, positions, layer_cache, index)
        x = x + h
        h = RMSNorm(eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(self.cfg, self.dtype, self.param_dtype, name="mlp")(h)
        return x, new_cache


class Llama(nn.Module):
    """LLaMA-family causal LM.

    With ``cfg.tie_word_embeddings`` the logits use the token embedding, unless the params hold
    an ``lm_head`` (rotations untie, see the module docstring).

    Call as ``model.apply({"params": params}, tokens)`` for logits ``(B, T, vocab)``, or with
    ``cache=``/``index=`` (see :func:`jaxcomp.models.init_cache`) for ``(logits, new_cache)``.
    ``hidden=True`` returns the residual stream after the last block ``(B, T, hidden)`` instead
    of logits (evaluation applies the head in row chunks: the logits of a whole batch of a
    large-vocabulary model are the biggest array of a forward pass).
    """

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
        embed = Embed(cfg.vocab_size, cfg.hidden_size, self.dtype, self.param_dtype,
                      name="embed_tokens")
        x = embed(tokens)
        block = nn.remat(LlamaBlock) if self.remat else LlamaBlock
        new_cache = []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else cache[i]
            x, c = block(cfg, self.dtype, self.param_dtype, name=f"layers_{i}")(
                x, positions, layer_cache, index)
            new_cache.append(c)
        if hidden:  # the residual stream; decoder_parts(model).head makes the logits
            return x if cache is None else (x, new_cache)
        x = RMSNorm(cfg.norm_eps, self.dtype, self.param_dtype, name="norm")(x)
        # An explicit lm_head wins over tying: rotations (quant.rotation_transform) untie.
        if cfg.tie_word_embeddings and not self.has_variable("params", "lm_head"):
            logits = embed.attend(x)
        else:
            logits = Linear(cfg.vocab_size, False, self.dtype, self.param_dtype,
                            name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)
