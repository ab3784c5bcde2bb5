"""Learnable weight clipping (LWC): exactness of the packing, the RTN starting point, gradients,
the ordering claim against RTN on a tiny LLaMA, and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers

from jaxcomp.calib import Calibration
from jaxcomp.core import Rule, get_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model, decoder_parts, from_hf_config
from jaxcomp.quant import QArray, int3, int4, int_format, minifloat, nf4, quantize, quantize_array
from jaxcomp.quant.actquant import ActQuant
from jaxcomp.quant.clipping import (
    clip_strengths,
    fake_quant_clipped,
    init_clip_params,
    quantize_clipped,
)
from jaxcomp.quant.clipping_transform import _minibatches

# K=200: groups of 64 and 32 leave a shorter last group.
FORMATS = [int3(64), int4(64, symmetric=True), nf4(64), int_format(4, "channel"),
           int_format(3, "tensor"), minifloat("fp4", 32), int_format(2, 64, scale_dtype="float32")]


def _kernel(k=200, n=24, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * 0.05
    w[rng.random((k, n)) < 0.01] *= 8.0  # a few outliers: clipping has something to gain
    return w.astype(np.float32)


def _random_params(w, fmt, seed=1):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.normal(-1.0, 1.5, v.shape), jnp.float32)
            for k, v in init_clip_params(w, fmt).items()}


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_packing_equals_fake_quant_and_init_is_rtn(fmt):
    """For learned (here random) clip logits the packed QArray dequantizes to exactly what
    (jitted) fake quantization computed; at the initial logits the QArray is RTN's, bit for
    bit."""
    w = _kernel()
    params = _random_params(w, fmt)
    q = quantize_clipped(w, params, fmt)
    assert isinstance(q, QArray) and q.fmt == fmt and q.shape == w.shape
    deq = np.asarray(q.dequantize(jnp.float32))
    jitted = jax.jit(fake_quant_clipped, static_argnames="fmt")
    np.testing.assert_array_equal(np.asarray(jitted(w, params, fmt)), deq)

    init = init_clip_params(w, fmt)
    assert all(np.all(np.asarray(s) == 1.0) for s in clip_strengths(init).values())
    q0, rtn = quantize_clipped(w, init, fmt), quantize_array(w, fmt)
    np.testing.assert_array_equal(np.asarray(q0.packed), np.asarray(rtn.packed))
    np.testing.assert_array_equal(np.asarray(q0.scales, np.float32),
                                  np.asarray(rtn.scales, np.float32))
    if rtn.zeros is None:
        assert q0.zeros is None
    else:
        np.testing.assert_array_equal(np.asarray(q0.zeros), np.asarray(rtn.zeros))
    # the learned clipping changed something
    assert not np.array_equal(np.asarray(q.packed), np.asarray(rtn.packed))


def test_exact_inside_gradient_and_op_by_op():
    """Exactness holds where training computes it (inside a jitted gradient) and without jit
    (XLA fuses multiply-adds only in compiled code); the gradient reaches every clip logit
    and none flows into the weights' quantized values."""
    w = _kernel()
    fmt = int3(64)
    params = _random_params(w, fmt)
    deq = np.asarray(quantize_clipped(w, params, fmt).dequantize())

    def err(p, w):
        fq = fake_quant_clipped(w, p, fmt)
        return jnp.sum(jnp.square(fq - w)), fq

    (_, seen), (g_params, g_w) = jax.jit(jax.value_and_grad(err, argnums=(0, 1), has_aux=True))(
        params, jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(seen), deq)
    np.testing.assert_array_equal(np.asarray(fake_quant_clipped(w, params, fmt)), deq)
    for g in g_params.values():
        assert g.shape == (4, 24) and bool(jnp.isfinite(g).all())
        assert float(jnp.abs(g).min()) > 0  # every group and column gets a signal
    # d err / d w is the direct term only: the quantized weights are constants in w
    np.testing.assert_allclose(np.asarray(g_w), -2 * (deq - w), rtol=1e-6)


def test_packing_equals_fake_quant_bfloat16_weights():
    w = jnp.asarray(_kernel(), jnp.bfloat16)
    fmt = int3(64)
    params = _random_params(w, fmt)
    fq = jax.jit(fake_quant_clipped, static_argnames="fmt")(w, params, fmt)
    assert fq.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(fq, np.float32),
                                  np.asarray(quantize_clipped(w, params, fmt).dequantize(),
                                             np.float32))


