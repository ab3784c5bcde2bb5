"""Transforms: pure functions over param pytrees, composed with ``chain``, found by name."""

from __future__ import annotations

import sys
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import check_rule_args, is_leaf, make_rules, path_str, select
from jaxcomp.errors import JaxcompError

Transform = Callable[[object], object]
_REGISTRY: dict[str, Callable[..., Transform]] = {}


def leaf_transform(fn: Callable, rules=None, *, targets=(), ignore=(), progress: bool | None = None,
                   desc: str = "transform", rule_args=None, **defaults) -> Transform:
    """Makes a pure transform that applies ``fn`` to the leaves the rules select.

    Args:
      fn: ``fn(leaf, path=..., **args) -> new_leaf``; ``args`` are ``defaults`` updated by the
        selecting rule's ``args``.
      rules, targets, ignore: selection, see :func:`jaxcomp.core.rules.make_rules`.
      progress: show a progress bar (default: when stderr is a terminal).
      desc: progress bar label and the transform's name in errors.
      rule_args: the argument names a rule may set (default: those of ``defaults``); any
        other raises now.
      **defaults: arguments passed to ``fn`` for every selected leaf.

    Returns:
      ``transform(tree) -> new_tree``; the input is never mutated, unselected leaves are the
      same objects.

    Example:
      >>> halve = leaf_transform(lambda w, path: w / 2, targets=[r"kernel$"])
      >>> new_params = halve(params)  # doctest: +SKIP
    """
    rule_list = make_rules(rules, targets=targets, ignore=ignore)
    check_rule_args(rule_list, defaults if rule_args is None else rule_args, desc)

    def transform(tree):
        selected, _ = select(tree, rule_list)
        flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
        show = sys.stderr.isatty() if progress is None else progress
        out = []
        for keypath, leaf in tqdm(flat, desc=desc, disable=not show or not selected, leave=False):
            path = path_str(keypath)
            if path in selected:
                try:
                    leaf = fn(leaf, path=path, **{**defaults, **selected[path]})
                except JaxcompError as e:
                    if path not in str(e):
                        raise JaxcompError(f"{path}: {e}") from None
                    raise
            out.append(leaf)
        return jax.tree_util.tree_unflatten(treedef, out)

    return transform


def chain(*transforms: Transform) -> Transform:
    """Composes transforms left to right: ``chain(a, b)(p) == b(a(p))``.

    Calibrated transforms (``needs_calibration``) get the calibration argument the chain is
    called with: ``chain(rotate(), gptq(...))(params, Calibration(model, windows))``. Adjacent
    block-sequential ones (AWQ then GPTQ) are fused into one pass over the blocks, each block
    getting AWQ then GPTQ before the activations move on (LLMC's order).

    Example:
      >>> compress = chain(quantize_a, quantize_b)  # doctest: +SKIP
    """
    from jaxcomp.calib import steps_transform

    fused: list[Transform] = []
    for t in transforms:
        if (getattr(t, "block_steps", None) and fused
                and getattr(fused[-1], "block_steps", None)):
            fused[-1] = steps_transform(fused[-1].block_steps + t.block_steps)
        else:
            fused.append(t)
    kinds = {t.needs_calibration for t in fused if getattr(t, "needs_calibration", False)}
    if len(kinds) > 1:
        raise JaxcompError("chain mixes transforms needing per-layer statistics and "
                           "block-sequential calibration; run them as separate stages")

    def chained(tree, *calib):
        for t in fused:
            tree = t(tree, *calib) if getattr(t, "needs_calibration", False) else t(tree)
        return tree

    chained.needs_calibration = kinds.pop() if kinds else False
    if len(fused) == 1 and getattr(fused[0], "block_steps", None):
        chained.block_steps = fused[0].block_steps
    return chained


def register_transform(name: str):
    """Decorator registering a transform factory under ``name`` (duplicates raise).

    Example:
      >>> @register_transform("halve")
      ... def halve(rules=None):
      ...     return leaf_transform(lambda w, path: w / 2, rules)
    """

    def decorate(factory):
        if name in _REGISTRY:
            raise ValueError(f"transform {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def get_transform(name: str) -> Callable[..., Transform]:
    """The factory registered under ``name``; unknown names raise naming the nearest one."""
    _import_builtin_transforms()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise JaxcompError(f"unknown transform {name!r}{hint} (registered: "
                           f"{', '.join(sorted(_REGISTRY)) or 'none'})")
    return _REGISTRY[name]


def list_transforms() -> list[str]:
    _import_builtin_transforms()
    return sorted(_REGISTRY)


def _import_builtin_transforms() -> None:
    # Explicit imports (no package walking): each module registers its transforms once.
    import jaxcomp.quant  # noqa: F401
    import jaxcomp.tensornet  # noqa: F401


def tree_size(tree) -> tuple[int, int]:
    """``(num_params, nbytes)`` of a param pytree as stored (compressed leaves included).

    Example:
      >>> tree_size({"w": np.zeros((2, 3), np.float32)})
      (6, 24)
    """
    params = nbytes = 0
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_leaf):
        if isinstance(leaf, CompressedLeaf):
            params += leaf.num_params
            nbytes += leaf.nbytes
        else:
            params += int(np.prod(np.shape(leaf)))
            nbytes += int(np.prod(np.shape(leaf))) * np.dtype(leaf.dtype).itemsize
    return params, nbytes
