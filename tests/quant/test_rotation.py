"""Hadamard rotations (QuaRot), the online-Hadamard ActQuant leaf, rotate and act_quant."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.core import CompressedLeaf, chain, get_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model
from jaxcomp.models.config import ModelConfig
from jaxcomp.quant import QArray, int4, quantize
from jaxcomp.quant.actquant import ActQuant, quantize_tokens
from jaxcomp.quant.rotation import (
    _factor,
    apply_hadamard,
    hadamard_factors,
    hadamard_matrix,
    hadamard_signs,
    random_hadamard,
)
from jaxcomp.quant.rotation_transform import act_quant, rotate

# --- the math --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [4, 12, 64, 576, 1536])
def test_hadamard_is_orthonormal_hadamard(n):
    h = hadamard_matrix(n)
    assert hadamard_factors(n)[0] == 1  # a true Hadamard order, not a block-diagonal fallback
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(n), rtol=1e-12)  # every entry ±1/sqrt(n)


@pytest.mark.parametrize("p", [12, 20, 24, 44, 48, 60, 68, 72, 80, 84, 104, 108, 132, 140, 224])
def test_paley_factors(p):
    h = _factor(p)  # the ±1 Paley (type I) matrix of order p = q + 1
    np.testing.assert_array_equal(np.abs(h), 1.0)
    np.testing.assert_array_equal(h @ h.T, p * np.eye(p))


def test_factor_plans():
    assert hadamard_factors(576) == (1, (12, 12, 4))
    assert hadamard_factors(1536) == (1, (12, 128))
    assert hadamard_factors(96) == (1, (12, 8))
    assert hadamard_factors(14336) == (1, (224, 64))  # Paley 224 (223 prime)
    # No Paley factor fits: block-diagonal over the largest constructible divisor.
    assert hadamard_factors(11008) == (43, (16, 16))
    assert hadamard_factors(36) == (3, (12,))
    assert hadamard_factors(7) == (7, ())
    with pytest.raises(JaxcompError, match="positive integer"):
        hadamard_factors(0)


@pytest.mark.parametrize("n", [6, 36, 7])
def test_block_diagonal_fallback_is_orthogonal(n):
    blocks, factors = hadamard_factors(n)
    h = hadamard_matrix(n)
    np.testing.assert_allclose(h @ h.T, np.eye(n), atol=1e-12)
    m = n // blocks
    np.testing.assert_allclose(h, np.kron(np.eye(blocks), hadamard_matrix(m)), atol=0)


@pytest.mark.parametrize("n", [4, 12, 36, 96, 576, 1536])
def test_apply_hadamard_equals_matmul(n):
    x = np.random.default_rng(n).normal(size=(2, 3, n))
    h = hadamard_matrix(n)
    np.testing.assert_allclose(apply_hadamard(x), x @ h, atol=1e-12)
    np.testing.assert_allclose(apply_hadamard(x, n, transpose=True), x @ h.T, atol=1e-12)
    got = apply_hadamard(jnp.asarray(x, jnp.float32))
    assert isinstance(got, jax.Array) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), x @ h, atol=1e-5)  # float32 of O(1) values
    jitted = jax.jit(lambda v: apply_hadamard(v, transpose=True))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(jitted), x @ h.T, atol=1e-5)
    with pytest.raises(JaxcompError, match="expected"):
        apply_hadamard(x, n + 4)


def test_random_hadamard():
    q = random_hadamard(576, seed=3)
    np.testing.assert_allclose(q.T @ q, np.eye(576), atol=1e-12)
    np.testing.assert_allclose(q, hadamard_signs(576, 3)[:, None] * hadamard_matrix(576), atol=0)
    np.testing.assert_array_equal(q, random_hadamard(576, seed=3))  # deterministic
    assert not np.allclose(q, random_hadamard(576, seed=4))
    assert set(np.unique(hadamard_signs(576, 3))) == {-1.0, 1.0}


# --- the ActQuant leaf with an online Hadamard ------------------------------------------------

def test_actquant_online_hadamard_invariants():
    rng = np.random.default_rng(0)
    n = 96
    w = rng.normal(size=(n, 20))
    h = hadamard_matrix(n)
    leaf = ActQuant(jnp.asarray(h.T @ w, jnp.float32), act_bits=None, hadamard=n)
    x = jnp.asarray(rng.normal(size=(5, n)), jnp.float32)
    np.testing.assert_allclose(np.asarray(leaf.materialize()), w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x @ leaf.materialize()),
                               np.asarray(leaf.left_matmul(x)), atol=1e-4)
    np.testing.assert_allclose(np.asarray(leaf.rotate_inputs(x)), np.asarray(x) @ h, atol=1e-5)
    # The Gram of what the inner kernel sees: (x H)^T (x H) = H^T G H.
    xs = rng.normal(size=(50, n))
    gram = xs.T @ xs
    np.testing.assert_allclose(leaf.input_gram(gram), h.T @ gram @ h, atol=1e-9)
    np.testing.assert_allclose(leaf.input_gram(gram), (xs @ h).T @ (xs @ h), atol=1e-9)
    # With act_bits the rotated inputs are quantized before the inner kernel.
    q = leaf.replace(act_bits=4)
    want = quantize_tokens(jnp.asarray(np.asarray(x) @ h, jnp.float32), 4) @ leaf.kernel
    np.testing.assert_allclose(np.asarray(q.left_matmul(x)), np.asarray(want), atol=1e-4)
    assert not np.allclose(np.asarray(q.left_matmul(x)), np.asarray(leaf.left_matmul(x)),
                           atol=1e-3)


def test_actquant_validation():
    w = jnp.ones((4, 3))
    assert ActQuant(w, act_bits=None).input_gram(np.eye(4)) is not None
    with pytest.raises(JaxcompError, match="act_bits"):
        ActQuant(w, act_bits=1)
    with pytest.raises(JaxcompError, match="hadamard"):
        ActQuant(w, act_bits=4, hadamard=-1)


# --- rotate -----------------------------------------------------------------------------------

def _config(hidden, intermediate, tied, heads=4, kv_heads=2, biases=False, layers=2, vocab=64):
    return ModelConfig(arch="llama", model_type="llama", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=intermediate, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=64, norm_eps=1e-6, tie_word_embeddings=tied,
                       qkv_bias=biases, o_bias=biases, mlp_bias=biases)


@functools.cache
def _random_params(cfg, seed=0):
    """Random params with non-trivial norm scales and biases (so folding is really tested);
    cached per config (JAX arrays are immutable and the transforms are pure)."""
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.asarray(1 + 0.5 * rng.normal(size=x.shape), x.dtype)
        if "bias" in name:
            return jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype)
        return x

    return model, jax.tree_util.tree_map_with_path(perturb, params)


def _forward(model):
    return jax.jit(lambda p, t: model.apply({"params": p}, t))


def _tokens(vocab, shape=(2, 24), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("hidden, intermediate, tied, biases, online", [
    (64, 96, True, False, True),      # Sylvester residual, Paley (12x8) intermediate, tied
    (48, 192, False, True, True),     # Paley residual (12x4), untied, every bias present
    (96, 96, True, False, False),     # no online Hadamard
    (36, 72, True, False, True),      # block-diagonal fallbacks (3 x H12, 6 x H12)
])
def test_rotate_keeps_logits(hidden, intermediate, tied, biases, online):
    heads, kv_heads = (4, 2) if hidden % 8 == 0 else (3, 1)  # an even head_dim for RoPE
    cfg = _config(hidden, intermediate, tied, heads, kv_heads, biases=biases)
    model, params = _random_params(cfg)
    before = copy.deepcopy(jax.tree_util.tree_map(np.asarray, params))
    rotated = rotate(seed=1, online_hadamard=online)(params)
    tokens = _tokens(cfg.vocab_size)
    forward = _forward(model)
    want, got = forward(params, tokens), forward(rotated, tokens)
    assert _rel_err(got, want) <= 1e-4
    # Pure: the input params are unchanged.
    jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                           jax.tree_util.tree_map(np.asarray, params))
    # Really rotated: E -> E Q with the public Q; norms folded to ones; LM head explicit.
    q = random_hadamard(hidden, seed=1)
    np.testing.assert_allclose(rotated["embed_tokens"]["embedding"],
                               np.asarray(params["embed_tokens"]["embedding"]) @ q, atol=1e-6)
    assert "lm_head" in rotated
    for key in ("norm", "layers_0/input_layernorm", "layers_1/post_attention_layernorm"):
        node = rotated
        for part in key.split("/"):
            node = node[part]
        np.testing.assert_array_equal(node["scale"], 1.0)
    down = rotated["layers_0"]["mlp"]["down_proj"]["kernel"]
    o = rotated["layers_0"]["self_attn"]["o_proj"]["kernel"]
    if online:
        assert isinstance(down, ActQuant) and down.hadamard == intermediate
        assert isinstance(o, ActQuant) and o.hadamard == hidden and o.act_bits is None
    else:
        assert not isinstance(down, CompressedLeaf)


def test_rotate_online_subset_and_errors():
    cfg = _config(64, 96, True)
    model, params = _random_params(cfg)
    rotated = rotate(online_hadamard=["down_proj"])(params)
    assert isinstance(rotated["layers_1"]["mlp"]["down_proj"]["kernel"], ActQuant)
    assert not isinstance(rotated["layers_1"]["self_attn"]["o_proj"]["kernel"], CompressedLeaf)
    with pytest.raises(JaxcompError, match="online_hadamard"):
        rotate(online_hadamard=["q_proj"])
    with pytest.raises(JaxcompError, match="no rules"):
        rotate(rules=["q_proj"])
    # Compressed leaves: rotate must come first; the message names the param path.
    with pytest.raises(JaxcompError, match=r"layers_0/self_attn/q_proj/kernel .*before"):
        rotate()(quantize(int4(32))(params))
    # Not the LLaMA family.
    with pytest.raises(JaxcompError, match="GPT-2"):
        rotate()({"wte": {"embedding": np.zeros((8, 4))}, "h_0": {}, "ln_f": {}})
    bad = {**params, "layers_0": {**params["layers_0"], "extra": {"scale": np.ones(64)}}}
    with pytest.raises(JaxcompError, match="layers_0"):
        rotate()(bad)


def _planted_outliers(params, cfg):
    """Outlier channels: 3 residual channels (embedding columns) and 3 intermediate channels
    (up_proj columns) scaled by 50."""
    p = jax.tree_util.tree_map(lambda x: x, params)
    emb = np.array(p["embed_tokens"]["embedding"])
    emb[:, [3, 17, 40]] *= 50
    p["embed_tokens"] = {"embedding": jnp.asarray(emb)}
    for i in range(cfg.num_layers):
        up = np.array(p[f"layers_{i}"]["mlp"]["up_proj"]["kernel"])
        up[:, [5, 50, 77]] *= 50
        mlp = {**p[f"layers_{i}"]["mlp"], "up_proj": {"kernel": jnp.asarray(up)}}
        p[f"layers_{i}"] = {**p[f"layers_{i}"], "mlp": mlp}
    return p


def _quantizer_inputs(model, params, tokens):
    """Per layer path, the inputs each linear's activation quantizer sees (after any online
    Hadamard), from a direct forward with the Linear calls intercepted."""
    import flax.linen as nn

    from jaxcomp.models.layers import Linear

    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, Linear) and context.method_name == "__call__":
            kernel = module.get_variable("params", "kernel")
            x = args[0]
            if isinstance(kernel, ActQuant):
                x = kernel.rotate_inputs(x)
            seen["/".join(module.path)] = np.asarray(x).reshape(-1, x.shape[-1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        model.apply({"params": params}, tokens)
    return seen


def _max_to_rms(x):
    """Mean over tokens of max|x_t| / rms(x_t): the dynamic range per-token quantization sees."""
    return float(np.mean(np.max(np.abs(x), -1) / np.sqrt(np.mean(x * x, -1))))


def test_rotation_flattens_outliers_and_helps_a4():
    cfg = _config(96, 192, True)
    model, params = _random_params(cfg)
    params = _planted_outliers(params, cfg)
    rotated = rotate(seed=0)(params)
    tokens = _tokens(cfg.vocab_size, (4, 32))
    plain_in = _quantizer_inputs(model, params, tokens)
    rot_in = _quantizer_inputs(model, rotated, tokens)
    for path in ("layers_0/self_attn/q_proj", "layers_1/self_attn/q_proj",
                 "layers_0/mlp/down_proj", "layers_1/mlp/down_proj"):
        before, after = _max_to_rms(plain_in[path]), _max_to_rms(rot_in[path])
        # n=96 with 3 outliers of 50x: max/rms ~ sqrt(96/3) = 5.7 before; spread out after.
        assert after < before / 2, (path, before, after)
        assert after < 3.5, (path, after)
    # The ordering claim that matters: 4-bit activations lose less after rotation.
    forward = _forward(model)
    want = forward(params, tokens)
    a4, a4_rot = forward(act_quant(bits=4)(params), tokens), forward(act_quant(bits=4)(rotated),
                                                                       tokens)
    assert _rel_err(a4_rot, want) < 0.5 * _rel_err(a4, want)


# --- act_quant and the W4A4 chain -------------------------------------------------------------

def test_act_quant_wraps_and_sets_bits():
    cfg = _config(48, 192, False, biases=True)
    _, params = _random_params(cfg)
    out = act_quant(bits=4, rules=[{"pattern": "down_proj/kernel$", "args": {"bits": 8}}])(params)
    q = out["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, ActQuant) and q.act_bits == 4 and q.hadamard == 0
    assert out["layers_0"]["mlp"]["down_proj"]["kernel"].act_bits == 8
    assert not isinstance(out["lm_head"]["kernel"], CompressedLeaf)  # outside the blocks
    assert not isinstance(out["embed_tokens"]["embedding"], CompressedLeaf)
    # On rotated params the online-Hadamard wrappers keep their rotation and get bits.
    rot = act_quant(bits=4)(rotate()(params))
    down = rot["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert down.act_bits == 4 and down.hadamard == 192 and not isinstance(down.kernel, ActQuant)
    with pytest.raises(JaxcompError, match="bits"):
        act_quant(bits=16)


def test_w4a4_chain_by_name_end_to_end():
    cfg = _config(64, 96, True)
    model, params = _random_params(cfg)
    w4a4 = chain(get_transform("rotate")(seed=0), get_transform("act_quant")(bits=4),
                 get_transform("quantize")(bits=4, group_size=16))
    out = w4a4(params)
    down = out["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(down, ActQuant) and isinstance(down.kernel, QArray)
    assert down.hadamard == 96 and down.act_bits == 4
    assert isinstance(out["layers_0"]["self_attn"]["k_proj"]["kernel"].kernel, QArray)
    tokens = _tokens(cfg.vocab_size)
    forward = _forward(model)
    logits = forward(out, tokens)
    assert bool(jnp.all(jnp.isfinite(logits)))
    want = forward(params, tokens)
    assert 0 < _rel_err(logits, want) < 1.0
    # Without activation quantization the quantized model's forward equals x @ materialize().
    w4 = jax.tree_util.tree_map(
        lambda x: x.replace(act_bits=None) if isinstance(x, ActQuant) else x, out,
        is_leaf=lambda x: isinstance(x, CompressedLeaf))
    dense = jax.tree_util.tree_map(
        lambda x: x.materialize() if isinstance(x, CompressedLeaf) else x, w4,
        is_leaf=lambda x: isinstance(x, CompressedLeaf))
    np.testing.assert_allclose(forward(w4, tokens), forward(dense, tokens), atol=1e-4, rtol=1e-4)


def test_recipes_load():
    from jaxcomp.recipes import load_recipe

    quarot = load_recipe("smollm2_quarot_w4a4")
    assert [s.transform for s in quarot.stages] == ["rotate", "act_quant", "gptq"]
    assert dict(quarot.stages[2].args) == {"bits": 4, "group_size": 128}
    rtn = load_recipe("smollm2_rtn_w4a4")
    assert [s.transform for s in rtn.stages] == ["act_quant", "quantize"]
    for recipe in (quarot, rtn):  # the factories accept the recipe's arguments
        for stage in recipe.stages[:2]:
            get_transform(stage.transform)(**stage.args, rules=stage.rules)
