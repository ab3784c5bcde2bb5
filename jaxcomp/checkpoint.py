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
    from jaxcomp.quant.actquant import ActQuant
    from jaxcomp.quant.formats import CodebookFormat, IntFormat
    from jaxcomp.quant.qarray import QArray
    from jaxcomp.tensornet import KronMatrix, LowRank, TTMatrix

    return {c.__name__: c for c in (QArray, IntFormat, CodebookFormat, TTMatrix, KronMatrix,
                                    LowRank, ActQuant)}


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


def _flatten_leaf(value, path: str, arrays: dict):
    """A compressed leaf's spec for the manifest; its arrays go into ``arrays`` under ``path``.

    Nested leaves (quantized TT cores) and tuples of arrays (TT cores) recurse.
    """
    if isinstance(value, CompressedLeaf):
        spec = {"type": type(value).__name__, "static": {}, "fields": {}}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if not f.metadata.get("pytree_node", True):
                spec["static"][f.name] = _encode(v)
            else:
                spec["fields"][f.name] = _flatten_leaf(v, f"{path}/{f.name}", arrays)
        return spec
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        return {"seq": [_flatten_leaf(v, f"{path}/{i}", arrays) for i, v in enumerate(value)]}
    _put(arrays, path, value)
    return "array"


def _unflatten_leaf(spec, path: str, tree: dict):
    if spec is None:
        return None
    if spec == "array":
        return _pop(tree, path)
    if "seq" in spec:
        return tuple(_unflatten_leaf(s, f"{path}/{i}", tree) for i, s in enumerate(spec["seq"]))
    fields = {k: _unflatten_leaf(v, f"{path}/{k}", tree) for k, v in spec["fields"].items()}
    fields.update({k: _decode(v) for k, v in spec["static"].items()})
    return _leaf_types()[spec["type"]](**fields)


def _pop_empty(tree: dict, path: str) -> None:
    """Removes the (now empty) dict a leaf's fields were restored from."""
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree[p]
    if tree.get(leaf) == {}:
        del tree[leaf]


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
            leaves[p] = _flatten_leaf(leaf, p, arrays)
        else:
            _put(arrays, p, leaf)
    os.makedirs(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), arrays)
    checkpointer.wait_until_finished()
    manifest = {"format": "jaxcomp-checkpoint", "version": 2, "leaves": leaves,
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
    if manifest.get("version") != 2:
        raise JaxcompError(f"{path}: checkpoint format version {manifest.get('version')} is not "
                           "supported (this jaxcomp writes and reads version 2)")
    for p, spec in manifest["leaves"].items():
        leaf = _unflatten_leaf(spec, p, tree)
        _pop_empty(tree, p)
        _put(tree, p, leaf)
    config = manifest.get("config")
    if config is not None:
        config["rope_scaling"] = tuple(tuple(kv) for kv in config["rope_scaling"])
        config = ModelConfig(**config)
    tokenizer = None
    if os.path.isdir(os.path.join(path, "tokenizer")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    return tree, config, tokenizer
