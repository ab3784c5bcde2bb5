"""Compressed leaf protocol, path rules, chain/compose and the dense-matmul dispatch."""

from jaxcomp.core.dense import dense
from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import (
    Rule,
    check_rule_args,
    leaves_by_path,
    make_rules,
    path_str,
    replace_leaves,
    require_matrix,
    select,
)
from jaxcomp.core.transform import (
    chain,
    get_transform,
    leaf_transform,
    list_transforms,
    register_transform,
    tree_size,
)

__all__ = ["CompressedLeaf", "Rule", "chain", "check_rule_args", "dense", "get_transform",
           "leaf_transform", "leaves_by_path", "list_transforms", "make_rules", "path_str",
           "register_transform", "replace_leaves", "require_matrix", "select", "tree_size"]
