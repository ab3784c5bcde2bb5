"""One hashable model configuration for every architecture jaxcomp runs, built from HF configs."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxcomp.errors import JaxcompError

LLAMA_LIKE = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters (static, hashable: safe as a jit static argument).

    Attributes:
      arch: ``"llama"`` (LLaMA/Mistral/Qwen2 family) or ``"gpt2"``.
      model_type: the HF ``model_type`` it came from (kept for export).
      vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
      head_dim: the usual sizes (``num_kv_heads < num_heads`` is grouped-query attention).
      max_position_embeddings: longest supported sequence.
      norm_eps: RMSNorm (llama) or LayerNorm (gpt2) epsilon.
      rope_theta: RoPE base; ``rope_scaling`` holds extra RoPE parameters as sorted items
        (``rope_type`` ``"default"`` or ``"llama3"``).
      tie_word_embeddings: whether the LM head reuses the token embedding.
      qkv_bias, o_bias, mlp_bias: which projections carry biases (Qwen2: qkv only).
      sliding_window: Mistral-style attention window, or ``None``.
    """

    arch: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def rope_type(self) -> str:
        return dict(self.rope_scaling).get("rope_type", "default")


def from_hf_config(hf) -> ModelConfig:
    """Builds a :class:`ModelConfig` from a ``transformers`` config (or its dict).

    Args:
      hf: a ``PretrainedConfig`` (LLaMA, Mistral, Qwen2 or GPT-2) or its ``to_dict()``.

    Returns:
      The matching ``ModelConfig``.

    Raises:
      JaxcompError: for an architecture or feature jaxcomp does not implement.
    """
    d = hf if isinstance(hf, dict) else hf.to_dict()
    model_type = d.get("model_type", "")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if model_type in LLAMA_LIKE:
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", rope.pop("type", "default"))
        if rope["rope_type"] not in ("default", "llama3"):
            raise JaxcompError(
                f"rope type {rope['rope_type']!r} is not supported (supported: default, llama3)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise JaxcompError("partial_rotary_factor != 1 is not supported")
        rope.pop("partial_rotary_factor", None)
        window = d.get("sliding_window")
        if model_type == "qwen2":
            if d.get("use_sliding_window"):
                raise JaxcompError("Qwen2 with use_sliding_window=True is not supported")
            window = None
        hidden_act = d.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise JaxcompError(f"hidden_act {hidden_act!r} is not supported for {model_type}")
        attn_bias = bool(d.get("attention_bias", False))
        return ModelConfig(
            arch="llama",
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=attn_bias or model_type == "qwen2",
            o_bias=attn_bias and model_type != "qwen2",
            mlp_bias=bool(d.get("mlp_bias", False)),
            sliding_window=window,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
        )
    if model_type == "gpt2":
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise JaxcompError(f"GPT-2 activation {act!r} is not supported (gelu_new only)")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise JaxcompError("GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                               "reorder_and_upcast_attn) are not supported")
        n_embd = d["n_embd"]
        return ModelConfig(
            arch="gpt2",
            model_type="gpt2",
            vocab_size=d["vocab_size"],
            hidden_size=n_embd,
            intermediate_size=d.get("n_inner") or 4 * n_embd,
            num_layers=d["n_layer"],
            num_heads=d["n_head"],
            num_kv_heads=d["n_head"],
            head_dim=n_embd // d["n_head"],
            max_position_embeddings=d["n_positions"],
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=True,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
        )
    raise JaxcompError(f"model_type {model_type!r} is not supported "
                       "(supported: llama, mistral, qwen2, gpt2)")


def to_hf_config(cfg: ModelConfig):
    """Returns the ``transformers`` config that describes ``cfg`` (for export)."""
    import transformers

    if cfg.arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size, layer_norm_epsilon=cfg.norm_eps,
            activation_function="gelu_new", bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id, tie_word_embeddings=True)
    rope = {"rope_theta": cfg.rope_theta, **dict(cfg.rope_scaling)}
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, rope_parameters=rope)
    if cfg.model_type == "qwen2":
        return transformers.Qwen2Config(**common)
    if cfg.model_type == "mistral":
        return transformers.MistralConfig(**common, head_dim=cfg.head_dim,
                                          sliding_window=cfg.sliding_window)
    return transformers.LlamaConfig(**common, head_dim=cfg.head_dim,
                                    attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
