"""Hugging Face checkpoints: HF tensor names <-> the Flax param tree, lazy loading, export.

Every loader (safetensors directories here, GGUF in ``gguf_loader``) yields tensors under HF
PyTorch names and layout; :func:`params_from_tensors` is the one place that maps them into the
param tree, checking names and shapes against the config.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.errors import JaxcompError
from jaxcomp.models.config import ModelConfig, from_hf_config, to_hf_config

# (HF name regex, param path template, transpose?) -- nn.Linear stores (out, in); GPT-2's
# Conv1D already stores (in, out).
_LLAMA_NAMES = [
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", False),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight", "layers_{0}/{1}/{2}/kernel",
     True),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias", "layers_{0}/{1}/{2}/bias", False),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
     "layers_{0}/{1}/scale", False),
    (r"model\.norm\.weight", "norm/scale", False),
    (r"lm_head\.weight", "lm_head/kernel", True),
]
_GPT2_NAMES = [
    (r"(?:transformer\.)?(wte|wpe)\.weight", "{0}/embedding", False),
    (r"(?:transformer\.)?h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.weight",
     "h_{0}/{1}/{2}/kernel", False),
    (r"(?:transformer\.)?h\.(\d+)\.(attn|mlp)\.(c_attn|c_proj|c_fc)\.bias", "h_{0}/{1}/{2}/bias",
     False),
    (r"(?:transformer\.)?(h\.(\d+)\.)?(ln_1|ln_2|ln_f)\.weight", None, False),
    (r"(?:transformer\.)?(h\.(\d+)\.)?(ln_1|ln_2|ln_f)\.bias", None, False),
]
# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r".*(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$|^lm_head\.weight$")


def _gpt2_norm_path(m: re.Match, leaf: str) -> str:
    layer, norm = m.group(2), m.group(3)
    return f"h_{layer}/{norm}/{leaf}" if layer is not None else f"{norm}/{leaf}"


def hf_name_to_path(cfg: ModelConfig, name: str) -> tuple[str, bool] | None:
    """Maps an HF tensor name to ``(param path, transpose)``; ``None`` for ignorable buffers."""
    table = _GPT2_NAMES if cfg.arch == "gpt2" else _LLAMA_NAMES
    for pattern, template, transpose in table:
        m = re.fullmatch(pattern, name)
        if m:
            if template is None:
                return _gpt2_norm_path(m, "scale" if name.endswith("weight") else "bias"), False
            return template.format(*m.groups()), transpose
    if cfg.arch == "gpt2" and _IGNORED.match(name):
        return None  # GPT-2's tied lm_head.weight and attention mask buffers
    if cfg.arch != "gpt2" and re.match(r".*rotary_emb\.inv_freq$", name):
        return None
    raise JaxcompError(f"checkpoint tensor {name!r} does not belong to a {cfg.model_type} model")


def path_to_hf_name(cfg: ModelConfig, path: str) -> tuple[str, bool]:
    """Inverse of :func:`hf_name_to_path` (used by export)."""
    parts = path.split("/")
    if cfg.arch == "gpt2":
        leaf = {"embedding": "weight", "kernel": "weight", "scale": "weight", "bias": "bias"}
        head = parts[0]
        prefix = f"transformer.h.{head[2:]}." if head.startswith("h_") else "transformer."
        rest = parts[1:-1] if head.startswith("h_") else parts[:-1]
        return prefix + ".".join([*rest, leaf[parts[-1]]]), False
    if parts[0] == "lm_head":
        return "lm_head.weight", True
    if parts[0].startswith("layers_"):
        mid = ".".join(parts[1:-1])
        leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[parts[-1]]
        return f"model.layers.{parts[0][7:]}.{mid}.{leaf}", parts[-1] == "kernel"
    return {"embed_tokens/embedding": "model.embed_tokens.weight",
            "norm/scale": "model.norm.weight"}[path], False


def _set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Param path -> shape for ``cfg`` (abstract init, no memory)."""
    from jaxcomp.models import build_model

    model = build_model(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 1), np.int32))["params"]
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(k.key for k in kp): tuple(v.shape) for kp, v in flat}


