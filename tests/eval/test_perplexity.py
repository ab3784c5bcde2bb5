"""Perplexity: the chunked LM-head NLL against a float64 log-softmax of the model's own logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.eval import perplexity
from jaxcomp.eval.perplexity import head_nll
from jaxcomp.models import ModelConfig, build_model, decoder_parts


def _model(arch, tied):
    cfg = ModelConfig(arch=arch, model_type=arch, vocab_size=50, hidden_size=32,
                      intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, max_position_embeddings=64, norm_eps=1e-5,
                      tie_word_embeddings=tied)
    model = build_model(cfg)
    params = model.init(jax.random.key(1), np.zeros((1, 4), np.int32))["params"]
    # larger than init's 0.02 scale, so the logits are far from uniform
    params = jax.tree.map(lambda p: p * 20 if p.ndim == 2 else p, params)
    return model, params


def _reference_nll(model, params, windows):
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(windows)), np.float64)
    logits = logits[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]
    return float(np.sum(logz - picked))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("gpt2", True)])
def test_perplexity_matches_full_logits(arch, tied):
    model, params = _model(arch, tied)
    windows = np.random.default_rng(0).integers(0, 50, (5, 12)).astype(np.int32)
    ref = _reference_nll(model, params, windows)
    # 5 windows in batches of 2: the last batch is padded and masked
    result = perplexity(model, params, windows, batch_size=2, progress=False)
    assert result.tokens == 5 * 11
    np.testing.assert_allclose(result.nll, ref, rtol=1e-5)
    np.testing.assert_allclose(result.ppl, np.exp(ref / result.tokens), rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, 22, 1000])
def test_head_nll_any_row_chunk(rows):
    """Row chunks that do not divide the positions (padding rows), and weights per window."""
    model, params = _model("llama", False)
    windows = np.random.default_rng(1).integers(0, 50, (3, 12)).astype(np.int32)
    hidden = model.apply({"params": params}, jnp.asarray(windows), hidden=True)
    weight = jnp.asarray([1.0, 0.0, 2.0])
    got = head_nll(decoder_parts(model).head, params, hidden, jnp.asarray(windows), weight, rows)
    ref = sum(w * _reference_nll(model, params, windows[i:i + 1])
              for i, w in enumerate([1.0, 0.0, 2.0]))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
