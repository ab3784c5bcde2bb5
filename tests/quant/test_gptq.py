"""GPTQ: exactness, ordering against RTN, formats, damping, and the block-sequential pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxcomp.calib import Calibration, collect_input_stats, run_blocks
from jaxcomp.core import Rule, chain, get_transform
from jaxcomp.data import sample_calibration
from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model, from_hf_config
from jaxcomp.quant import QArray, int3, int4, int_format, minifloat, nf4, quantize, quantize_array
from jaxcomp.quant.gptq import gptq_quantize, inverse_hessian_factor


def _layer(k=200, n=48, seed=0):
    """A kernel and the Gram matrix of correlated inputs with uneven channel scales."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1500, k)) * np.exp(rng.standard_normal(k))
    x[:, : k // 2] += 0.8 * x[:, k // 2 : 2 * (k // 2)]
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    return w, x.T @ x


def _output_error(w, w_hat, gram):
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return np.sum(d * (gram @ d)) / np.sum(w * (gram @ w))


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_relative_output_error_in_column_chunks(chunk):
    from jaxcomp.calib import relative_output_error

    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((300, 48)), rng.standard_normal((48, 20))
    w_hat = w + 0.01 * rng.standard_normal(w.shape)
    want = np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w)
    np.testing.assert_allclose(relative_output_error(x.T @ x, w, w_hat, chunk), want, rtol=1e-9)


def test_infinite_bits_leaves_weights_unchanged():
    w, gram = _layer()
    out, info = gptq_quantize(w, gram, None)
    np.testing.assert_array_equal(np.asarray(out), w)
    assert info["proxy_error"] == 0.0


@pytest.mark.parametrize(("fmt", "act_order"), [
    (int4(64), False), (int4(64), True), (int_format(3, 128), False), (nf4(64), True),
    (int4(64, symmetric=True), False), (int_format(4, "channel"), False),
    (int_format(4, "tensor"), True), (minifloat("fp4", 32), False)],
    ids=lambda p: getattr(p, "name", str(p)))
def test_gptq_below_rtn_every_format(fmt, act_order):
    w, gram = _layer()  # K=200: groups of 64/128/32 leave a shorter last group
    q, info = gptq_quantize(w, gram, fmt, act_order=act_order)
    assert isinstance(q, QArray) and q.fmt == fmt and q.shape == w.shape
    gptq_err = _output_error(w, q.dequantize(), gram)
    rtn_err = _output_error(w, quantize_array(w, fmt).dequantize(), gram)
    np.testing.assert_allclose(info["proxy_error"], gptq_err, rtol=1e-6)
    assert gptq_err < 0.8 * rtn_err, (gptq_err, rtn_err)


def test_act_order_keeps_groups_contiguous():
    """Static groups: every weight's scale is its natural (contiguous) group's, and the codes
    round-trip through the packed QArray: the dequantized weights are what GPTQ chose."""
    w, gram = _layer(k=256, n=16)
    q, _ = gptq_quantize(w, gram, int4(64), act_order=True)
    # a fresh RTN of GPTQ's own output reproduces it exactly only if the grid is the stored one
    deq = np.asarray(q.dequantize())
    scales = np.repeat(np.asarray(q.scales, np.float32), 64, axis=0)
    zeros = np.repeat(np.asarray(q.zeros, np.float32), 64, axis=0)
    codes = deq / scales + zeros
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert q.scales.shape == (4, 16)


def test_dead_inputs_zeroed():
    w, gram = _layer(k=64, n=8)
    gram[5, :] = gram[:, 5] = 0.0
    q, info = gptq_quantize(w, gram, int4(32))
    assert info["dead_inputs"] == 1
    np.testing.assert_array_equal(np.asarray(q.dequantize())[5], 0.0)


