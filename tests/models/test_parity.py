"""Parity with transformers' PyTorch models (a reference no one here wrote)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxcomp.models import build_model  # noqa: E402
from jaxcomp.models.generate import generate  # noqa: E402
from jaxcomp.models.hf import export_hf, load_hf_dir  # noqa: E402

pytestmark = pytest.mark.parity

TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

CONFIGS = {
    "llama-gqa": lambda: transformers.LlamaConfig(**TINY_LLAMA),
    "llama-tied-theta": lambda: transformers.LlamaConfig(
        **TINY_LLAMA, tie_word_embeddings=True, rope_parameters={"rope_theta": 500.0,
                                                                  "rope_type": "default"}),
    "llama3-rope": lambda: transformers.LlamaConfig(
        **TINY_LLAMA, rope_parameters={"rope_theta": 50000.0, "rope_type": "llama3",
                                       "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}),
    "qwen2-bias": lambda: transformers.Qwen2Config(**TINY_LLAMA),
    "mistral-window": lambda: transformers.MistralConfig(**TINY_LLAMA, sliding_window=8),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=64,
                                            n_layer=3, n_head=4),
}


def _torch_model(hf_config):
    torch.manual_seed(0)
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    # Random biases/norms too, so a wrong mapping cannot hide behind zeros and ones.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _torch_greedy(model, prompt, n):
    ids = torch.tensor(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids.numpy()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf_config = CONFIGS[request.param]()
    torch_model = _torch_model(hf_config)
    path = tmp_path_factory.mktemp(request.param)
    torch_model.save_pretrained(path, safe_serialization=True)
    cfg, params = load_hf_dir(str(path))
    return request.param, torch_model, cfg, params, path


def test_logits_match(pair):
    name, torch_model, cfg, params, _ = pair
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 24))
    with torch.no_grad():
        want = torch_model(torch.tensor(tokens)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray(tokens)))
    assert got.shape == want.shape
    assert _rel_err(got, want) <= 1e-5, name


def test_greedy_generation_matches(pair):
    _, torch_model, cfg, params, _ = pair
    prompt = np.random.default_rng(1).integers(0, 256, size=(1, 5))
    want = _torch_greedy(torch_model, prompt, 20)
    with jax.default_matmul_precision("highest"):
        got = np.asarray(generate(build_model(cfg), params, prompt, 20))
    np.testing.assert_array_equal(got, want)


def test_export_round_trip(pair, tmp_path):
    name, torch_model, cfg, params, _ = pair
    export_hf(params, cfg, str(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.tensor(np.random.default_rng(2).integers(0, 256, size=(1, 16)))
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(),
                                   torch_model(tokens).logits.numpy(), rtol=0, atol=1e-5)
