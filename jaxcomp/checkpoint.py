"""Save and reopen (compressed) param pytrees with orbax, plus the model config and tokenizer.

Layout of a checkpoint directory::

    jaxcomp.json   manifest: model config, and for every compressed leaf its type and static
                   metadata (format, shape, ...); plain JSON, no pickles
    params/        orbax checkpoint of the arrays; a compressed leaf at path P stores its
                   array fields under P/<field> (packed codes stay uint8: orbax cannot store
                   uint4)
    tokenizer/     the tokenizer (when there is one)

Restoring needs nothing of the original model.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import is_leaf, path_str
from jaxcomp.errors import JaxcompError
from jaxcomp.models.config import ModelConfig

MANIFEST = "jaxcomp.json"


def _leaf_types() -> dict[str, type]:
    # Every compressed leaf and format type a checkpoint may hold, by class name.
    from jaxcomp.quant.formats import CodebookFormat, IntFormat
    from jaxcomp.quant.qarray import QArray

    return {c.__name__: c for c in (QArray, IntFormat, CodebookFormat)}


def _encode(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, (tuple, list)):
        return [_encode(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def _decode(value, as_tuple: bool = True):
    if isinstance(value, dict) and "__type__" in value:
        cls = _leaf_types()[value["__type__"]]
        return cls(**{k: _decode(v) for k, v in value.items() if k != "__type__"})
    if isinstance(value, list):
        items = [_decode(v) for v in value]
        return tuple(items) if as_tuple else items
    return value


def _put(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _pop(tree: dict, path: str):
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree[p]
    return tree.pop(leaf)


def save_checkpoint(path: str, params, config: ModelConfig | None = None, tokenizer=None) -> None:
    """Writes ``params`` (plain or compressed leaves) to a new directory ``path``.

    Args:
      path: directory to create (must not exist).
      params: nested-dict param tree.
      config: the model config, so :func:`load_checkpoint` can rebuild the model.
      tokenizer: an HF tokenizer to store beside the weights.

    Example:
      >>> save_checkpoint("/tmp/ckpt", quantized_params, cfg, tokenizer)  # doctest: +SKIP
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    arrays: dict = {}
    leaves: dict[str, dict] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_leaf)[0]:
        p = path_str(keypath)
        if isinstance(leaf, CompressedLeaf):
            spec = {"type": type(leaf).__name__, "static": {}, "none": []}
            for f in dataclasses.fields(leaf):
                value = getattr(leaf, f.name)
                if not f.metadata.get("pytree_node", True):
                    spec["static"][f.name] = _encode(value)
                elif value is None:
                    spec["none"].append(f.name)
                else:
                    _put(arrays, f"{p}/{f.name}", value)
            leaves[p] = spec
        else:
            _put(arrays, p, leaf)
    os.makedirs(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), arrays)
    checkpointer.wait_until_finished()
    manifest = {"format": "jaxcomp-checkpoint", "version": 1, "leaves": leaves,
                "config": None if config is None else dataclasses.asdict(config)}
    with open(os.path.join(path, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(path, "tokenizer"))


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def load_checkpoint(path: str):
    """Reopens a checkpoint written by :func:`save_checkpoint`.

    Returns:
      ``(params, config, tokenizer)``; ``config``/``tokenizer`` are ``None`` if not saved.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise JaxcompError(f"{path}: not a jaxcomp checkpoint ({e})") from None
    try:
        tree = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    except Exception as e:
        raise JaxcompError(f"{path}: cannot restore params ({type(e).__name__})") from None
    types = _leaf_types()
    for p, spec in manifest["leaves"].items():
        fields = _pop(tree, p)
        fields.update({name: None for name in spec["none"]})
        fields.update({k: _decode(v) for k, v in spec["static"].items()})
        _put(tree, p, types[spec["type"]](**fields))
    config = manifest.get("config")
    if config is not None:
        config["rope_scaling"] = tuple(tuple(kv) for kv in config["rope_scaling"])
        config = ModelConfig(**config)
    tokenizer = None
    if os.path.isdir(os.path.join(path, "tokenizer")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    return tree, config, tokenizer