def test_indefinite_hessian_retried_then_refused():
    w, gram = _layer(k=32, n=8)
    shift = 0.05 * np.mean(np.diag(gram))  # needs damp > 0.05: 0.01 fails, 0.1 works
    bent = gram - shift * np.eye(32) - np.min(np.linalg.eigvalsh(gram)) * np.eye(32)
    with pytest.warns(UserWarning, match="layers_3/q_proj.*damp=0.1"):
        _, info = gptq_quantize(w, bent, int4(32), name="layers_3/q_proj")
    assert info["damp"] == pytest.approx(0.1)
    with pytest.raises(JaxcompError, match="layers_3/q_proj: Hessian not positive definite"):
        with pytest.warns(UserWarning):
            inverse_hessian_factor(-np.eye(8), name="layers_3/q_proj")
    with pytest.raises(JaxcompError, match="NaN"):
        gptq_quantize(w, gram * np.nan, int4(32))
    with pytest.raises(JaxcompError, match="does not match"):
        gptq_quantize(w, gram[:16, :16], int4(32))


@pytest.fixture(scope="module")
def tiny():
    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2)
    cfg = from_hf_config(hf)
    model = build_model(cfg)
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    windows = np.random.default_rng(0).integers(0, 64, (8, 32))
    return model, params, windows


def test_gptq_transform_block_sequential(tiny):
    model, params, windows = tiny
    reports = {}
    transform = get_transform("gptq")(bits=3, group_size=32,
                                      rules=[Rule("down_proj", args={"bits": 8})],
                                      report_sink=lambda k, v: reports.__setitem__(k, v))
    q = transform(params, Calibration(model, windows, batch_size=4, progress=False))
    assert q["layers_0"]["mlp"]["up_proj"]["kernel"].bits == 3
    assert q["layers_1"]["mlp"]["down_proj"]["kernel"].bits == 8
    assert isinstance(params["layers_0"]["mlp"]["up_proj"]["kernel"], jax.Array)  # pure
    assert reports["gptq"]["layers"] == 14
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (4, 32)))

    def mse(p):
        ref = model.apply({"params": params}, tokens)
        return float(jnp.mean((model.apply({"params": p}, tokens) - ref) ** 2))

    rtn = quantize(int3(32), rules=[Rule("down_proj", args={"bits": 8})])(params)
    assert mse(q) < mse(rtn)


def test_layers_with_one_input_share_one_gram(tiny):
    """q/k/v (and gate/up) get one shared float64 sum, added to once per batch."""
    from jaxcomp.calib import _sown_stats

    model, params, windows = tiny
    batched = collect_input_stats(model, params, windows, batch_size=3, progress=False)
    raw = [_sown_stats(model, params, windows[i:i + 3]) for i in range(0, 8, 3)]
    attn, mlp = "layers_1/self_attn/", "layers_1/mlp/"
    q = batched[attn + "q_proj/kernel"]
    assert q.gram is batched[attn + "k_proj/kernel"].gram is batched[attn + "v_proj/kernel"].gram
    assert batched[mlp + "gate_proj/kernel"].gram is batched[mlp + "up_proj/kernel"].gram
    assert q.gram is not batched[attn + "o_proj/kernel"].gram
    for path, stats in batched.items():  # the per-batch sown values, summed here
        want = sum(np.asarray(g, np.float64) for g in _walk(raw, path, "gram"))
        np.testing.assert_allclose(stats.gram, want, rtol=1e-12, err_msg=path)
        np.testing.assert_array_equal(stats.absmax, np.max(_walk(raw, path, "absmax"), axis=0))


def _walk(trees, path, kind):
    out = []
    for tree in trees:
        for key in path.split("/")[:-1]:
            tree = tree[key]
        out.append(np.asarray(tree[kind][0]))
    return out


def test_block_pass_uses_quantized_upstream(tiny):
    """Block 1's statistics come from block 0's *quantized* output, not the float one."""
    model, params, windows = tiny
    seen = {}

    def record(bp, ctx, selected):
        seen[ctx.index] = ctx.stats["self_attn/q_proj/kernel"].gram
        return bp

    from jaxcomp.calib import block_transform

    gptq = get_transform("gptq")(bits=2, group_size=32)
    probe = block_transform(record, targets=[r"q_proj/kernel$"])
    calib = Calibration(model, windows, batch_size=4, progress=False)
    chain(gptq, probe)(params, calib)  # fused: one pass, gptq then the probe in each block
    q = gptq(params, calib)
    want = collect_input_stats(model, q, windows, progress=False)
    fp = collect_input_stats(model, params, windows, progress=False)

    def rel(a, b):  # Frobenius: entries near zero make elementwise rtol meaningless
        return np.linalg.norm(a - b) / np.linalg.norm(b)

    # float32 block-by-block vs whole-model summation order: ~1e-6; 2-bit upstream: ~1e-2
    assert rel(seen[1], want["layers_1/self_attn/q_proj/kernel"].gram) < 1e-5
    assert rel(seen[1], fp["layers_1/self_attn/q_proj/kernel"].gram) > 1e-3


