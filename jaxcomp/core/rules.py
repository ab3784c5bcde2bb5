"""Selecting what to compress is data: ordered regex rules over pytree key paths.

A path is the "/"-joined key path of a leaf (``layers_0/mlp/down_proj/kernel``). Rules are
tried in order and the **first match wins**; a rule matches when ``re.search(pattern, path)``
succeeds. A ``skip`` rule leaves the leaf alone (an ignore rule); ``args`` override the
transform's arguments for the leaves it selects (mixed precision). A rule that matches nothing
is reported with a warning and returned to the caller.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.errors import JaxcompError


def path_str(keypath) -> str:
    """``(DictKey('a'), SequenceKey(0), GetAttrKey('b'))`` -> ``"a/0/b"``."""
    parts = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def is_leaf(x) -> bool:
    """Walk predicate: compressed leaves are leaves, not subtrees."""
    return isinstance(x, CompressedLeaf)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One selection rule.

    Attributes:
      pattern: regex searched in the "/"-joined key path.
      skip: leave matching leaves untouched (an ignore rule).
      args: per-rule overrides of the transform's arguments.

    Example:
      >>> Rule(r"down_proj", args={"bits": 8})
    """

    pattern: str
    skip: bool = False
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise JaxcompError(f"rule pattern {self.pattern!r} is not a valid regex: {e}") from None


def make_rules(rules=None, *, targets: Sequence[str] = (), ignore: Sequence[str] = ()
               ) -> list[Rule]:
    """Normalizes rules: ``ignore`` patterns first, then ``rules``, then ``targets``.

    Each entry of ``rules`` may be a :class:`Rule`, a pattern string, or a mapping
    ``{"pattern": ..., "skip": ..., "args": {...}}`` (the YAML form).
    """
    out = [Rule(p, skip=True) for p in ignore]
    for r in rules or ():
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, str):
            out.append(Rule(r))
        elif isinstance(r, Mapping):
            unknown = set(r) - {"pattern", "skip", "args"}
            if unknown or "pattern" not in r:
                raise JaxcompError(f"rule {dict(r)} must have 'pattern' and only 'skip'/'args'")
            out.append(Rule(str(r["pattern"]), bool(r.get("skip", False)),
                            dict(r.get("args") or {})))
        else:
            raise JaxcompError(f"rule {r!r} must be a pattern string or a mapping")
    out += [Rule(p) for p in targets]
    return out


def check_rule_args(rules: Sequence[Rule], allowed, where: str) -> None:
    """Refuses a rule argument the transform does not read (a typo would otherwise be ignored
    or fail at the first selected leaf, after the model has loaded)."""
    for r in rules:
        unknown = sorted(set(r.args) - set(allowed))
        if unknown:
            raise JaxcompError(f"{where}: rule {r.pattern!r} sets {', '.join(unknown)}, which "
                               f"{where} does not take (a rule may set: "
                               f"{', '.join(sorted(allowed))})")


def select(tree, rules: Sequence[Rule], *, warn: bool = True
           ) -> tuple[dict[str, dict[str, Any]], list[Rule]]:
    """Which leaves the rules select.

    Args:
      tree: any pytree (compressed leaves count as leaves).
      rules: ordered rules, first match wins.
      warn: warn about rules that match nothing.

    Returns:
      ``(selected, unmatched)``: path -> the selecting rule's args for every selected leaf, and
      the rules that matched no leaf at all.

    Example:
      >>> sel, unmatched = select(params, make_rules(targets=[r"_proj/kernel$"]))
    """
    selected: dict[str, dict[str, Any]] = {}
    used: set[int] = set()
    for keypath, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        path = path_str(keypath)
        for i, rule in enumerate(rules):
            if re.search(rule.pattern, path):
                used.add(i)
                if not rule.skip:
                    selected[path] = dict(rule.args)
                break
    unmatched = [r for i, r in enumerate(rules) if i not in used]
    if warn:
        for r in unmatched:
            warnings.warn(f"rule {r.pattern!r} matched no parameter", stacklevel=2)
    return selected, unmatched


def leaves_by_path(tree) -> dict[str, Any]:
    """``{"a/b/kernel": leaf}`` for every leaf (compressed leaves whole)."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_str(kp): leaf for kp, leaf in flat}


def replace_leaves(tree, new: Mapping[str, Any]):
    """A copy of ``tree`` with the leaves at the paths in ``new`` replaced (pure).

    Example:
      >>> replace_leaves({"a": {"w": 1}}, {"a/w": 2})
      {'a': {'w': 2}}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    missing = set(new) - {path_str(kp) for kp, _ in flat}
    if missing:
        raise JaxcompError(f"no parameter at {sorted(missing)[0]}")
    return jax.tree_util.tree_unflatten(treedef, [new.get(path_str(kp), leaf) for kp, leaf in flat])


def require_matrix(path: str, leaf) -> None:
    """Raises unless ``leaf`` is a 2-D array or a compressed leaf."""
    if isinstance(leaf, CompressedLeaf):
        return
    if np.ndim(leaf) != 2:
        raise JaxcompError(f"{path}: rule selects a parameter of shape {np.shape(leaf)}, "
                           "but this transform needs a 2-D matrix")
