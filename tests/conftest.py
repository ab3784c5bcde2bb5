"""Shared fixtures: a tiny random LLaMA checkpoint directory with a real (tiny) tokenizer."""

import os
import re

import jax
import numpy as np
import pytest

TEXT = (
    "The quick brown fox jumps over the lazy dog. A compression framework keeps models small.\n\n"
    "Tensor networks factorize weight matrices. Quantization stores weights in few bits.\n\n"
    "Perplexity measures how well a model predicts text it has not seen before.\n\n"
) * 40


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]", TEXT)))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """An HF directory (config.json, model.safetensors, tokenizer) of a random tiny LLaMA."""
    import transformers

    from jaxcomp.models import build_model, from_hf_config
    from jaxcomp.models.hf import export_hf

    tokenizer = _tiny_tokenizer()
    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256,
                                  bos_token_id=1, eos_token_id=2)
    cfg = from_hf_config(hf)
    params = build_model(cfg).init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    path = tmp_path_factory.mktemp("tiny_llama")
    export_hf(params, cfg, str(path), tokenizer)
    return str(path)


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture
def smollm2_gguf():
    from jaxcomp.errors import JaxcompError
    from jaxcomp.models.loading import smollm2_path

    try:
        return smollm2_path()
    except JaxcompError as e:
        pytest.skip(str(e))


def pytest_configure(config):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
