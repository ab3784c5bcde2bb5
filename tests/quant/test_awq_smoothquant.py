"""AWQ and SmoothQuant: the math on planted layers, the scale folding, the transforms end to end
on tiny random LLaMA models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.calib import Calibration, InputStats, collect_input_stats
from jaxcomp.core import CompressedLeaf
from jaxcomp.core.transform import get_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.models import ModelConfig, build_model
from jaxcomp.models.llama import LlamaBlock
from jaxcomp.quant import QArray, int3, int4, int8, quantize, quantize_array
from jaxcomp.quant.actquant import ActQuant
from jaxcomp.quant.awq import (
    clip_to_ratios,
    output_error,
    quant_dequant,
    scale_candidates,
    search_clip,
    search_scales,
)
from jaxcomp.quant.awq_transform import apply_scales, awq, llama_scale_groups, smoothquant
from jaxcomp.quant.smoothquant import smooth_scales, weight_absmax

KERNELS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
           "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def _cfg(num_kv_heads=2, qkv_bias=False, mlp_bias=False, arch="llama"):
    return ModelConfig(arch=arch, model_type=arch, vocab_size=64, hidden_size=64,
                       intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=num_kv_heads, head_dim=16, max_position_embeddings=128,
                       norm_eps=1e-6, qkv_bias=qkv_bias, mlp_bias=mlp_bias)


@functools.cache
def _init(cfg, seed):
    """The model's own init distribution (kernels N(0, 0.02^2), norm scales 1, biases 0),
    drawn with numpy from traced shapes: ``model.init`` itself compiles for seconds."""
    shapes = jax.eval_shape(build_model(cfg).init, jax.random.key(0),
                            np.zeros((1, 4), np.int32))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name or "bias" in name:
            return jnp.full(leaf.shape, 1.0 if "scale" in name else 0.0, jnp.float32)
        return jnp.asarray(rng.normal(0.0, 0.02, leaf.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _params(cfg, seed=0):
    """Random params (fresh containers each call, so a test may edit them)."""
    return jax.tree_util.tree_map(lambda x: x, _init(cfg, seed))


def _planted(cfg, seed=0, channels=(3, 17, 40), factor=40.0):
    """Random params whose norms blow up a few hidden channels: activation outliers shared by
    every token, as in real LLMs."""
    params = _params(cfg, seed)
    rng = np.random.default_rng(seed)
    for i in range(cfg.num_layers):
        block = dict(params[f"layers_{i}"])
        for norm in ("input_layernorm", "post_attention_layernorm"):
            scale = np.asarray(block[norm]["scale"]).copy()
            scale[list(channels)] *= factor * rng.uniform(0.75, 1.25, len(channels))
            block[norm] = {"scale": jnp.asarray(scale)}
        params[f"layers_{i}"] = block
    return params


def _windows(cfg, n=8, t=24, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, t)).astype(np.int32)


def _logits(cfg, params, windows):
    return np.asarray(build_model(cfg).apply({"params": params}, jnp.asarray(windows)))


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _calib(cfg, windows):
    return Calibration(build_model(cfg), windows, batch_size=4, progress=False)


def _leaf(params, block, path):
    node = params[f"layers_{block}"]
    for key in path.split("/"):
        node = node[key]
    return node


# --- the math on one layer --------------------------------------------------------------------

def _outlier_layer(seed, k=256, n=192, tokens=2048):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k))
    x[:, rng.choice(k, 4, replace=False)] *= rng.uniform(30, 100, 4)
    w = rng.standard_normal((k, n)) * 0.02
    return w, InputStats(x.T @ x, tokens)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_scales_and_clipping_beat_rtn_on_planted_outliers(seed):
    w, stats = _outlier_layer(seed)
    fmt = int4(64)
    gram = stats.gram / stats.count
    s, alpha, errors = search_scales([w], [fmt], gram, stats.channel_rms(), 20)
    rtn = stats.output_error(w, quant_dequant(w, fmt))
    scaled = stats.output_error(w, quant_dequant(w * s[:, None], fmt) / s[:, None])
    # errors[0] is alpha = 0 (s = 1): exactly RTN's squared output error
    np.testing.assert_allclose(np.sqrt(errors[0] / np.sum(w * (gram @ w))), rtn, rtol=1e-4)
    assert 0 < alpha < 1
    assert scaled < 0.5 * rtn  # measured: 0.33-0.39 of RTN's relative output error
    ws = w * s[:, None]
    clipped = clip_to_ratios(ws, fmt, search_clip(ws, fmt, gram / np.outer(s, s)))
    both = stats.output_error(w, quant_dequant(clipped, fmt) / s[:, None])
    assert both < 0.9 * scaled  # measured: 0.78-0.84 of the scaled-only error


def test_scale_candidates_grid_and_normalization():
    alphas, s = scale_candidates(np.array([0.0, 1.0, 4.0, 100.0]), 4)
    np.testing.assert_allclose(alphas, [0, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(s[0], 1.0)  # alpha 0 is RTN
    np.testing.assert_allclose(np.sqrt(s.max(axis=1) * s.min(axis=1)), 1.0)
    assert np.all(np.isfinite(s)) and np.all(s > 0)  # the dead channel is floored, not 0
    assert np.all(np.diff(s[1:, 1:], axis=1) > 0)  # monotone in the activation magnitude
    with pytest.raises(JaxcompError, match="alpha_grid"):
        scale_candidates(np.ones(3), 0)


def test_clip_search_never_worse_per_group_and_rtn_reproduces_it():
    rng = np.random.default_rng(0)
    k, n = 192, 48
    w = rng.standard_t(3, (k, n)) * 0.02  # heavy tails: clipping pays
    x = rng.standard_normal((1024, k))
    gram = x.T @ x / 1024
    for fmt in (int4(64), int3(64, symmetric=True), int4("channel")):
        ratios = search_clip(w, fmt, gram)
        clipped = clip_to_ratios(w, fmt, ratios)
        q = quant_dequant(clipped, fmt)
        # what the search chose is what RTN of the clipped float weights stores
        np.testing.assert_allclose(quantize_array(clipped, fmt).materialize(), q, atol=1e-6)
        rows = k if fmt.granularity == "channel" else 64
        for g in range(k // rows):
            sl = slice(g * rows, (g + 1) * rows)
            gg = gram[sl, sl]
            d_clip = np.asarray(q)[sl] - w[sl]
            d_rtn = np.asarray(quant_dequant(w, fmt))[sl] - w[sl]
            e_clip = np.einsum("in,ij,jn->n", d_clip, gg, d_clip)
            e_rtn = np.einsum("in,ij,jn->n", d_rtn, gg, d_rtn)
            assert np.all(e_clip <= e_rtn * (1 + 1e-4))  # ratio 1 is on the grid
        assert float(jnp.min(ratios)) < 1.0  # heavy tails: some group is clipped
        total = lambda q_: float(output_error(w, q_, gram))  # noqa: E731
        assert total(q) < total(quant_dequant(w, fmt))


# --- SmoothQuant math -------------------------------------------------------------------------

def test_smooth_scales_balance_activations_and_weights():
    rng = np.random.default_rng(0)
    ax = rng.uniform(0.1, 1.0, 32)
    ax[[2, 9]] = [60.0, 120.0]  # outlier channels
    w = rng.standard_normal((32, 20)) * 0.05
    aw = weight_absmax([w[:, :8], w[:, 8:]])
    np.testing.assert_allclose(aw, np.abs(w).max(axis=1))
    s = smooth_scales(ax, aw, 0.5)
    np.testing.assert_allclose(ax / s, aw * s, rtol=1e-12)  # alpha 0.5: balanced per channel
    for alpha in (0.25, 0.8):
        s = smooth_scales(ax, aw, alpha)
        np.testing.assert_allclose(ax / s, (ax * aw) ** (1 - alpha), rtol=1e-12)
        np.testing.assert_allclose(aw * s, (ax * aw) ** alpha, rtol=1e-12)
    # the activation range spread (max / median channel max) shrinks
    s = smooth_scales(ax, aw, 0.5)
    spread = lambda a: a.max() / np.median(a)  # noqa: E731
    assert spread(ax / s) < 0.2 * spread(ax)
    # dead channels (no activation, or all-zero weights) keep s = 1
    s = smooth_scales(np.array([0.0, 2.0, 3.0]), np.array([1.0, 0.0, 0.5]), 0.5)
    np.testing.assert_allclose(s, [1.0, 1.0, np.sqrt(3.0 / 0.5)])
    with pytest.raises(JaxcompError, match="alpha"):
        smooth_scales(ax, aw, 1.5)


# --- folding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kv_heads,bias", [(2, False), (4, True)])
def test_folded_scales_leave_the_float_block_unchanged(kv_heads, bias):
    cfg = _cfg(kv_heads, qkv_bias=bias, mlp_bias=bias)
    params = _params(cfg)
    bp = params["layers_0"]
    if bias:  # nonzero biases, so folding into them is checked
        rng = np.random.default_rng(3)
        for path in ("self_attn/v_proj/bias", "mlp/up_proj/bias", "mlp/gate_proj/bias"):
            mod, _ = path.rsplit("/", 1)
            node = bp
            for key in mod.split("/"):
                node = node[key]
            node["bias"] = jnp.asarray(rng.standard_normal(node["bias"].shape) * 0.1,
                                       jnp.float32)
    rng = np.random.default_rng(0)
    scales = {}
    for g in llama_scale_groups(cfg):
        k = _leaf(params, 0, g.members[0]).shape[0]
        if g.index is None:
            scales[g.name] = np.exp(rng.normal(0, 1.0, k))
        else:  # grouped-query o_proj: rows reading one v_proj column share a scale
            scales[g.name] = np.exp(rng.normal(0, 1.0, max(g.index) + 1))[list(g.index)]
    new = apply_scales(bp, cfg, scales)
    run = jax.jit(lambda p, x, pos: LlamaBlock(cfg).apply({"params": p}, x, pos)[0])
    x = jnp.asarray(rng.standard_normal((2, 12, cfg.hidden_size)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    before, after = run(bp, x, pos), run(new, x, pos)
    assert _rel(np.asarray(after), np.asarray(before)) < 1e-5
    # really rescaled, and the input untouched
    assert _rel(np.asarray(new["input_layernorm"]["scale"]),
                np.asarray(bp["input_layernorm"]["scale"])) > 0.5
    np.testing.assert_array_equal(bp["input_layernorm"]["scale"], np.ones(cfg.hidden_size))
    assert new["mlp"]["up_proj"]["kernel"] is not bp["mlp"]["up_proj"]["kernel"]


def test_gqa_tied_scales_are_enforced():
    cfg = _cfg(2)
    bp = _params(cfg)["layers_0"]
    with pytest.raises(JaxcompError, match="equal scales"):
        apply_scales(bp, cfg, {"attn_out": np.arange(1, 65, dtype=float)})
    with pytest.raises(JaxcompError, match="positive"):
        apply_scales(bp, cfg, {"mlp_out": -np.ones(cfg.intermediate_size)})


# --- AWQ transform ----------------------------------------------------------------------------
# One tiny GQA model with planted activation outliers; each calibrated run is done once.

FMT = int4(32)


@pytest.fixture(scope="module")
def planted():
    cfg = _cfg(2)
    params = _planted(cfg)
    windows = _windows(cfg)
    return cfg, params, windows, _logits(cfg, params, windows)


@pytest.fixture(scope="module")
def awq_quantized(planted):
    cfg, params, windows, _ = planted
    return get_transform("awq")(FMT)(params, _calib(cfg, windows))


def test_awq_without_quantization_keeps_the_model_function(planted):
    cfg, params, windows, fp = planted
    out = awq(bits=4, group_size=32, clip=False, quantize=False)(params, _calib(cfg, windows))
    assert _rel(_logits(cfg, out, windows), fp) < 1e-5
    for i in range(cfg.num_layers):  # the outlier channels were scaled down at the norms
        ratio = (np.asarray(params[f"layers_{i}"]["input_layernorm"]["scale"])
                 / np.asarray(out[f"layers_{i}"]["input_layernorm"]["scale"]))
        assert ratio[[3, 17, 40]].min() > 2 * np.median(ratio)
        assert not any(isinstance(_leaf(out, i, p + "/kernel"), CompressedLeaf)
                       for p in KERNELS)


def test_awq_end_to_end_quantizes_and_beats_rtn(planted, awq_quantized):
    cfg, params, windows, fp = planted
    for i in range(cfg.num_layers):
        for p in KERNELS:
            leaf = _leaf(awq_quantized, i, p + "/kernel")
            assert isinstance(leaf, QArray) and leaf.fmt == FMT
    logits = _logits(cfg, awq_quantized, windows)
    assert np.all(np.isfinite(logits))
    rtn = _rel(_logits(cfg, quantize(FMT)(params), windows), fp)
    # relative logits error, measured over planted seeds 0-4: RTN 0.28-0.38, AWQ/RTN 0.47-0.61
    # (without the clip search 0.52-0.74)
    assert _rel(logits, fp) < 0.75 * rtn
    assert params["layers_0"]["input_layernorm"]["scale"][3] > 10  # the input is not mutated


def test_awq_without_quantization_then_rtn_matches_awq(planted, awq_quantized):
    cfg, params, windows, _ = planted
    floats = awq(FMT, quantize=False)(params, _calib(cfg, windows))
    then_rtn = quantize(FMT)(floats)
    # block 0 sees the same inputs either way (later blocks see quantized vs float upstream)
    for p in KERNELS:
        np.testing.assert_array_equal(_leaf(then_rtn, 0, p + "/kernel").materialize(),
                                      _leaf(awq_quantized, 0, p + "/kernel").materialize())


def test_awq_partly_selected_group_is_not_scaled(planted):
    cfg, params, windows, _ = planted
    with pytest.warns(UserWarning, match="not self_attn/k_proj/kernel"):
        out = awq(FMT, ignore=[r"k_proj"])(params, _calib(cfg, windows))
    for i in range(cfg.num_layers):
        blk, new = params[f"layers_{i}"], out[f"layers_{i}"]
        assert new["self_attn"]["k_proj"]["kernel"] is blk["self_attn"]["k_proj"]["kernel"]
        np.testing.assert_array_equal(new["input_layernorm"]["scale"],
                                      blk["input_layernorm"]["scale"])
        assert isinstance(new["self_attn"]["q_proj"]["kernel"], QArray)
        # the other groups are still scaled
        assert _rel(np.asarray(new["post_attention_layernorm"]["scale"]),
                    np.asarray(blk["post_attention_layernorm"]["scale"])) > 1e-3


def test_awq_argument_errors():
    with pytest.raises(JaxcompError, match="bits"):
        awq(bits=9)
    with pytest.raises(JaxcompError, match="rule 'down_proj' sets alpha, which awq does not"):
        awq(rules=[{"pattern": "down_proj", "args": {"alpha": 0.5}}])
    with pytest.raises(JaxcompError, match="sets alpha_grid, which smoothquant does not"):
        smoothquant(rules=[{"pattern": "down_proj", "args": {"alpha_grid": 5}}])
    with pytest.raises(JaxcompError, match="alpha_grid"):
        awq(alpha_grid=0)
    with pytest.raises(JaxcompError, match="act_bits"):
        smoothquant(act_bits=16)
    with pytest.raises(JaxcompError, match="alpha"):
        smoothquant(alpha=-0.1)


def test_awq_rules_disagreeing_on_a_shared_input_raise(planted):
    cfg, params, windows, _ = planted
    t = awq(FMT, rules=[{"pattern": "q_proj", "args": {"alpha_grid": 5}}])
    with pytest.raises(JaxcompError, match="layers_0 .*share an input and need one alpha_grid"):
        t(params, _calib(cfg, windows))


@pytest.mark.parametrize("factory", [awq, smoothquant])
def test_needs_calibration(planted, factory):
    _, params, _, _ = planted
    with pytest.raises(JaxcompError, match="needs calibration data"):
        factory()(params)


@pytest.mark.parametrize("factory", [awq, smoothquant])
def test_gpt2_is_refused_clearly(factory):
    cfg = _cfg(4, arch="gpt2")
    with pytest.raises(JaxcompError, match=r"supports the LLaMA family.*'gpt2'"):
        factory()({}, _calib(cfg, _windows(cfg, n=2, t=8)))


# --- SmoothQuant transform --------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoothed(planted):
    """``(W8A8, A8 only)`` SmoothQuant params of the planted model."""
    cfg, params, windows, _ = planted
    calib = _calib(cfg, windows)
    return smoothquant(alpha=0.5)(params, calib), smoothquant(w_bits=None)(params, calib)


def _act_quant(params, kernel=lambda w: w):
    """Every block kernel as ``ActQuant(kernel(w), 8)``, without smoothing."""
    def wrap(path, x):
        if isinstance(x, QArray) or ("layers_" in jax.tree_util.keystr(path) and np.ndim(x) == 2):
            return ActQuant(kernel(x), 8)
        return x
    return jax.tree_util.tree_map_with_path(wrap, params,
                                            is_leaf=lambda x: isinstance(x, QArray))


def test_smoothquant_w8a8_close_to_float_and_better_than_unsmoothed(planted, smoothed):
    cfg, params, windows, fp = planted
    w8a8, a8 = smoothed
    for i in range(cfg.num_layers):
        for p in KERNELS:
            leaf = _leaf(w8a8, i, p + "/kernel")
            assert isinstance(leaf, ActQuant) and isinstance(leaf.kernel, QArray)
            assert leaf.act_bits == 8 and leaf.kernel.fmt == int8()
    err = lambda p: _rel(_logits(cfg, p, windows), fp)  # noqa: E731
    w8 = quantize(int8())(params)
    # relative logits errors, measured over planted seeds 0, 1, 2:
    # activations only: smoothed 0.020 / 0.018 / 0.019, unsmoothed 0.053 / 0.054 / 0.059
    assert err(a8) < 0.5 * err(_act_quant(params))
    # W8A8: smoothed 0.026 / 0.026 / 0.026, unsmoothed 0.063 / 0.061 / 0.064
    assert err(w8a8) < 0.6 * err(_act_quant(w8))
    # int8 weights alone: 0.024 / 0.021 / 0.026: after smoothing, 8-bit activations add little
    assert err(w8a8) < 1.5 * err(w8)


def test_smoothquant_scales_follow_the_statistics(planted, smoothed):
    cfg, params, windows, fp = planted
    _, a8 = smoothed
    # block 0 sees the embeddings of the float model: the same statistics as one full pass
    stats = collect_input_stats(build_model(cfg), params, windows, progress=False)
    blk, new = params["layers_0"], a8["layers_0"]
    qkv = [blk["self_attn"][p]["kernel"] for p in ("q_proj", "k_proj", "v_proj")]
    act = stats["layers_0/self_attn/q_proj/kernel"].absmax
    s = smooth_scales(act, weight_absmax(qkv))
    np.testing.assert_allclose(np.asarray(blk["input_layernorm"]["scale"])
                               / np.asarray(new["input_layernorm"]["scale"]), s, rtol=1e-5)
    # the rows of the kernels reading that input are scaled by s (v_proj's columns also carry
    # the attn_out fold), which balances the per-channel maxima at alpha 0.5
    for p in ("q_proj", "k_proj"):
        np.testing.assert_allclose(new["self_attn"][p]["kernel"].kernel,
                                   np.asarray(blk["self_attn"][p]["kernel"]) * s[:, None],
                                   rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(act / s, weight_absmax(qkv) * s, rtol=1e-10)
    # and the float function is unchanged (w_bits=None keeps float weights in ActQuant)
    unwrapped = jax.tree_util.tree_map(lambda x: x.kernel if isinstance(x, ActQuant) else x,
                                       a8, is_leaf=lambda x: isinstance(x, ActQuant))
    assert not any(isinstance(x, CompressedLeaf) for x in jax.tree_util.tree_leaves(
        unwrapped, is_leaf=lambda x: isinstance(x, CompressedLeaf)))
    assert _rel(_logits(cfg, unwrapped, windows), fp) < 1e-5
