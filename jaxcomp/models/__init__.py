"""Flax models (LLaMA family, GPT-2), loaders, export and generation."""

from __future__ import annotations

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


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32):
    """Zero KV cache: a list (one per layer) of ``{"k", "v"}`` of (B, max_len, KVH, D)."""
    shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
            for _ in range(cfg.num_layers)]


__all__ = ["GPT2", "Llama", "ModelConfig", "build_model", "from_hf_config", "init_cache",
           "to_hf_config"]
