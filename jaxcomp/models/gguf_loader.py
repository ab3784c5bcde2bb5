"""GGUF checkpoints (llama.cpp's format), LLaMA architecture, read into Hugging Face naming.

Like every jaxcomp loader, this one ends at Hugging Face names and layout: a
``transformers.LlamaConfig`` and ``(name, array)`` pairs such as
``model.layers.0.self_attn.q_proj.weight`` of shape ``(out_features, in_features)``.

Three things differ between a GGUF file and an HF checkpoint, and are undone here:

* **Names**: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` etc.
* **Shape order**: GGUF lists dimensions fastest-first (``ne[0]`` is the contiguous one), so the
  numpy shape is the reversed GGUF shape; for a linear weight that is HF's ``(out, in)``.
* **Q/K row order**: llama.cpp's HF->GGUF converter permutes the rows of ``q_proj``/``k_proj``
  within each head so that its *interleaved* RoPE (rotating pairs ``(2i, 2i+1)``) computes what
  HF's *rotate-half* RoPE (pairs ``(i, i + head_dim/2)``) computes on the original rows. Its
  permutation is ``w.reshape(n_head, 2, head_dim // 2, -1).swapaxes(1, 2)`` (``n_head`` is the
  KV head count for ``k_proj``); :func:`unpermute_qk` applies the exact inverse.

Tensors are memory-mapped with ``gguf.GGUFReader`` and dequantized one at a time with
``gguf.quants.dequantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ*, ...),
so peak memory is about one float tensor, not the whole model.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from jaxcomp.errors import JaxcompError

ARCH = "llama"

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF block tensor -> (HF module under model.layers.N, whether it may carry a bias).
_BLOCK = {
    "attn_q": ("self_attn.q_proj", True),
    "attn_k": ("self_attn.k_proj", True),
    "attn_v": ("self_attn.v_proj", True),
    "attn_output": ("self_attn.o_proj", True),
    "ffn_gate": ("mlp.gate_proj", True),
    "ffn_up": ("mlp.up_proj", True),
    "ffn_down": ("mlp.down_proj", True),
    "attn_norm": ("input_layernorm", False),
    "ffn_norm": ("post_attention_layernorm", False),
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
# Tensors with no HF parameter: RoPE tables llama.cpp can compute itself. rope_freqs is checked
# by read_gguf_config (non-trivial frequency factors are refused there).
_NO_HF_PARAM = re.compile(r"rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?")

_MISSING = object()


# --------------------------------------------------------------------------------------------
# Opening and validating a file.


def _open(path) -> Any:
    """A validated ``GGUFReader`` for ``path`` (cached while the file is unchanged)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise JaxcompError(f"{path}: GGUF file not found")
    if not os.path.isfile(path):
        raise JaxcompError(f"{path}: not a file (expected a .gguf file)")
    stat = os.stat(path)
    # Parsing the header of a real model (50k-token vocabulary) takes seconds; config, tensors
    # and tokenizer are usually read one after the other, so keep the last readers.
    return _open_cached(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int, inode: int):
    del mtime_ns, inode  # cache key only
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # bad magic, cut-off header or data: the reader fails in many ways
        reason = (str(e).splitlines() or [""])[0][:200] or type(e).__name__
        raise JaxcompError(
            f"{path}: not a valid GGUF file (truncated or corrupt: {reason})") from e
    data_start = int(reader.data_offset)
    for t in reader.tensors:
        start, end = int(t.data_offset), int(t.data_offset) + int(t.n_bytes)
        if start < data_start or t.data.nbytes != t.n_bytes or end > size:
            raise JaxcompError(
                f"{path}: truncated or corrupt GGUF file: tensor {t.name} needs bytes "
                f"{start:,}..{end:,} but the file has {size:,} bytes")
    return reader


def _value(reader, key: str, path, default=_MISSING):
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise JaxcompError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _int(reader, key: str, path, default=_MISSING) -> int | None:
    value = _value(reader, key, path, default)
    if value is None:
        return None
    if isinstance(value, list):  # per-layer values (some architectures); LLaMA needs one
        if not value or any(v != value[0] for v in value):
            raise JaxcompError(f"{path}: GGUF metadata {key} varies per layer ({value[:8]}); "
                               "only a single value is supported")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise JaxcompError(f"{path}: GGUF metadata {key} should be an integer, got {value!r}")
    return value


