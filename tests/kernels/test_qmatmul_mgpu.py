"""Mosaic GPU (Hopper) int4 decode kernel: interpret mode against float64, lowering for cuda."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.quant import int4, int8, nf4, quantize_array
from pallas_kernels.qmatmul.kernel_mgpu import (
    HopperTiling,
    HopperWeights,
    _split_k,
    prepare,
    qmatmul_hopper,
    smem_bytes,
    unsupported_reason,
)
from pallas_kernels.qmatmul.reference import dequantize_np, qmatmul_reference


def _bf16_weights(q):
    """The kernel's weights: (code - zero) * scale rounded to bfloat16, as float64."""
    w = dequantize_np(q)  # (code - zero) exact, times the bf16 scale: one rounding to bf16 left
    return np.asarray(jnp.asarray(w, jnp.float32).astype(jnp.bfloat16), np.float64)


@settings(max_examples=6, deadline=None)
@given(groups=st.sampled_from([2, 6, 10]), n_blocks=st.integers(1, 2),
       m=st.sampled_from([1, 3, 16]), symmetric=st.booleans(),
       split=st.sampled_from([1, 2, 1000]), in_flight=st.booleans(), seed=st.integers(0, 1000))
def test_interpret_matches_reference(groups, n_blocks, m, symmetric, split, in_flight, seed):
    rng = np.random.default_rng(seed)
    k, n = 128 * groups, 64 * n_blocks
    q = quantize_array(rng.normal(size=(k, n)).astype(np.float32), int4(128, symmetric=symmetric))
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
    # K is padded to 8 or 16 groups: 4 or 8 steps, split 1, 2 or one step per program
    tiling = HopperTiling(groups_per_step=2, max_concurrent_steps=2, min_programs=split,
                          wgmma_in_flight=int(in_flight))
    y = qmatmul_hopper(x, prepare(q), 128, tiling, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    x64 = np.asarray(x, np.float64)
    # against the weights it multiplies: only float32 accumulation and the bf16 output round
    ref = x64 @ _bf16_weights(q)
    err = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
    assert err <= 2 ** -8, err
    # against the exact dequantization: the bf16 weight rounding adds at most ~2^-9 per weight
    exact = qmatmul_reference(x64, q)
    assert np.abs(np.asarray(y, np.float64) - exact).max() / np.abs(exact).max() <= 1e-2


def test_prepare_layout_matches_codes():
    rng = np.random.default_rng(0)
    q = quantize_array(rng.normal(size=(256, 64)).astype(np.float32), int4(128))
    w = prepare(q)
    # K = 2 groups, zero-padded to PAD_GROUPS = 8 (so split K can divide the steps)
    assert w.codes.shape == (64, 1024) and w.codes.dtype == jnp.int4
    assert w.scales.shape == w.zeros.shape == (8, 64)
    codes = np.asarray(w.codes, np.float64).T  # (K', N), signed
    zeros = np.repeat(np.asarray(w.zeros, np.float64), 128, axis=0)
    scales = np.repeat(np.asarray(w.scales, np.float64), 128, axis=0)
    np.testing.assert_array_equal((codes - zeros) * scales, np.pad(dequantize_np(q), ((0, 768),
                                                                                      (0, 0))))
    assert not codes[256:].any() and not zeros[256:].any()


def test_refuses_tilings_over_shared_memory():
    rng = np.random.default_rng(8)
    w = prepare(quantize_array(rng.normal(size=(512, 256)).astype(np.float32), int4(128)))
    x = jnp.zeros((1, 512), jnp.bfloat16)
    assert smem_bytes(HopperTiling(), 128) == 4 * (64 * 128 + 2 * 2 * 2 * 64 + 256 * 16 * 2) + (
        64 * 16 * 4 + 8 * 128 * 2)  # 4 steps of (codes, scales + zeros, x^T), output, A tile
    with pytest.raises(ValueError, match="needs 362496 bytes of shared memory"):
        qmatmul_hopper(x, w, 128, HopperTiling(256, 4, 4))
    qmatmul_hopper(x, w, 128, HopperTiling(256, 4, 1, min_programs=1), interpret=True)  # fits


def test_padding_gives_split_k_divisors():
    # LLaMA's K = 11008 is 43 two-group steps (prime): padded to 88 groups, 44 steps split 4 ways
    rng = np.random.default_rng(6)
    w = prepare(quantize_array(rng.normal(size=(11008, 64)).astype(np.float32), int4(128)))
    assert w.codes.shape == (64, 11264) and w.scales.shape == (88, 64)
    assert _split_k(HopperTiling(), 4096 // 64, 11264 // 256) == 4
    assert _split_k(HopperTiling(), 4096 // 64, 11008 // 256) == 1


@pytest.mark.parametrize("fmt", [int8(), nf4(64), int4(64), int4("channel")])
def test_refuses_other_formats(fmt):
    rng = np.random.default_rng(1)
    q = quantize_array(rng.normal(size=(256, 64)).astype(np.float32), fmt)
    assert unsupported_reason(q) is not None
    with pytest.raises(ValueError, match="kernel_mgpu.prepare"):
        prepare(q)


def test_refuses_bad_activations():
    rng = np.random.default_rng(2)
    w = prepare(quantize_array(rng.normal(size=(256, 64)).astype(np.float32), int4(128)))
    for x in (jnp.zeros((1, 256), jnp.float32), jnp.zeros((17, 256), jnp.bfloat16),
              jnp.zeros((1, 128), jnp.bfloat16), jnp.zeros((1, 1025), jnp.bfloat16),
              jnp.zeros((256,), jnp.bfloat16)):
        with pytest.raises(ValueError, match="qmatmul_hopper"):
            qmatmul_hopper(x, w, 128)
    with pytest.raises(ValueError, match="multiple of 384"):  # K'=1024: not 3-group steps
        qmatmul_hopper(jnp.zeros((1, 256), jnp.bfloat16), w, 128, HopperTiling(groups_per_step=3))


@pytest.mark.parametrize("tiling", [HopperTiling(), HopperTiling(128, 1, 6),
                                    HopperTiling(64, 4, 3, min_programs=1),
                                    HopperTiling(64, 2, 4, wgmma_in_flight=1)])
def test_lowers_for_cuda(tiling):
    k, n, m = 4096, 256, 1
    rng = np.random.default_rng(3)
    w = prepare(quantize_array(rng.normal(size=(k, n)).astype(np.float32), int4(128)))
    abstract = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
                jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), w)]
    f = jax.jit(lambda x, w: qmatmul_hopper(x, w, 128, tiling))
    text = f.trace(*abstract).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_bench_mosaic_path(bench_module):
    # kernel_profile.py's mosaic path runs this kernel on prepared weights with a parsed tiling
    profile = bench_module("kernel_profile")
    rng = np.random.default_rng(4)
    q = quantize_array(rng.normal(size=(512, 128)).astype(np.float32), int4(128))
    fn, spec = profile.hopper_path(q, "mosaic=64:1:2:4", interpret=True)
    assert spec == "mosaic=64:1:2:4" and fn.keywords["tiling"] == HopperTiling(64, 1, 2, 4)
    x = jnp.asarray(rng.normal(size=(3, 512)), jnp.bfloat16)
    y, ref = np.asarray(fn(x, prepare(q)), np.float64), qmatmul_reference(np.asarray(x), q)
    assert np.abs(y - ref).max() / np.abs(ref).max() <= 1e-2
    assert profile.hopper_path(q)[1] == "mosaic=64:2:4:528:0"  # HopperTiling()'s fields
    assert profile.parse_hopper_tiling("mosaic=128:1:3:264:2") == HopperTiling(128, 1, 3, 264, 2)
    for bad in ("mosaic=64:2:4", "decode=64:2:4:528", "mosaic=64:x:4:528", "mosaic=96:2:4:528",
                "mosaic=64:2:2:528:2"):  # in flight >= pipeline depth
        with pytest.raises(ValueError, match="bad"):
            profile.parse_hopper_tiling(bad)