def test_gpt2_block_pass():
    cfg = from_hf_config(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                                                 n_positions=64))
    model = build_model(cfg)
    params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
    windows = np.random.default_rng(0).integers(0, 64, (4, 16))
    q = get_transform("gptq")(bits=4, group_size=32)(params, Calibration(model, windows,
                                                                         progress=False))
    assert isinstance(q["h_1"]["mlp"]["c_fc"]["kernel"], QArray)
    assert bool(jnp.isfinite(model.apply({"params": q}, jnp.asarray(windows))).all())


def test_bad_input(tiny):
    model, params, windows = tiny
    with pytest.raises(JaxcompError, match="needs calibration data"):
        get_transform("gptq")(bits=4)(params)
    with pytest.raises(JaxcompError, match="integer formats need bits"):
        get_transform("gptq")(bits=1)
    # a misspelt rule argument used to be ignored: the layer got the default format
    with pytest.raises(JaxcompError, match="gptq: rule 'down_proj' sets bitz, which gptq does "
                                           "not take"):
        get_transform("gptq")(bits=4, rules=[{"pattern": "down_proj", "args": {"bitz": 8}}])
    with pytest.raises(JaxcompError, match="already compressed"):
        get_transform("gptq")(bits=4, group_size=32)(quantize(int4(32))(params),
                                                     Calibration(model, windows,
                                                                 progress=False))
    with pytest.raises(JaxcompError, match="fewer than calib.num_samples x calib.seq_len"):
        sample_calibration(np.arange(1000), 16, 128)
    with pytest.warns(UserWarning, match="rule 'nothing_here' matched no parameter"):
        run_blocks(params, Calibration(model, windows, progress=False),
                   get_transform("gptq")(bits=4, targets=["nothing_here"]).block_steps)


@pytest.mark.slow
def test_gptq_below_rtn_on_real_smollm2_layers(smollm2_gguf):
    """Ordering claim on real matrices with real activations (SmolLM2, enwiki calib text)."""
    from jaxcomp.data import calib_tokens
    from jaxcomp.models.loading import load_model

    loaded = load_model("smollm2-135m")
    model = build_model(loaded.config)
    windows = sample_calibration(calib_tokens(loaded.tokenizer, "enwiki-sample"), 8, 256)
    stats = collect_input_stats(model, loaded.params, windows, progress=False)
    for path in ("layers_0/self_attn/q_proj/kernel", "layers_12/mlp/down_proj/kernel",
                 "layers_25/mlp/up_proj/kernel"):
        node = loaded.params
        for part in path.split("/"):
            node = node[part]
        w, gram = np.asarray(node), stats[path].gram
        for fmt in (int4(128), int3(128)):
            q, info = gptq_quantize(w, gram, fmt)
            rtn = _output_error(w, quantize_array(w, fmt).dequantize(), gram)
            assert info["proxy_error"] < rtn, (path, fmt.name, info["proxy_error"], rtn)