def _float(reader, key: str, path, default=_MISSING) -> float | None:
    value = _value(reader, key, path, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JaxcompError(f"{path}: GGUF metadata {key} should be a number, got {value!r}")
    # GGUF stores float32; the shortest decimal that round-trips float32 gives back the value
    # the converter was given (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _check_arch(reader, path) -> None:
    arch = _value(reader, "general.architecture", path, None)
    if arch != ARCH:
        raise JaxcompError(f"{path}: GGUF architecture {arch!r} is not supported "
                           f"(jaxcomp reads {ARCH!r} GGUF files only)")
    experts = _int(reader, f"{ARCH}.expert_count", path, None)
    if experts:
        raise JaxcompError(f"{path}: mixture-of-experts GGUF ({experts} experts, "
                           f"{ARCH}.expert_count) is not supported")


def _tensors(reader) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


# --------------------------------------------------------------------------------------------
# Config.


def _rope_parameters(reader, path, tensors, head_dim: int) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": _float(reader, f"{ARCH}.rope.freq_base", path, 10000.0),
                            "rope_type": "default"}
    rotary_dims = _int(reader, f"{ARCH}.rope.dimension_count", path, None)
    if rotary_dims is not None and rotary_dims != head_dim:
        rope["partial_rotary_factor"] = rotary_dims / head_dim
    scaling = _value(reader, f"{ARCH}.rope.scaling.type", path, None)
    if scaling not in (None, "none"):
        factor = _float(reader, f"{ARCH}.rope.scaling.factor", path)
        if scaling == "linear":
            rope.update(rope_type="linear", factor=factor)
        elif scaling == "yarn":
            rope.update(rope_type="yarn", factor=factor)
            optional = {"original_context_length": "original_max_position_embeddings",
                        "yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow",
                        "attn_factor": "attention_factor"}
            for gguf_key, hf_key in optional.items():
                value = _value(reader, f"{ARCH}.rope.scaling.{gguf_key}", path, None)
                if value is not None:
                    rope[hf_key] = value if isinstance(value, int) else _float(
                        reader, f"{ARCH}.rope.scaling.{gguf_key}", path)
        else:
            raise JaxcompError(f"{path}: GGUF rope scaling type {scaling!r} is not supported "
                               "(none, linear, yarn)")
    freqs = tensors.get("rope_freqs.weight")
    if freqs is not None:
        factors = _dequantize(freqs, path)
        if not np.all(factors == 1.0):
            # Llama-3.1-style scaling is stored as per-frequency divisors, not as parameters.
            raise JaxcompError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, e.g. "
                               "Llama 3.1 scaling) are not supported")
    return rope


def read_gguf_config(path):
    """Builds a ``transformers.LlamaConfig`` from a GGUF file's metadata.

    Sizes come from the ``llama.*`` keys (``block_count``, ``embedding_length``,
    ``feed_forward_length``, ``attention.head_count[_kv]``, ``attention.key_length`` for an
    explicit head size, ``context_length``, ``attention.layer_norm_rms_epsilon``,
    ``rope.freq_base``, ``rope.scaling.*``), the vocabulary size from the embedding's shape
    (else ``llama.vocab_size`` or the token list), ``tie_word_embeddings`` from the absence of
    an ``output.weight`` tensor, and BOS/EOS/PAD ids from ``tokenizer.ggml.*``.

    Args:
      path: a ``.gguf`` file whose ``general.architecture`` is ``"llama"``.

    Returns:
      The ``transformers.LlamaConfig``.

    Raises:
      JaxcompError: missing, truncated or corrupt file, another architecture, missing size
        keys, or a feature HF's LLaMA cannot express (per-frequency RoPE factors, experts).

    Example:
      >>> cfg = read_gguf_config("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
      >>> cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.tie_word_embeddings  # doctest: +SKIP
      (30, 3, True)
    """
    import transformers

    reader = _open(path)
    _check_arch(reader, path)
    tensors = _tensors(reader)
    hidden = _int(reader, f"{ARCH}.embedding_length", path)
    num_heads = _int(reader, f"{ARCH}.attention.head_count", path)
    num_kv_heads = _int(reader, f"{ARCH}.attention.head_count_kv", path, num_heads)
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise JaxcompError(f"{path}: GGUF head counts {num_heads} (query) and {num_kv_heads} "
                           "(key/value) are inconsistent")
    head_dim = _int(reader, f"{ARCH}.attention.key_length", path, None)
    if head_dim is None:
        if hidden % num_heads:
            raise JaxcompError(f"{path}: embedding_length {hidden} is not a multiple of "
                               f"head_count {num_heads} and there is no attention.key_length")
        head_dim = hidden // num_heads
    value_dim = _int(reader, f"{ARCH}.attention.value_length", path, head_dim)
    if value_dim != head_dim:
        raise JaxcompError(f"{path}: key_length {head_dim} != value_length {value_dim} is not "
                           "supported by LLaMA")

    embedding = tensors.get("token_embd.weight")
    if embedding is not None:
        embed_hidden, vocab_size = (int(d) for d in embedding.shape[:2])  # GGUF order: (in, out)
        if embed_hidden != hidden:
            raise JaxcompError(f"{path}: token_embd.weight has width {embed_hidden}, "
                               f"but embedding_length is {hidden}")
    else:
        vocab_size = _int(reader, f"{ARCH}.vocab_size", path, None)
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if vocab_size is None and tokens is not None:
            vocab_size = len(tokens.data)
        if vocab_size is None:
            raise JaxcompError(f"{path}: no token_embd.weight tensor, {ARCH}.vocab_size or "
                               "token list to take the vocabulary size from")

    optional: dict[str, Any] = {}
    context = _int(reader, f"{ARCH}.context_length", path, None)
    if context is not None:
        optional["max_position_embeddings"] = context
    eps = _float(reader, f"{ARCH}.attention.layer_norm_rms_epsilon", path, None)
    if eps is not None:
        optional["rms_norm_eps"] = eps
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=_int(reader, f"{ARCH}.feed_forward_length", path),
        num_hidden_layers=_int(reader, f"{ARCH}.block_count", path),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        rope_parameters=_rope_parameters(reader, path, tensors, head_dim),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=_int(reader, "tokenizer.ggml.bos_token_id", path, None),
        eos_token_id=_int(reader, "tokenizer.ggml.eos_token_id", path, None),
        pad_token_id=_int(reader, "tokenizer.ggml.padding_token_id", path, None),
        **optional,
    )