def test_bench_mosaic_checks(bench_module):
    rows = list(bench_module("qmatmul").hopper_checks(np.random.default_rng(5), interpret=True))
    assert [(r["M"], r["split_k"], r["wgmma_in_flight"]) for r in rows] == [
        (m, split, in_flight) for m in (1, 3, 16) for split, in_flight in ((1, 0), (1, 1), (4, 0))]
    assert all(r["max_rel_err_vs_f64"] <= 1e-2 for r in rows), rows


@pytest.mark.parametrize("args, message", [
    (["--sweep", "mosaic=64:2"], "bad tiling 'mosaic=64:2'"),
    (["--paths", "mosaic", "--format", "nf4_g64", "--shapes", "256x64"],
     "the mosaic path needs an int4 group-quantized QArray, got nf4-g64"),
])
def test_bench_profile_refuses_bad_mosaic_args(args, message):
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench",
                          "kernel_profile.py")
    run = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 2 and run.stdout == "", run
    [line] = run.stderr.splitlines()
    assert line.startswith(f"kernel_profile.py: {message}"), line


def test_bench_mosaic_check_failure_is_a_row(bench_module, monkeypatch):
    # a GPU compile failure becomes one row with the message's end, not a crashed check run
    import pallas_kernels.qmatmul.kernel_mgpu as kernel_mgpu

    def fail(*args):
        raise RuntimeError("Mosaic GPU lowering failed\n" + "context\n" * 2000 + "the cause")

    monkeypatch.setattr(kernel_mgpu, "qmatmul_hopper", fail)
    [row] = bench_module("qmatmul").hopper_checks(np.random.default_rng(7), interpret=True)
    assert row["error"] == "RuntimeError: Mosaic GPU lowering failed"
    assert row["error_detail"].endswith("the cause") and len(row["error_detail"]) == 4000