def params_from_tensors(cfg: ModelConfig, tensors: Iterable[tuple[str, np.ndarray]],
                        param_dtype=np.float32, source: str = "checkpoint",
                        only: str | None = None) -> dict:
    """Builds the param tree from ``(hf_name, array)`` pairs, consumed one at a time.

    Args:
      cfg: the model's config.
      tensors: HF-named tensors in HF layout (any order).
      param_dtype: dtype of the stored params.
      source: file name for error messages.
      only: build just this top-level entry (``"layers_3"``); other tensors are skipped.

    Returns:
      The nested param dict (``{"embed_tokens": {"embedding": ...}, ...}``).

    Raises:
      JaxcompError: unknown or missing tensors, or a shape that contradicts the config.
    """
    want = expected_shapes(cfg)
    if only is not None:
        want = {p: s for p, s in want.items() if p.split("/")[0] == only}
    params: dict = {}
    seen = set()
    bar = tqdm(total=len(want), desc=f"load {os.path.basename(source)}", unit="tensor",
               leave=False, disable=not sys.stderr.isatty() or only is not None)
    for name, array in tensors:
        target = hf_name_to_path(cfg, name)
        if target is None:
            continue
        path, transpose = target
        if only is not None and path.split("/")[0] != only:
            continue
        if path not in want:
            raise JaxcompError(f"{source}: tensor {name!r} has no place in this config ({path})")
        array = np.asarray(array)
        if transpose:
            array = array.T
        if tuple(array.shape) != want[path]:
            raise JaxcompError(f"{source}: tensor {name!r} has shape {tuple(array.shape)} but the "
                               f"config expects {want[path]} for {path}")
        if not np.isfinite(array).all():
            raise JaxcompError(f"{source}: tensor {name!r} ({path}) contains NaN or Inf")
        _set(params, path, jax.numpy.asarray(array, dtype=param_dtype))
        seen.add(path)
        bar.update()
    bar.close()
    missing = sorted(set(want) - seen)
    if missing:
        raise JaxcompError(f"{source}: missing {len(missing)} tensors, e.g. {missing[0]!r} "
                           f"(HF name {path_to_hf_name(cfg, missing[0])[0]!r})")
    return params


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return sorted({os.path.join(path, v) for v in weight_map.values()})
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise JaxcompError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, float32 array)`` from an HF directory, one memory-mapped tensor at a time.

    bf16/fp16 tensors are upcast per tensor, so the checkpoint is never held twice in RAM.
    """
    from safetensors import safe_open

    for file in _safetensors_files(path):
        if not os.path.exists(file):
            raise JaxcompError(f"{file}: shard listed in the index is missing")
        try:
            # The flax framework reads bf16 (numpy cannot); arrays come back one by one.
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    yield name, np.asarray(f.get_tensor(name), dtype=np.float32)
        except JaxcompError:
            raise
        except Exception as e:  # safetensors raises its own types for corrupt files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise JaxcompError(f"{file}: cannot read safetensors ({msg})") from None


class StreamedParams(Mapping):
    """The top-level param entries of an HF checkpoint, each read from its safetensors files
    when it is looked up and not kept (``params["layers_3"]`` reads that block).

    The block-sequential pass (:func:`jaxcomp.calib.run_blocks`) reads one block at a time,
    so a checkpoint far larger than memory streams through it.

    Example:
      >>> params = StreamedParams("/path/to/llama-2-7b", cfg)  # doctest: +SKIP
      >>> block = params["layers_0"]  # only this block's tensors are read
    """

    def __init__(self, path: str, cfg: ModelConfig, param_dtype=np.float32):
        from safetensors import safe_open

        self.path, self.cfg, self.param_dtype = path, cfg, param_dtype
        self._files: dict[str, dict[str, str]] = {}  # top-level key -> {hf name: file}
        for file in _safetensors_files(path):
            if not os.path.exists(file):
                raise JaxcompError(f"{file}: shard listed in the index is missing")
            with safe_open(file, framework="flax") as f:
                for name in f.keys():
                    target = hf_name_to_path(cfg, name)
                    if target is not None:
                        self._files.setdefault(target[0].split("/")[0], {})[name] = file
        missing = sorted({p.split("/")[0] for p in expected_shapes(cfg)} - set(self._files))
        if missing:
            raise JaxcompError(f"{path}: no tensors for {missing[0]}")

    def _tensors(self, key: str) -> Iterator[tuple[str, np.ndarray]]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name, file in self._files[key].items():
            by_file.setdefault(file, []).append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="flax") as f:
                for name in names:
                    yield name, np.asarray(f.get_tensor(name), dtype=np.float32)

    def __getitem__(self, key: str):
        if key not in self._files:
            raise KeyError(key)
        return params_from_tensors(self.cfg, self._tensors(key), self.param_dtype,
                                   source=self.path, only=key)[key]

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def load_hf_config(path: str) -> tuple[ModelConfig, dict]:
    """Reads ``config.json`` of an HF directory into ``(ModelConfig, raw dict)``."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise JaxcompError(f"{path}: not an HF model directory (no config.json)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise JaxcompError(f"{file}: invalid JSON ({e})") from None
    import transformers

    try:
        hf = transformers.AutoConfig.for_model(**raw)
    except (KeyError, ValueError) as e:
        raise JaxcompError(f"{file}: unsupported config ({e})") from None
    return from_hf_config(hf), raw


def load_hf_dir(path: str, param_dtype=np.float32) -> tuple[ModelConfig, dict]:
    """Loads an HF checkpoint directory (config.json + safetensors, sharded or not).

    Example:
      >>> cfg, params = load_hf_dir("/path/to/llama")  # doctest: +SKIP
    """
    cfg, _ = load_hf_config(path)
    return cfg, params_from_tensors(cfg, iter_safetensors(path), param_dtype, source=path)


def export_hf(params, cfg: ModelConfig, out_dir: str, tokenizer=None) -> None:
    """Writes params as an HF directory (``config.json`` + ``model.safetensors``, float32).

    Compressed leaves are materialized, so transformers' ``LlamaForCausalLM`` /
    ``GPT2LMHeadModel`` load the result with the same logits.
    """
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    flat = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, CompressedLeaf))[0]
    tensors = {}
    for kp, leaf in flat:
        path = "/".join(k.key for k in kp)
        if isinstance(leaf, CompressedLeaf):
            leaf = leaf.materialize()
        name, transpose = path_to_hf_name(cfg, path)
        array = np.asarray(leaf, dtype=np.float32)
        tensors[name] = np.ascontiguousarray(array.T if transpose else array)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf = to_hf_config(cfg)
    hf.architectures = ["GPT2LMHeadModel" if cfg.arch == "gpt2" else
                        {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}.get(
                            cfg.model_type, "LlamaForCausalLM")]
    hf.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
