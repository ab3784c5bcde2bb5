"""Models running on QArray leaves: jit, packed inputs, memory, generation, checkpoints, export."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcomp.checkpoint import load_checkpoint, save_checkpoint
from jaxcomp.core import CompressedLeaf, Rule, chain, tree_size
from jaxcomp.errors import JaxcompError
from jaxcomp.models import build_model
from jaxcomp.models.generate import generate
from jaxcomp.models.loading import load_model
from jaxcomp.pipeline import main
from jaxcomp.quant import QArray, int4, nf4, quantize


def _materialized(params):
    return jax.tree_util.tree_map(
        lambda x: x.materialize() if isinstance(x, CompressedLeaf) else x, params,
        is_leaf=lambda x: isinstance(x, CompressedLeaf))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_model(tiny_llama_dir)


def test_forward_equals_materialized(tiny):
    q = quantize(int4(32))(tiny.params)
    model = build_model(tiny.config)
    tokens = jnp.asarray(np.arange(20).reshape(2, 10) % 64)
    got = jax.jit(lambda p, t: model.apply({"params": p}, t))(q, tokens)
    want = model.apply({"params": _materialized(q)}, tokens)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    dense = model.apply({"params": tiny.params}, tokens)
    assert float(jnp.max(jnp.abs(got - dense))) > 0  # really quantized


def test_jaxpr_consumes_packed_codes(tiny):
    """AQT-style structural check: the jitted forward takes the uint8 codes, not dense kernels."""
    q = quantize(int4(32))(tiny.params)
    model = build_model(tiny.config)
    jaxpr = jax.make_jaxpr(lambda p, t: model.apply({"params": p}, t))(
        q, jnp.zeros((1, 8), jnp.int32))
    invars = [v.aval for v in jaxpr.jaxpr.invars]
    leaves = [x for x in jax.tree_util.tree_leaves(q, is_leaf=lambda x: isinstance(x, QArray))
              if isinstance(x, QArray)]
    packed_inputs = [a for a in invars if a.dtype == jnp.uint8]
    assert len(packed_inputs) == 2 * len(leaves)  # codes and zero points of every layer
    # The only float32 inputs are the params left dense (embeddings, norms, lm_head).
    plain = [x for x in jax.tree_util.tree_leaves(q, is_leaf=lambda x: isinstance(x, QArray))
             if not isinstance(x, QArray)]
    assert sum(a.dtype == jnp.float32 for a in invars) == len(plain)


def test_compiled_memory_below_dense(tiny):
    q = quantize(int4(32))(tiny.params)
    model = build_model(tiny.config)
    f = jax.jit(lambda p, t: model.apply({"params": p}, t))
    tokens = jnp.zeros((1, 16), jnp.int32)
    mem_q = f.lower(q, tokens).compile().memory_analysis()
    mem_d = f.lower(tiny.params, tokens).compile().memory_analysis()
    assert mem_q.argument_size_in_bytes < mem_d.argument_size_in_bytes
    # No dense copy of all quantized kernels kept alive: at most one layer's worth extra.
    biggest = max(int(np.prod(leaf.shape)) * 4 for leaf in jax.tree_util.tree_leaves(
        q, is_leaf=lambda x: isinstance(x, QArray)) if isinstance(leaf, QArray))
    assert mem_q.temp_size_in_bytes <= mem_d.temp_size_in_bytes + 2 * biggest


def test_generation_on_compressed_model(tiny):
    q = quantize(nf4(32))(tiny.params)
    model = build_model(tiny.config)
    prompt = jnp.asarray([[1, 5, 9]])
    np.testing.assert_array_equal(generate(model, q, prompt, 8),
                                  generate(model, _materialized(q), prompt, 8))


def test_mixed_precision_rules_and_purity(tiny):
    before = jax.tree_util.tree_map(np.array, tiny.params)
    q = quantize(int4(32), rules=[Rule("down_proj", args={"fmt": None, "bits": 8,
                                                          "group_size": "channel"})])(tiny.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, tiny.params, before)
    down = q["layers_0"]["mlp"]["down_proj"]["kernel"]
    up = q["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert down.fmt.bits == 8 and down.fmt.granularity == "channel"
    assert up.fmt == int4(32)
    assert isinstance(q["embed_tokens"]["embedding"], jax.Array)  # not targeted by default


def test_rule_on_non_matrix_is_refused(tiny):
    with pytest.raises(JaxcompError, match="layers_0/input_layernorm/scale.*2-D"):
        quantize(int4(32), targets=["layernorm"])(tiny.params)


def test_requantizing_is_refused(tiny):
    q = quantize(int4(32))(tiny.params)
    with pytest.raises(JaxcompError, match="already compressed"):
        chain(quantize(int4(32)))(q)


def test_checkpoint_round_trip(tiny, tmp_path):
    q = quantize(int4(32), rules=[Rule("v_proj", args={"fmt": nf4(16)})])(tiny.params)
    save_checkpoint(str(tmp_path / "ckpt"), q, tiny.config, tiny.tokenizer)
    restored, cfg, tok = load_checkpoint(str(tmp_path / "ckpt"))
    assert cfg == tiny.config and tok is not None
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(q)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(q),
                    strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert tree_size(restored) == tree_size(q)
    reopened = load_model(str(tmp_path / "ckpt"))
    tokens = jnp.asarray([[3, 4, 5, 6]])
    model = build_model(cfg)
    np.testing.assert_array_equal(model.apply({"params": reopened.params}, tokens),
                                  model.apply({"params": q}, tokens))


@pytest.mark.parity
def test_hf_export_of_compressed_model(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from jaxcomp.models.hf import export_hf

    q = quantize(int4(32))(tiny.params)
    export_hf(q, tiny.config, str(tmp_path))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = np.arange(12).reshape(1, 12)
    with torch.no_grad():
        want = ref(torch.tensor(tokens)).logits.numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(build_model(tiny.config).apply({"params": q}, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_cli_quantize_recipe(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["recipe=smollm2_w4g128_rtn", f"model={tiny_llama_dir}",
                 f"eval.corpus=text:{tiny_text_file}", "eval.seq_len=32",
                 "stages.0.args.group_size=32", f"out_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["bytes_after"] < report["bytes_before"]
    # Quantizing keeps every parameter (and adds scales): the cut shows in bytes, not params.
    assert report["non_embedding_params_after"] > report["non_embedding_params_before"]
    assert report["non_embedding_bytes_before"] == 4 * report["non_embedding_params_before"]
    assert report["non_embedding_bytes_reduction"] > 0.7  # 4-bit codes for float32 kernels
    embedding_bytes = report["bytes_before"] - report["non_embedding_bytes_before"]
    assert report["bytes_after"] - report["non_embedding_bytes_after"] == embedding_bytes
    cut = f"{report['non_embedding_bytes_reduction']:.1%} of bytes"
    assert cut in capsys.readouterr().out
    assert report["ppl_after"] != report["ppl_before"]
    assert os.path.isfile(out / "checkpoint" / "jaxcomp.json")
    assert "stage0:quantize" in report["seconds"]
    assert report["versions"]["jax"] == jax.__version__
    assert report["machine"]["cpu_count"] == os.cpu_count()
    assert report["machine"]["devices"].endswith(jax.devices()[0].device_kind)


def test_cli_reports_unmatched_rules(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "w4"
    assert main(["recipe=smollm2_w4g128_rtn", f"model={tiny_llama_dir}",
                 f"eval.corpus=text:{tiny_text_file}", "eval.seq_len=32",
                 "stages.0.args.group_size=32",
                 "stages.0.rules=[{pattern: no_such_layer, args: {bits: 8}}]",
                 f"out_dir={out}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert any("no_such_layer" in w for w in report["warnings"])
    assert "no_such_layer" in capsys.readouterr().err


@pytest.mark.parametrize("override, needle", [
    ("stages.0.args.bits=9", "bits in 2..8"),
    ("stages.0.args.bits=1", "bits in 2..8"),
    ("stages.0.args.group_size=0", "group_size"),
    ("stages.0.args.format=int5x", "int5x"),
    ("stages.0.args.bitz=4", "bitz"),
    ("stages.0.transform=quantise", "quantize"),
])
def test_cli_bad_quant_args(tiny_llama_dir, tiny_text_file, tmp_path, capsys, override, needle):
    out = tmp_path / "bad"
    assert main(["recipe=smollm2_w4g128_rtn", f"model={tiny_llama_dir}",
                 f"eval.corpus=text:{tiny_text_file}", "eval.seq_len=32", override,
                 f"out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists() and os.listdir(tmp_path) == []


def test_cli_nan_weights(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    import shutil

    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "nan_model"
    shutil.copytree(tiny_llama_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = np.nan
    save_file(tensors, broken / "model.safetensors")
    out = tmp_path / "run"
    assert main(["recipe=smollm2_w4g128_rtn", f"model={broken}",
                 f"eval.corpus=text:{tiny_text_file}", f"out_dir={out}"]) == 2
    assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err
    assert not out.exists()