# --------------------------------------------------------------------------------------------
# Tensors.


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face LLaMA parameter name of a GGUF tensor.

    Args:
      gguf_name: e.g. ``"blk.3.attn_q.weight"``.

    Returns:
      e.g. ``"model.layers.3.self_attn.q_proj.weight"``; ``None`` for tensors without an HF
      parameter (``rope_freqs.weight``, ``blk.N.attn_rot_embd``).

    Raises:
      JaxcompError: for a name with no LLaMA counterpart.
    """
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    match = _BLOCK_RE.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK:
        module, may_have_bias = _BLOCK[match.group(2)]
        if match.group(3) == "weight" or may_have_bias:
            return f"model.layers.{int(match.group(1))}.{module}.{match.group(3)}"
    if _NO_HF_PARAM.fullmatch(gguf_name):
        return None
    raise JaxcompError(f"GGUF tensor {gguf_name!r} has no Hugging Face LLaMA counterpart")


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (HF rotate-half order from interleaved order).

    llama.cpp's converter stores ``w.reshape(n, 2, d // 2, ...).swapaxes(1, 2).reshape(shape)``
    for an HF ``q_proj``/``k_proj`` weight (or bias) with ``n`` heads of size ``d``: within each
    head, row ``half * d/2 + i`` moves to ``2 * i + half``. This is the exact inverse.

    Args:
      w: the stored ``(num_heads * head_dim, in_features)`` weight or ``(num_heads * head_dim,)``
        bias, rows in llama.cpp order.
      num_heads: number of heads in ``w`` (query heads for ``q_proj``, KV heads for ``k_proj``).

    Returns:
      A new array of the same shape, rows in HF order.

    Example:
      >>> unpermute_qk(np.array([0, 2, 1, 3]), 1)
      array([0, 1, 2, 3])
    """
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"{rows} rows do not split into {num_heads} heads of even size")
    stored = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
    return stored.swapaxes(1, 2).reshape(w.shape)


@functools.cache
def _can_dequantize(qtype) -> bool:
    from gguf.quants import GGML_QUANT_SIZES, dequantize

    if qtype.name == "F64":
        return True
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:  # one all-zero block: cheap, and asks gguf itself rather than a list kept here
        dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _dequantize(t, path) -> np.ndarray:
    """Float values of tensor ``t`` in numpy order (may be a read-only view of the file)."""
    from gguf.quants import dequantize

    if not _can_dequantize(t.tensor_type):
        raise JaxcompError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which "
                           "gguf.quants cannot dequantize")
    if t.tensor_type.name == "F64":
        values = np.asarray(t.data, np.float64)
    else:
        values = dequantize(t.data, t.tensor_type)
    return values.reshape(tuple(int(d) for d in reversed(t.shape)))


