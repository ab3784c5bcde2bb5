"""GGUF checkpoints (llama.cpp's format) read with the ``gguf`` package, LLaMA architecture.

Tensors come out one at a time under Hugging Face names and layout, dequantized to float32 with
``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_x, Q2_K-Q6_K, ...). llama.cpp's
converter permutes the rows of ``q_proj``/``k_proj`` so its interleaved RoPE sees HF's
rotate-half pairs; :func:`unpermute_qk` undoes that, so the weights work with HF's RoPE.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np

from jaxcomp.errors import JaxcompError

_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
    (r"blk\.(\d+)\.attn_output\.(weight|bias)", "model.layers.{0}.self_attn.o_proj.{1}"),
    (r"blk\.(\d+)\.ffn_gate\.(weight|bias)", "model.layers.{0}.mlp.gate_proj.{1}"),
    (r"blk\.(\d+)\.ffn_up\.(weight|bias)", "model.layers.{0}.mlp.up_proj.{1}"),
    (r"blk\.(\d+)\.ffn_down\.(weight|bias)", "model.layers.{0}.mlp.down_proj.{1}"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
]
_IGNORED = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd")


def _reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise JaxcompError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # bad magic, truncated header, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise JaxcompError(
            f"{path}: not a readable GGUF file, truncated or corrupt ({msg})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise JaxcompError(f"{path}: truncated (tensor {t.name} ends at byte "
                               f"{t.data_offset + t.n_bytes:,}, file has {size:,})")
    return reader


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_config(path: str):
    """A ``transformers.LlamaConfig`` from a GGUF file's metadata.

    Args:
      path: a ``.gguf`` file with ``general.architecture == "llama"``.

    Returns:
      The config (vocab size from the embedding, ``tie_word_embeddings`` when there is no
      ``output.weight``).

    Example:
      >>> cfg = read_gguf_config(smollm2_path())  # doctest: +SKIP
    """
    import transformers

    reader = _reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise JaxcompError(f"{path}: GGUF architecture {arch!r} is not supported (llama only)")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise JaxcompError(f"{path}: no token_embd.weight tensor")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    rope = {"rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
            "rope_type": "default"}
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise JaxcompError(f"{path}: GGUF rope scaling "
                           f"{_field(reader, 'llama.rope.scaling.type')!r} is not supported")
    return transformers.LlamaConfig(
        vocab_size=int(names["token_embd.weight"].shape[-1]),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's row permutation of a (out, in) q/k weight (or (out,) bias).

    The converter maps rows ``(head, half, i)`` to ``(head, i, half)``; we map them back.
    """
    shape = w.shape
    w = w.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:])
    return w.swapaxes(1, 2).reshape(shape)


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name for a GGUF tensor name; ``None`` for tensors HF does not keep."""
    for pattern, template in _NAMES:
        m = re.fullmatch(pattern, gguf_name)
        if m:
            return template.format(*m.groups())
    if _IGNORED.fullmatch(gguf_name):
        return None
    raise JaxcompError(f"unknown GGUF tensor {gguf_name!r}")


def iter_gguf_tensors(path: str, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` in HF layout, one dequantized tensor at a time.

    Args:
      path: a llama-architecture ``.gguf`` file.
      dtype: output dtype.

    Returns:
      An iterator; the file is memory-mapped, so only the current tensor is materialized.
    """
    from gguf.quants import dequantize

    reader = _reader(path)
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        try:
            array = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise JaxcompError(f"{path}: tensor {t.name} has unsupported type "
                               f"{t.tensor_type.name}") from None
        # GGUF lists dims fastest-first; numpy wants them reversed: (out, in) as in HF.
        array = np.asarray(array, dtype=dtype).reshape(tuple(int(d) for d in t.shape[::-1]))
        if ".q_proj." in name:
            array = unpermute_qk(array, heads)
        elif ".k_proj." in name:
            array = unpermute_qk(array, kv_heads)
        yield name, array


def load_gguf_tokenizer(path: str):
    """The HF tokenizer described by a GGUF file's metadata (no torch needed), or ``None``
    when the file carries no tokenizer."""
    from transformers import AutoTokenizer

    if _field(_reader(path), "tokenizer.ggml.model") is None:
        return None
    try:
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                             gguf_file=os.path.basename(path))
    except Exception as e:
        raise JaxcompError(f"{path}: cannot build a tokenizer from the GGUF metadata "
                           f"({type(e).__name__})") from None