def test_gpu_kernels_summary(tmp_path):
    # gpu_kernels.sh's summary (its embedded Python) on rows shaped like the bench scripts'
    import json
    import os
    import re
    import subprocess
    import sys

    script = open(os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench",
                               "gpu_kernels.sh")).read()
    summary = re.search(r"<<'PY'\n(.*?)\nPY\n", script, re.S).group(1)
    shape = {"M": 1, "K": 4096, "N": 4096, "format": "int4_g128"}
    rows = {
        "checks.jsonl": [{"check": "int4_g128", "M": 1, "dtype": "bfloat16",
                          "max_rel_err_vs_f64": 2e-3},
                         {"check": "int4_g128_mosaic", "M": 1, "dtype": "bfloat16",
                          "error": "RuntimeError: boom", "error_detail": "..."}],
        "profile_mosaic.jsonl": [
            {**shape, "path": "dense_bf16", "tiling": None, "device_us_per_call": 14.5,
             "kernel_us": None, "max_rel_err": None},
            {**shape, "path": "mosaic", "tiling": "mosaic=64:2:4:528", "device_us_per_call": 7.25,
             "kernel_us": 6.0, "max_rel_err": 2e-3},
            {**shape, "path": "mosaic", "tiling": "mosaic=64:4:3:528", "error": "ValueError: x"}],
    }
    for name, lines in rows.items():
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = subprocess.run([sys.executable, "-c", summary, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    assert "int4_g128_mosaic M 1 ERROR RuntimeError: boom" in out
    assert "{'int4_g128/bfloat16': '2.0e-03'}" in out
    assert re.search(r"mosaic\s+mosaic=64:2:4:528\s+total\s+7\.2 kernel\s+6\.0 dense/total 2\.00x",
                     out), out
    assert "4096 4096 mosaic mosaic=64:4:3:528 ERROR ValueError: x" in out


def test_gpu_kernels_mosaic_sweep_lowers(bench_module):
    # every tiling gpu_kernels.sh sweeps builds for cuda at LLaMA's padded K (no GPU time spent
    # on a spec that cannot lower)
    import os
    import re

    script = open(os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench",
                               "gpu_kernels.sh")).read()
    sweep = re.search(r"MOSAIC_SWEEP=\((.*?)\)", script, re.S).group(1).split()
    assert len(sweep) >= 5
    k, kp, n = 11008, 11264, 4096
    w = HopperWeights(jax.ShapeDtypeStruct((n, kp), jnp.int4),
                      jax.ShapeDtypeStruct((kp // 128, n), jnp.bfloat16),
                      jax.ShapeDtypeStruct((kp // 128, n), jnp.bfloat16), k)
    for spec in sweep:
        tiling = bench_module("qmatmul").parse_hopper_tiling(spec)
        f = jax.jit(lambda x, w, tiling=tiling: qmatmul_hopper(x, w, 128, tiling))
        f.trace(jax.ShapeDtypeStruct((1, k), jnp.bfloat16), w).lower(lowering_platforms=("cuda",))