def iter_gguf_tensors(path, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yields a LLaMA GGUF file's tensors under Hugging Face names and layout, one at a time.

    Each tensor is dequantized from the memory-mapped file only when it is reached, so peak
    memory is about one float tensor. Linear weights come out as HF's ``(out, in)``;
    ``q_proj``/``k_proj`` rows are put back into HF's order (:func:`unpermute_qk`), so they
    work with HF's rotate-half RoPE. ``lm_head.weight`` appears only when the file has an
    ``output.weight`` (otherwise the embeddings are tied). The whole file (architecture, names,
    types, sizes) is checked when this function is called, before any tensor is produced.

    Args:
      path: a ``.gguf`` file whose ``general.architecture`` is ``"llama"``.
      dtype: numpy dtype of the yielded arrays (float32 by default; float16, bfloat16 ...).

    Returns:
      An iterator of ``(hf_name, array)``; every array is a fresh, writable copy.

    Raises:
      JaxcompError: missing/truncated/corrupt file, another architecture, an unknown tensor
        name, or a tensor type that ``gguf.quants`` cannot dequantize (named with its tensor).

    Example:
      >>> tensors = dict(iter_gguf_tensors("SmolLM2-135M-Instruct.Q4_1.gguf"))  # doctest: +SKIP
      >>> tensors["model.layers.0.self_attn.k_proj.weight"].shape  # doctest: +SKIP
      (192, 576)
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "biucmMOSU":
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    reader = _open(path)
    _check_arch(reader, path)
    num_heads = _int(reader, f"{ARCH}.attention.head_count", path)
    num_kv_heads = _int(reader, f"{ARCH}.attention.head_count_kv", path, num_heads)
    num_layers = _int(reader, f"{ARCH}.block_count", path)

    # Validate everything first, so a bad file fails before anything is yielded.
    plan = []
    for t in reader.tensors:
        try:
            name = hf_name(t.name)
        except JaxcompError as e:
            raise JaxcompError(f"{path}: {e}") from None
        if name is None:
            continue
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= num_layers:
            raise JaxcompError(f"{path}: tensor {t.name} is beyond block_count {num_layers}")
        if not _can_dequantize(t.tensor_type):
            raise JaxcompError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which "
                               "gguf.quants cannot dequantize")
        heads = (num_heads if ".q_proj." in name else num_kv_heads if ".k_proj." in name
                 else None)
        # The last GGUF dimension is the first numpy one: the rows (out_features).
        if heads is not None and int(t.shape[-1]) % (2 * heads):
            raise JaxcompError(f"{path}: tensor {t.name} with shape {list(t.shape)} does not "
                               f"split into {heads} heads of even size")
        plan.append((t, name, heads))

    return _dequantized(plan, path, dtype)


def _dequantized(plan, path, dtype) -> Iterator[tuple[str, np.ndarray]]:
    for t, name, heads in plan:
        values = _dequantize(t, path)
        if heads is not None:
            values = unpermute_qk(values, heads)  # a copy
        # F32 tensors dequantize to a read-only view of the memory map: copy those.
        yield name, values.astype(dtype, copy=not values.flags.writeable)


# --------------------------------------------------------------------------------------------
# Tokenizer.

# Special token -> the GGUF key of its id.
_SPECIAL_TOKEN_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                      "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def load_gguf_tokenizer(path):
    """The Hugging Face tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

    The metadata is read with ``gguf`` and handed to transformers' GGUF tokenizer builder,
    the one ``AutoTokenizer.from_pretrained(directory, gguf_file=name)`` uses, so the ids
    are the same. That route itself imports torch (transformers' GGUF reader does) and this
    one does not: loading a GGUF model needs no torch.

    Args:
      path: a ``.gguf`` file.

    Returns:
      A ``transformers.PreTrainedTokenizerFast``, or ``None`` when the file carries no
      tokenizer metadata.

    Raises:
      JaxcompError: missing/corrupt file, or metadata ``transformers`` cannot turn into a
        tokenizer.

    Example:
      >>> tok = load_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
      >>> tok.decode(tok("Hello world")["input_ids"])  # doctest: +SKIP
      'Hello world'
    """
    reader = _open(path)
    if "tokenizer.ggml.model" not in reader.fields:
        return None
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    # What transformers' get_gguf_tokenizer builds from its own (torch-importing) reader.
    groups = {group: {name: reader.fields[f"tokenizer.{key}"].contents()
                      for key, name in renames.items() if f"tokenizer.{key}" in reader.fields}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, config = groups["tokenizer"], groups["tokenizer_config"]
    if tokenizer["tokenizer_type"] == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp's default for sentencepiece
    tokens = tokenizer.get("tokens", [])
    for name, key in _SPECIAL_TOKEN_IDS.items():
        token_id = _value(reader, f"tokenizer.ggml.{key}", path, None)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise JaxcompError(f"{path}: GGUF metadata tokenizer.ggml.{key} = {token_id} is not "
                               f"an id of the {len(tokens)}-token vocabulary")
        config[name] = None if token_id is None else tokens[token_id]
    try:
        backend, extra = convert_gguf_tokenizer(_value(reader, "general.architecture", path),
                                                tokenizer)
        return PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=os.fspath(path),
                                       **config, **extra)
    except Exception as e:
        reason = (str(e).splitlines() or [""])[0][:200]
        raise JaxcompError(f"{path}: cannot build a tokenizer from the GGUF metadata "
                           f"({type(e).__name__}: {reason})") from e

