"""Path rules, leaf transforms, chain, registry and size accounting."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.core import (
    CompressedLeaf,
    Rule,
    chain,
    get_transform,
    leaf_transform,
    make_rules,
    register_transform,
    select,
    tree_size,
)
from jaxcomp.errors import JaxcompError


def _params():
    w = lambda *s: jnp.ones(s, jnp.float32)  # noqa: E731
    return {"layers_0": {"mlp": {"down_proj": {"kernel": w(6, 4)}, "up_proj": {"kernel": w(4, 6)}},
                         "norm": {"scale": w(4)}},
            "lm_head": {"kernel": w(4, 10)}}


@flax.struct.dataclass
class ToyLowRank(CompressedLeaf):
    u: jax.Array
    v: jax.Array

    @property
    def shape(self):
        return (self.u.shape[0], self.v.shape[1])

    @property
    def dtype(self):
        return self.u.dtype

    def materialize(self):
        return self.u @ self.v


def test_first_match_wins_and_overrides():
    scale = leaf_transform(lambda w, path, factor: w * factor,
                           rules=[Rule("down_proj", args={"factor": 8.0}), Rule("kernel$")],
                           ignore=["lm_head"], factor=2.0)
    out = scale(_params())
    assert float(out["layers_0"]["mlp"]["down_proj"]["kernel"][0, 0]) == 8.0
    assert float(out["layers_0"]["mlp"]["up_proj"]["kernel"][0, 0]) == 2.0
    assert float(out["lm_head"]["kernel"][0, 0]) == 1.0  # ignored before targets
    assert float(out["layers_0"]["norm"]["scale"][0]) == 1.0  # not selected


def test_purity_and_structure():
    params = _params()
    before = jax.tree_util.tree_map(np.array, params)
    out = leaf_transform(lambda w, path: w * 0, targets=["kernel"])(params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, before)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    assert out["layers_0"]["norm"]["scale"] is params["layers_0"]["norm"]["scale"]


def test_unmatched_rule_is_reported():
    with pytest.warns(UserWarning, match="q_proj"):
        _, unmatched = select(_params(), make_rules(targets=["q_proj", "kernel"]))
    assert [r.pattern for r in unmatched] == ["q_proj"]


def test_bad_rules():
    with pytest.raises(JaxcompError, match="regex"):
        Rule("(")
    with pytest.raises(JaxcompError, match="pattern"):
        make_rules([{"patern": "x"}])
    rules = make_rules([{"pattern": "down", "args": {"bits": 8}}, "up"])
    assert rules[0].args == {"bits": 8} and rules[1] == Rule("up")


def test_rule_arguments_the_transform_does_not_take_fail_when_it_is_made():
    scale = lambda w, path, factor: w * factor  # noqa: E731
    with pytest.raises(JaxcompError, match="scale: rule 'down' sets fctor, which scale does not "
                                           r"take \(a rule may set: factor\)"):
        leaf_transform(scale, [{"pattern": "down", "args": {"fctor": 2.0}}], desc="scale",
                       factor=1.0)
    doubled = leaf_transform(scale, [{"pattern": "down", "args": {"factor": 2.0}}],
                             targets=["up"], desc="scale", factor=1.0)(_params())
    assert float(doubled["layers_0"]["mlp"]["down_proj"]["kernel"][0, 0]) == 2.0
    assert float(doubled["layers_0"]["mlp"]["up_proj"]["kernel"][0, 0]) == 1.0
    # rule_args widens what a rule may set beyond the defaults
    leaf_transform(scale, [{"pattern": "down", "args": {"factor": 2.0}}], rule_args=("factor",))


def test_errors_name_the_path():
    def refuse(w, path):
        raise JaxcompError("bad weights")

    with pytest.raises(JaxcompError, match="layers_0/mlp/down_proj/kernel: bad weights"):
        leaf_transform(refuse, targets=["down_proj"])(_params())


def test_chain_order():
    add = leaf_transform(lambda w, path: w + 1, targets=["lm_head"])
    mul = leaf_transform(lambda w, path: w * 3, targets=["lm_head"])
    assert float(chain(add, mul)(_params())["lm_head"]["kernel"][0, 0]) == 6.0
    assert float(chain(mul, add)(_params())["lm_head"]["kernel"][0, 0]) == 4.0


def test_compressed_leaves_are_leaves_and_counted():
    params = _params()
    params["lm_head"]["kernel"] = ToyLowRank(jnp.ones((4, 2)), jnp.ones((2, 10)))
    seen = []
    leaf_transform(lambda w, path: seen.append(path) or w, targets=["lm_head"])(params)
    assert seen == ["lm_head/kernel"]
    n, nbytes = tree_size(params)
    assert n == 24 + 24 + 4 + 8 + 20
    assert nbytes == 4 * n


def test_jit_compatible():
    f = jax.jit(leaf_transform(lambda w, path: jnp.tanh(w), targets=["kernel"]))
    out = f(_params())
    assert float(out["lm_head"]["kernel"][0, 0]) == pytest.approx(np.tanh(1.0))


def test_nnx_state():
    from flax import nnx

    state = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    out = leaf_transform(lambda w, path: w * 0, targets=["kernel"])(state)
    assert float(jnp.abs(out["kernel"][...]).sum()) == 0.0
    assert float(jnp.abs(out["bias"][...] - state["bias"][...]).sum()) == 0.0


def test_registry():
    @register_transform("test-scale-registry")
    def factory(rules=None):
        return leaf_transform(lambda w, path: w, rules)

    assert get_transform("test-scale-registry") is factory
    with pytest.raises(ValueError, match="already registered"):
        register_transform("test-scale-registry")(factory)
    with pytest.raises(JaxcompError, match="test-scale-registry"):
        get_transform("test-scale-registr")