def test_streamed_checkpoint_gives_the_same_result(tiny_llama_dir, tiny_text_file, tmp_path,
                                                   capsys):
    """A block-by-block read of the checkpoint: same GPTQ result, same perplexity."""
    from jaxcomp.eval import perplexity
    from jaxcomp.models.hf import StreamedParams
    from jaxcomp.models.loading import load_model
    from jaxcomp.pipeline import main

    whole = load_model(tiny_llama_dir)
    streamed = load_model(tiny_llama_dir, stream=True)
    assert isinstance(streamed.params, StreamedParams)
    assert sorted(streamed.params) == sorted(whole.params)
    model = build_model(whole.config)
    windows = np.random.default_rng(0).integers(3, 64, (4, 16))
    np.testing.assert_allclose(perplexity(model, streamed.params, windows, 2, False).ppl,
                               perplexity(model, whole.params, windows, 2, False).ppl, rtol=1e-5)
    calib = Calibration(model, windows, batch_size=2, progress=False)
    gptq = get_transform("gptq")(bits=4, group_size=32)
    a, b = gptq(whole.params, calib), gptq(streamed.params, calib)
    assert isinstance(b, dict)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # the CLI: stream=true runs block-sequential stages only, and refuses the rest
    out = tmp_path / "out"
    common = [f"model={tiny_llama_dir}", f"eval.corpus=text:{tiny_text_file}",
              f"calib.corpus=text:{tiny_text_file}", "calib.num_samples=4", "calib.seq_len=16",
              "eval.seq_len=16", "stream=true", "save_checkpoint=false", f"out_dir={out}"]
    assert main(["recipe=smollm2_gptq_w4g128", *common, "stages.0.args.group_size=32"]) == 0
    assert main(["recipe=smollm2_w4g128_rtn", *common, f"out_dir={tmp_path / 'x'}"]) == 2
    assert not (tmp_path / "x").exists()
    # tt's refinement runs blocks too, but its budget reads every matrix: not streamed
    capsys.readouterr()
    assert main(["recipe=smollm2_tt", *common, "heal.steps=0", f"out_dir={tmp_path / 'y'}"]) == 2
    assert "stages.0 (tt) does not stream" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("query_chunk", [12, 128])  # 32 tokens: 12 + 12 + 8, and one chunk
def test_value_head_grams_measure_the_attention_output_error(tiny, monkeypatch, query_chunk):
    """tr(D_h^T G_h D_h) summed over kv heads == the energy a value change D adds to the
    attention output (o_proj's input): attention is linear in the values."""
    from jaxcomp.calib import block_transform
    from jaxcomp.core import replace_leaves

    monkeypatch.setattr("jaxcomp.models.llama.QUERY_CHUNK", query_chunk)
    model, params, windows = tiny
    seen = {}

    def record(bp, ctx, selected):
        seen["v"] = ctx.stats["self_attn/v_proj/kernel"].head_grams
        d = np.random.default_rng(0).standard_normal(np.shape(bp["self_attn"]["v_proj"]["kernel"]))
        seen["d"] = d
        seen["o"] = ctx.collect(replace_leaves(bp, {"self_attn/v_proj/kernel": jnp.asarray(
            d, jnp.float32)}))["self_attn/o_proj/kernel"].gram
        return bp

    step = block_transform(record, targets=[r"layers_0/self_attn/v_proj/kernel$"],
                           head_grams=True)
    step(params, Calibration(model, windows, batch_size=4, progress=False))
    g, d = seen["v"], seen["d"]
    heads, width = g.shape[0], d.shape[1] // g.shape[0]
    predicted = sum(np.trace(d[:, h * width:(h + 1) * width].T @ g[h]
                             @ d[:, h * width:(h + 1) * width]) for h in range(heads))
    np.testing.assert_allclose(predicted, np.trace(seen["o"]), rtol=1e-4)


def test_per_head_gptq_packs_one_qarray(tiny):
    model, params, windows = tiny
    calib = Calibration(model, windows, batch_size=4, progress=False)
    on = get_transform("gptq")(bits=4, group_size=32)(params, calib)
    off = get_transform("gptq")(bits=4, group_size=32, attention_values=False)(params, calib)
    v_on = on["layers_0"]["self_attn"]["v_proj"]["kernel"]
    v_off = off["layers_0"]["self_attn"]["v_proj"]["kernel"]
    assert isinstance(v_on, QArray) and v_on.shape == v_off.shape
    assert v_on.scales.shape == v_off.scales.shape
    assert not np.array_equal(np.asarray(v_on.packed), np.asarray(v_off.packed))
    np.testing.assert_array_equal(np.asarray(on["layers_0"]["self_attn"]["q_proj"]["kernel"]
                                             .packed),
                                  np.asarray(off["layers_0"]["self_attn"]["q_proj"]["kernel"]
                                             .packed))