@pytest.mark.parametrize(("fmt", "factor"), [(int3(64), 0.9), (nf4(64), 1.0)],
                         ids=["int3-asym-g64", "nf4-g64"])
def test_learning_lowers_weight_error_below_rtn(fmt, factor):
    """Adam on the weight MSE through the straight-through estimator finds clipping better than
    RTN's full range (ordering claim on the math alone). Measured: int3 0.845x RTN (the grid
    search of rtn.quantize_array: 0.849x); NF4 0.975x (grid: 0.930x: the codebook's
    straight-through gradient is a cruder guide)."""
    w = _kernel()
    params = init_clip_params(w, fmt)
    opt = optax.adam(5e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(
            lambda p: jnp.mean(jnp.square(fake_quant_clipped(w, p, fmt) - w)))(params)
        updates, state = opt.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(100):
        params, state, _ = step(params, state)
    rtn = np.mean((np.asarray(quantize_array(w, fmt).dequantize()) - w) ** 2)
    lwc = np.mean((np.asarray(quantize_clipped(w, params, fmt).dequantize()) - w) ** 2)
    assert lwc < factor * rtn, (lwc, rtn)


def test_bad_clip_params():
    w = _kernel()
    with pytest.raises(JaxcompError, match="must have keys"):
        quantize_clipped(w, init_clip_params(w, nf4(64)), int3(64))
    with pytest.raises(JaxcompError, match=r"layers_0/q: clip params 'absmax' must have shape"):
        quantize_clipped(w, init_clip_params(w[:100], nf4(64)), nf4(64), name="layers_0/q")
    with pytest.raises(JaxcompError, match="NaN or Inf"):
        quantize_clipped(w, {"absmax": jnp.full((4, 24), jnp.nan)}, nf4(64))
    with pytest.raises(JaxcompError, match="2-D"):
        init_clip_params(np.ones(5), nf4(64))


# --- the learn_clip transform on a tiny random LLaMA ------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)
    model = build_model(from_hf_config(hf))
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    windows = np.random.default_rng(0).integers(0, 64, (32, 32))
    return model, params, windows


@functools.partial(jax.jit, static_argnames="block")
def _block_out(block, block_params, x):
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    return block.apply({"params": block_params}, x, positions)[0]


def _block0_mse(model, params, qparams, windows):
    """Block 0's output MSE (quantized vs float) on the windows' embeddings."""
    parts = decoder_parts(model)
    embed, block = parts.embed, parts.block
    x = embed(params, jnp.asarray(windows))
    diff = _block_out(block, qparams["layers_0"], x) - _block_out(block, params["layers_0"], x)
    return float(jnp.mean(jnp.square(diff)))


def _wrap_down_proj(params):
    """down_proj of every block inside ActQuant(act_bits=None): the same float function."""
    out = dict(params)
    for key in ("layers_0", "layers_1"):
        mlp = {**params[key]["mlp"],
               "down_proj": {"kernel": ActQuant(params[key]["mlp"]["down_proj"]["kernel"], None)}}
        out[key] = {**params[key], "mlp": mlp}
    return out


def test_learn_clip_below_rtn_at_3_bits(tiny):
    """Ordering claim on block 0 (its inputs are the same for every method): the block-output
    MSE after learn_clip is below RTN's, on the calibration windows and on held-out ones. The
    report's loss_first (the fake-quantized block at the initial logits) is RTN's block error
    exactly and its loss_last the packed block's (one batch holds every window, so "the first
    minibatch" is the calibration set). Also: per-rule formats, and an input-side wrapper
    (ActQuant) kept around its quantized kernel. With 8 windows instead of 32 the logits
    overfit (measured: held-out logit error 1.06x RTN's)."""
    model, params, windows = tiny
    params = _wrap_down_proj(params)
    reports = {}
    mixed = [Rule("down_proj", args={"format": "nf", "bits": 4})]
    transform = get_transform("learn_clip")(
        bits=3, group_size=32, steps=40, lr=2e-2, batch_size=32, rules=mixed,
        report_sink=lambda k, v: reports.__setitem__(k, v))
    q = transform(params, Calibration(model, windows, batch_size=8, progress=False))
    for path in ("self_attn/q_proj", "self_attn/o_proj", "mlp/up_proj"):
        leaf = q["layers_1"][path.split("/")[0]][path.split("/")[1]]["kernel"]
        assert isinstance(leaf, QArray) and leaf.fmt == int3(32)
    down = q["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(down, ActQuant) and down.act_bits is None and down.kernel.fmt == nf4(32)
    assert isinstance(params["layers_0"]["mlp"]["up_proj"]["kernel"], jax.Array)  # pure
    rtn = quantize(bits=3, group_size=32, rules=mixed)(params)
    assert rtn["layers_0"]["mlp"]["down_proj"]["kernel"].kernel.fmt == nf4(32)
    lwc_mse = _block0_mse(model, params, q, windows)
    rtn_mse = _block0_mse(model, params, rtn, windows)
    assert lwc_mse < 0.8 * rtn_mse, (lwc_mse, rtn_mse)
    report = reports["learn_clip"]
    assert report["blocks"] == 2
    entry = report["per_block"]["layers_0"]
    np.testing.assert_allclose(entry["loss_first"], rtn_mse, rtol=1e-5)
    np.testing.assert_allclose(entry["loss_last"], lwc_mse, rtol=1e-5)
    for entry in report["per_block"].values():
        assert entry["loss_last"] < 0.8 * entry["loss_first"], entry
        assert entry["mean_strength"] < 1.0  # it clipped

    held_out = np.random.default_rng(1).integers(0, 64, windows.shape)
    lwc_held, rtn_held = (_block0_mse(model, params, p, held_out) for p in (q, rtn))
    assert lwc_held < 0.9 * rtn_held, (lwc_held, rtn_held)


def test_learn_clip_few_steps_target_only_visited_windows(tiny):
    """With steps * batch_size below the number of windows only the visited windows get a
    target; the report still refers to the first minibatch (white box: its windows)."""
    model, params, windows = tiny
    reports = {}
    q = get_transform("learn_clip")(bits=3, group_size=32, steps=2, lr=2e-2, batch_size=4,
                                    report_sink=lambda k, v: reports.__setitem__(k, v))(
        params, Calibration(model, windows, batch_size=8, progress=False))
    first = _minibatches(len(windows), 4, 2, np.random.default_rng((0, 0)))[0]
    entry = reports["learn_clip"]["per_block"]["layers_0"]
    rtn = quantize(int3(32))(params)
    np.testing.assert_allclose(entry["loss_first"],
                               _block0_mse(model, params, rtn, windows[first]), rtol=1e-5)
    np.testing.assert_allclose(entry["loss_last"],
                               _block0_mse(model, params, q, windows[first]), rtol=1e-5)


def test_bad_input(tiny):
    model, params, windows = tiny
    calib = Calibration(model, windows, batch_size=4, progress=False)
    learn_clip = get_transform("learn_clip")
    with pytest.raises(JaxcompError, match="learn_clip needs calibration data"):
        learn_clip(bits=3)(params)
    with pytest.raises(JaxcompError, match="steps must be an integer >= 1, got 0"):
        learn_clip(steps=0)
    with pytest.raises(JaxcompError, match="lr must be a number > 0"):
        learn_clip(lr=-1.0)
    with pytest.raises(JaxcompError, match="integer formats need bits"):
        learn_clip(bits=1)
    with pytest.raises(JaxcompError,
                       match="rule 'down_proj' sets steps, which learn_clip does not take"):
        learn_clip(rules=[Rule("down_proj", args={"steps": 5})])
    with pytest.raises(JaxcompError, match=r"layers_0/mlp/down_proj/kernel is already "
                                           r"compressed \(QArray\)"):
        learn_clip(bits=3, group_size=32, steps=1)(
            quantize(int4(32), targets=[r"down_proj/kernel$"])(params), calib)
    nan = jax.tree_util.tree_map(lambda x: x, params)
    nan["layers_0"] = {**nan["layers_0"], "mlp": {
        **nan["layers_0"]["mlp"], "up_proj": {"kernel": params["layers_0"]["mlp"]["up_proj"][
            "kernel"].at[0, 0].set(jnp.nan)}}}
    with pytest.raises(JaxcompError, match="layers_0/mlp/up_proj/kernel: weights contain NaN"):
        learn_clip(bits=3, group_size=32, steps=1)(nan, calib)
