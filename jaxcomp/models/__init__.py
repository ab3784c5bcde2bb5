"""Flax models (LLaMA family, GPT-2), loaders, export and generation."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxcomp.models.config import ModelConfig, from_hf_config, to_hf_config
from jaxcomp.models.gpt2 import GPT2
from jaxcomp.models.llama import Llama


def build_model(cfg: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32,
                remat: bool = False):
    """Returns the Flax module for ``cfg`` (``dtype`` is the compute dtype; ``remat``
    recomputes block activations in the backward pass instead of storing them)."""
    cls = GPT2 if cfg.arch == "gpt2" else Llama
    return cls(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat)


@dataclasses.dataclass(frozen=True)
class DecoderParts:
    """A built model taken apart for block-by-block work (calibration, streamed evaluation).

    Attributes:
      embed: ``embed(params, tokens) -> x`` (B, T, hidden).
      block: the decoder block module: ``block.apply({"params": params[f"{prefix}_{i}"]}, x,
        positions)[0]``.
      prefix: block key prefix in the params (``"layers"``, ``"h"``).
      head: ``head(params, x) -> logits``: final norm and LM head (tied or not).
      linears: the block's linear kernels (block-relative paths) in the order the forward
        reaches them, those reading the same input in one tuple (for fits that go layer by
        layer on the inputs the already fitted ones produce).
    """

    embed: Callable
    block: Any
    prefix: str
    head: Callable
    linears: tuple[tuple[str, ...], ...]


LLAMA_LINEARS = (("self_attn/q_proj/kernel", "self_attn/k_proj/kernel", "self_attn/v_proj/kernel"),
                 ("self_attn/o_proj/kernel",), ("mlp/gate_proj/kernel", "mlp/up_proj/kernel"),
                 ("mlp/down_proj/kernel",))
GPT2_LINEARS = (("attn/c_attn/kernel",), ("attn/c_proj/kernel",), ("mlp/c_fc/kernel",),
                ("mlp/c_proj/kernel",))


def decoder_parts(model) -> DecoderParts:
    """The :class:`DecoderParts` of a model from :func:`build_model`."""
    from jaxcomp.models.gpt2 import GPT2Block
    from jaxcomp.models.layers import Embed, LayerNorm, Linear, RMSNorm
    from jaxcomp.models.llama import LlamaBlock

    cfg, dt, pdt = model.cfg, model.dtype, model.param_dtype
    if isinstance(model, Llama):
        embed = Embed(cfg.vocab_size, cfg.hidden_size, dt, pdt)
        norm = RMSNorm(cfg.norm_eps, dt, pdt)
        lm_head = Linear(cfg.vocab_size, False, dt, pdt)

        def head(params, x):
            x = norm.apply({"params": params["norm"]}, x)
            if "lm_head" in params:  # untied (or untied by a rotation)
                return lm_head.apply({"params": params["lm_head"]}, x).astype(jnp.float32)
            return embed.apply({"params": params["embed_tokens"]}, x,
                               method=Embed.attend).astype(jnp.float32)

        return DecoderParts(lambda params, tokens: embed.apply(
            {"params": params["embed_tokens"]}, tokens), LlamaBlock(cfg, dt, pdt), "layers", head,
            LLAMA_LINEARS)
    wte = Embed(cfg.vocab_size, cfg.hidden_size, dt, pdt)
    wpe = Embed(cfg.max_position_embeddings, cfg.hidden_size, dt, pdt)
    ln_f = LayerNorm(cfg.norm_eps, dt, pdt)

    def gpt2_embed(params, tokens):
        positions = jnp.arange(tokens.shape[1])[None]
        return (wte.apply({"params": params["wte"]}, tokens)
                + wpe.apply({"params": params["wpe"]}, positions))

    def gpt2_head(params, x):
        x = ln_f.apply({"params": params["ln_f"]}, x)
        return wte.apply({"params": params["wte"]}, x, method=Embed.attend).astype(jnp.float32)

    return DecoderParts(gpt2_embed, GPT2Block(cfg, dt, pdt), "h", gpt2_head, GPT2_LINEARS)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32):
    """Zero KV cache: a list (one per layer) of ``{"k", "v"}`` of (B, max_len, KVH, D)."""
    shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.num_layers)]


__all__ = ["GPT2", "DecoderParts", "Llama", "ModelConfig", "build_model", "decoder_parts",
           "from_hf_config", "init_cache",
           "to_hf_config"]
