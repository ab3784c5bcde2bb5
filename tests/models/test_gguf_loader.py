"""GGUF loading: names, orientation, llama.cpp's Q/K permutation, quant types, bad files."""

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model
from jaxcomp.models.gguf_loader import iter_gguf_tensors, read_gguf_config, unpermute_qk
from jaxcomp.models.hf import params_from_tensors
from jaxcomp.models.loading import load_model

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 96, 2, 4, 2, 128


def _llamacpp_permute(w, n_head):
    # What llama.cpp's HF->GGUF converter does to q_proj/k_proj rows.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _hf_tensors(seed=0):
    rng = np.random.default_rng(seed)
    t = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, HIDDEN)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=HIDDEN),
         "lm_head.weight": rng.normal(size=(VOCAB, HIDDEN))}
    hd = HIDDEN // HEADS
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rng.normal(size=(HEADS * hd, HIDDEN))
        t[p + "self_attn.k_proj.weight"] = rng.normal(size=(KV_HEADS * hd, HIDDEN))
        t[p + "self_attn.v_proj.weight"] = rng.normal(size=(KV_HEADS * hd, HIDDEN))
        t[p + "self_attn.o_proj.weight"] = rng.normal(size=(HIDDEN, HEADS * hd))
        t[p + "mlp.gate_proj.weight"] = rng.normal(size=(FFN, HIDDEN))
        t[p + "mlp.up_proj.weight"] = rng.normal(size=(FFN, HIDDEN))
        t[p + "mlp.down_proj.weight"] = rng.normal(size=(HIDDEN, FFN))
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=HIDDEN)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=HIDDEN)
    return {k: (0.05 * v).astype(np.float32) for k, v in t.items()}


_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def write_gguf(path, tensors, arch="llama", qtype=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    for hf, array in tensors.items():
        if "q_proj" in hf:
            array = _llamacpp_permute(array, HEADS)
        elif "k_proj" in hf:
            array = _llamacpp_permute(array, KV_HEADS)
        if qtype is not None and array.ndim == 2:
            w.add_tensor(_gguf_name(hf), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(hf), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_f32_round_trip_exact(tmp_path):
    tensors = _hf_tensors()
    write_gguf(tmp_path / "m.gguf", tensors)
    cfg = read_gguf_config(str(tmp_path / "m.gguf"))
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (HIDDEN, FFN, LAYERS)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (HEADS, KV_HEADS,
                                                                                 VOCAB)
    assert not cfg.tie_word_embeddings
    got = dict(iter_gguf_tensors(str(tmp_path / "m.gguf")))
    assert set(got) == set(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(got[name], want, err_msg=name)


def test_unpermute_inverts_llamacpp_permutation():
    w = np.arange(8 * 3 * 5).reshape(24, 5)
    for heads in (1, 2, 3):
        np.testing.assert_array_equal(unpermute_qk(_llamacpp_permute(w, heads), heads), w)
    assert not np.array_equal(_llamacpp_permute(w, 2), w)


@pytest.mark.parametrize("qtype, tol", [(gguf.GGMLQuantizationType.Q8_0, 0.01),
                                        (gguf.GGMLQuantizationType.Q4_0, 0.2)])
def test_quantized_tensors_dequantize(tmp_path, qtype, tol):
    tensors = _hf_tensors()
    write_gguf(tmp_path / "q.gguf", tensors, qtype=qtype)
    got = dict(iter_gguf_tensors(str(tmp_path / "q.gguf")))
    for name, want in tensors.items():
        err = np.abs(got[name] - want).max() / np.abs(want).max()
        assert err < tol, (name, err)
        assert err > 0 or want.ndim == 1, name  # really quantized


def test_gguf_model_runs_like_hf_tensors(tmp_path):
    tensors = _hf_tensors()
    write_gguf(tmp_path / "m.gguf", tensors)
    loaded = load_model(str(tmp_path / "m.gguf"))
    assert loaded.tokenizer is None
    reference = params_from_tensors(loaded.config, tensors.items())
    tokens = jnp.asarray(np.arange(12).reshape(1, 12))
    model = build_model(loaded.config)
    np.testing.assert_array_equal(model.apply({"params": loaded.params}, tokens),
                                  model.apply({"params": reference}, tokens))


def test_bad_files(tmp_path):
    with pytest.raises(JaxcompError, match="not found"):
        read_gguf_config(str(tmp_path / "missing.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(JaxcompError, match="junk.gguf"):
        read_gguf_config(str(tmp_path / "junk.gguf"))
    write_gguf(tmp_path / "m.gguf", _hf_tensors())
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(JaxcompError, match="truncated"):
        list(iter_gguf_tensors(str(tmp_path / "cut.gguf")))
    write_gguf(tmp_path / "other.gguf", _hf_tensors(), arch="falcon")
    with pytest.raises(JaxcompError, match="falcon"):
        read_gguf_config(str(tmp_path / "other.gguf"))
