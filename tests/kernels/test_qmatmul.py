"""Pallas qmatmul: interpret mode against the float64 reference, lowering for GPU and TPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.core.dispatch import kernel_backend, matmul_impl, use_matmul_impl
from jaxcomp.quant import int2, int4, int8, int_format, minifloat, nf4, quantize_array
from pallas_kernels.qmatmul import qmatmul, supported
from pallas_kernels.qmatmul.ops import kernel_format
from pallas_kernels.qmatmul.reference import dequantize_np, qmatmul_reference

FORMATS = {
    "int4_g128": int4(128), "int4_sym_g32": int4(32, symmetric=True), "int8_channel": int8(),
    "int8_g64": int_format(8, 64), "int2_g64": int2(64), "nf4_g64": nf4(64),
    "fp4_g32": minifloat("fp4", 32),
}


def _tol(dtype):
    return {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}[dtype]


@settings(max_examples=12, deadline=None)
@given(fmt=st.sampled_from(list(FORMATS)), k_groups=st.integers(1, 4),
       tail=st.sampled_from([0, 64]), n_blocks=st.integers(1, 3), m=st.sampled_from([1, 5, 70]),
       dtype=st.sampled_from([jnp.float32, jnp.bfloat16]), seed=st.integers(0, 1000))
def test_interpret_matches_reference(fmt, k_groups, tail, n_blocks, m, dtype, seed):
    fmt = FORMATS[fmt]
    kf_rows = fmt.group_size if fmt.granularity == "group" else 256
    k, n = kf_rows * k_groups + tail, 64 * n_blocks
    rng = np.random.default_rng(seed)
    q = quantize_array(rng.normal(size=(k, n)).astype(np.float32), fmt)
    x = rng.normal(size=(m, k)).astype(np.float32)
    assert supported(q, x.shape, "interpret")
    y = qmatmul(jnp.asarray(x, dtype), q, "interpret")
    assert y.dtype == dtype and y.shape == (m, n)
    ref = qmatmul_reference(np.asarray(jnp.asarray(x, dtype), np.float64), q)
    err = np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max()
    assert err <= _tol(dtype), err


@pytest.mark.parametrize("min_programs", [3, 7, 64])
@pytest.mark.parametrize("codes", ["convert", "mantissa"])
def test_split_k_and_code_conversions(monkeypatch, min_programs, codes):
    # 5 groups over 2 column blocks: K split into 2 (3+2 steps), 3 (2+2+1) or 5 chunks.
    import pallas_kernels.qmatmul.ops as ops
    from pallas_kernels.qmatmul.kernel import Tiling

    monkeypatch.setitem(ops.TILINGS["interpret"], "decode",
                        Tiling(16, 64, min_programs=min_programs, codes=codes))
    rng = np.random.default_rng(min_programs)
    for fmt in (int4(128), int2(64), int4(32, symmetric=True)):
        q = quantize_array(rng.normal(size=(5 * fmt.group_size, 128)).astype(np.float32), fmt)
        x = rng.normal(size=(3, q.orig_shape[0])).astype(np.float32)
        y = qmatmul(jnp.asarray(x), q, "interpret")
        ref = qmatmul_reference(x, q)
        assert np.abs(np.asarray(y, np.float64) - ref).max() / np.abs(ref).max() <= 1e-5


def test_ptx_codes_are_gpu_only(monkeypatch):
    import pallas_kernels.qmatmul.ops as ops
    from pallas_kernels.qmatmul.kernel import Tiling

    with pytest.raises(ValueError, match="codes must be one of"):
        Tiling(16, 64, codes="lut")
    monkeypatch.setitem(ops.TILINGS["interpret"], "decode", Tiling(16, 64, codes="ptx"))
    q = quantize_array(np.ones((256, 64), np.float32), int4(128))
    with pytest.raises(ValueError, match="inline PTX"):
        qmatmul(jnp.ones((1, 256)), q, "interpret")


def _run_ptx(asm: str, word: int) -> list[int]:
    """Executes the few PTX instructions the code conversions use (mov, and, or, shl, shr,
    prmt, lop3) on 32-bit integers: the CPU cannot run the asm, so its bit logic is checked
    here."""
    regs = {"$2": word}
    val = lambda t: int(t, 0) if t[0].isdigit() else regs[t]  # noqa: E731
    binary = {"and.b32": lambda x, y: x & y, "or.b32": lambda x, y: x | y,
              "shl.b32": lambda x, y: (x << y) & 0xFFFFFFFF, "shr.b32": lambda x, y: x >> y}

    def pick(pool, nibble):  # prmt: byte nibble & 7, or with bit 3 set that byte's sign spread
        byte = pool[nibble & 7]
        return (0xFF if byte & 0x80 else 0) if nibble & 8 else byte

    for line in asm.split("\n"):
        op, _, args = line.rstrip(";").partition(" ")
        a = [t.strip() for t in args.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op in binary:
            regs[a[0]] = binary[op](val(a[1]), val(a[2]))
        elif op == "prmt.b32":  # bytes of {b, a}, each picked by one selector nibble
            pool = (val(a[2]) << 32 | val(a[1])).to_bytes(8, "little")
            sel = val(a[3])
            regs[a[0]] = int.from_bytes(bytes(pick(pool, sel >> 4 * i & 15) for i in range(4)),
                                        "little")
        elif op == "lop3.b32":  # bit k of the table: the result for (a, b, c) = bits of k
            x, y, z, lut = (val(t) for t in a[1:])
            regs[a[0]] = sum(1 << bit for bit in range(32)
                             if lut >> ((x >> bit & 1) << 2 | (y >> bit & 1) << 1
                                        | (z >> bit & 1)) & 1)
        else:
            assert op in ("{", "}", ".reg"), op
    lo, hi = regs["$0"], regs["$1"]
    return [lo & 0xFFFF, lo >> 16, hi & 0xFFFF, hi >> 16]  # the four 16-bit results


@pytest.mark.parametrize("bits", [2, 4])
def test_ptx_code_conversion_bit_logic(bits):
    from ml_dtypes import bfloat16

    from pallas_kernels.qmatmul.kernel import ptx_code_asm

    rng = np.random.default_rng(bits)
    for plane in range(8 // bits):
        for word in rng.integers(0, 2**32, 64, dtype=np.uint64).tolist():
            halves = np.array(_run_ptx(ptx_code_asm(plane, bits), word), np.uint16)
            got = halves.view(bfloat16).astype(np.float64)
            codes = [(word >> 8 * i + plane * bits) & ((1 << bits) - 1) for i in range(4)]
            np.testing.assert_array_equal(got, 128.0 + np.array(codes))


@pytest.mark.parametrize("fmt", ["nf4_g64", "fp4_g32"])
def test_ptx_codebook_lookup_bit_logic(fmt):
    # The lookup must give, bit for bit, the bfloat16 weights of the select chain it replaces.
    from pallas_kernels.qmatmul.kernel import ptx_codebook_asm

    codebook = kernel_format(quantize_array(np.ones((64, 64), np.float32), FORMATS[fmt])).codebook
    want = np.asarray(jnp.asarray(np.float32(codebook)).astype(jnp.bfloat16)).view(np.uint16)
    rng = np.random.default_rng(len(codebook))
    words = [0, 0xFFFFFFFF, 0x76543210, 0xFEDCBA98] + rng.integers(
        0, 2**32, 64, dtype=np.uint64).tolist()
    for plane in range(2):
        for word in words:
            codes = [word >> 8 * i + 4 * plane & 15 for i in range(4)]
            if max(codes) >= len(codebook):  # fp4 has 15 values: code 15 never occurs
                continue
            assert _run_ptx(ptx_codebook_asm(plane, codebook), word) == want[codes].tolist()


def test_ptx_code_conversions_assemble(tmp_path):
    # ptxas (the CUDA toolkit's, no GPU needed) accepts every inline-PTX conversion, wrapped
    # in a kernel that loads the packed word and stores both outputs.
    import shutil
    import subprocess

    from pallas_kernels.qmatmul.kernel import ptx_code_asm, ptx_codebook_asm

    ptxas = shutil.which("ptxas")
    if ptxas is None:
        pytest.skip("ptxas (CUDA toolkit) not on PATH: the inline PTX cannot be assembled here; "
                    "its bit logic is still checked by the *_bit_logic tests")
    codebook = FORMATS["nf4_g64"].values
    blocks = [ptx_code_asm(p, b) for b in (2, 4) for p in range(8 // b)]
    blocks += [ptx_codebook_asm(p, codebook) for p in range(2)]
    body = "\n".join(f"{{\n{asm.replace('$0', '%r1').replace('$1', '%r2').replace('$2', '%r0')}"
                     f"\nst.global.v2.u32 [%rd1+{8 * i}], {{%r1, %r2}};\n}}"
                     for i, asm in enumerate(blocks))
    src = tmp_path / "codes.ptx"
    src.write_text(".version 8.0\n.target sm_90\n.address_size 64\n"
                   ".visible .entry codes(.param .u64 p) {\n.reg .b32 %r<3>;\n.reg .b64 %rd<2>;\n"
                   "ld.param.u64 %rd1, [p];\nld.global.u32 %r0, [%rd1];\n"
                   f"{body}\nret;\n}}\n")
    run = subprocess.run([ptxas, "-arch=sm_90", str(src), "-o", str(tmp_path / "codes.cubin")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_reference_agrees_with_qarray():
    rng = np.random.default_rng(0)
    for fmt in FORMATS.values():
        q = quantize_array(rng.normal(size=(200, 24)).astype(np.float32), fmt)
        np.testing.assert_allclose(dequantize_np(q), np.asarray(q.materialize()), rtol=1e-6,
                                   atol=1e-7)


def test_unsupported_formats_fall_back():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(256, 64)).astype(np.float32)
    assert kernel_format(quantize_array(w, int_format(3, 128))) is None  # 3 bits straddle bytes
    assert kernel_format(quantize_array(w, minifloat("fp8_e4m3", 32))) is None  # 253 codes
    assert kernel_format(quantize_array(w, int4(16))) is None  # 8 rows per plane: too few
    q = quantize_array(w, int4(128))
    assert not supported(q, (1, 256), "gpu") or q.orig_shape[1] % 32 == 0
    with pytest.raises(ValueError, match="does not support"):
        qmatmul(jnp.ones((1, 256)), quantize_array(w, int_format(3, 128)), "interpret")


def test_gradient_wrt_activations():
    rng = np.random.default_rng(2)
    q = quantize_array(rng.normal(size=(256, 64)).astype(np.float32), int4(128))
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)
    g = jax.grad(lambda x: jnp.sum(qmatmul(x, q, "interpret") ** 2))(x)
    want = jax.grad(lambda x: jnp.sum((x @ q.materialize()) ** 2))(x)
    # Relative to the largest entry: elementwise rtol is meaningless where sums cancel.
    assert float(jnp.abs(g - want).max() / jnp.abs(want).max()) <= 1e-5


# Every kernel and tiling lowers for Triton (GPU) and Mosaic (TPU) on this CPU; shapes include
# a non-power-of-two number of groups (Triton needs power-of-two tiles) and a short tail group.
LOWERING_CASES = [(fmt, k, n, m) for fmt in ("int4_g128", "int8_channel", "int2_g64", "nf4_g64")
                  for (k, n) in ((4096, 4096), (11008, 4096), (576, 1536)) for m in (1, 512)]


@pytest.mark.parametrize("fmt, k, n, m", LOWERING_CASES)
@pytest.mark.parametrize("platform, backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_lowers_for_accelerators(fmt, k, n, m, platform, backend):
    q = quantize_array(np.zeros((k, n), np.float32), FORMATS[fmt])
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    if not supported(q, x.shape, backend):
        pytest.skip(f"{fmt} {k}x{n} M={m}: XLA path on {backend} by design")
    text = jax.jit(lambda x, q: qmatmul(x, q, backend)).trace(x, q).lower(
        lowering_platforms=(platform,)).as_text()
    target = "triton" if backend == "gpu" else "tpu_custom_call"
    assert re.search(target, text), f"no {target} call in the lowered module"


def test_dispatch_switch(monkeypatch):
    monkeypatch.delenv("JAXCOMP_MATMUL", raising=False)
    assert matmul_impl() == "auto" and kernel_backend() is None  # CPU: XLA
    q = quantize_array(np.ones((256, 64), np.float32), int4(128))
    f = jax.jit(lambda x, q: q.left_matmul(x))
    x = jnp.ones((1, 256))
    assert "pallas_call" not in str(f.trace(x, q).jaxpr)
    with use_matmul_impl("pallas"):
        assert kernel_backend() == "interpret"
        assert "pallas_call" in str(f.trace(x, q).jaxpr)  # the same function, traced afresh
    assert "pallas_call" not in str(f.trace(x, q).jaxpr)
    monkeypatch.setenv("JAXCOMP_MATMUL", "xla")
    assert kernel_backend() is None
    monkeypatch.setenv("JAXCOMP_MATMUL", "bogus")
    with pytest.raises(ValueError, match="JAXCOMP_MATMUL"):
        matmul_impl()


@pytest.mark.slow
def test_w4_smollm2_kernel_path_equals_xla():
    from jaxcomp.errors import JaxcompError
    from jaxcomp.models import build_model
    from jaxcomp.models.loading import load_model
    from jaxcomp.quant import quantize

    try:
        m = load_model("smollm2-135m")
    except JaxcompError as e:
        pytest.skip(str(e))
    q = quantize(int4(128))(m.params)
    model = build_model(m.config)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 49152, (1, 8)))
    forward = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    with use_matmul_impl("xla"):
        want = np.asarray(jax.jit(forward)(q, tokens))
    with use_matmul_impl("pallas"):
        assert str(jax.make_jaxpr(forward)(q, tokens)).count("pallas_call") == 210
        got = np.asarray(jax.jit(forward)(q, tokens))
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


def test_sass_loop_body(bench_module):
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/               @P0 BRA 0x50 ;
        /*0030*/                   PRMT R3, R2, 0x4140, RZ ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R14, R8 ;
        /*0050*/               @!P1 BRA 0x30 ;
        /*0060*/                   EXIT ;
        /*0070*/                   BRA 0x70;"""
    assert bench_module("kernel_sass").loop_body(sass) == ["PRMT", "HMMA", "BRA"]


def test_bench_tiling_specs(bench_module):
    from pallas_kernels.qmatmul.kernel import Tiling

    parse_tiling = bench_module("qmatmul").parse_tiling

    current = Tiling(16, 64, codes="ptx")
    assert parse_tiling("decode=128:8:3:528", current)[1] == Tiling(16, 128, 8, 3, 528, "ptx")
    assert parse_tiling("prefill=64:4:2:1:mantissa")[1] == Tiling(64, 64, 4, 2, 1, "mantissa")
    for bad in ("decode=64:8", "decoder=64:8:4:528", "decode=64:x:4:528"):
        with pytest.raises(ValueError, match="bad tiling"):
            parse_tiling(bad)


def test_n_major_patch_applies_and_matches_reference(tmp_path):
    # scripts/bench/patches/n_major_packed.patch (an experiment gpu_kernels.sh times: packed
    # weights stored N-major) must keep applying to the kernel and keep computing x @ W.
    import os
    import shutil
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(__file__), "..", "..")
    shutil.copytree(os.path.join(root, "pallas_kernels"), tmp_path / "pallas_kernels")
    patch = os.path.join(root, "scripts", "bench", "patches", "n_major_packed.patch")
    subprocess.run(["git", "apply", patch], cwd=tmp_path, check=True)
    check = """
import sys, numpy as np, jax.numpy as jnp, pallas_kernels
from jaxcomp.quant import int4, int8, nf4, quantize_array
from pallas_kernels.qmatmul import qmatmul
from pallas_kernels.qmatmul.reference import qmatmul_reference
assert pallas_kernels.__file__.startswith(sys.argv[1]), pallas_kernels.__file__
rng = np.random.default_rng(0)
for fmt in (int4(128), int8(), nf4(64)):
    q = quantize_array(rng.normal(size=(512, 192)).astype(np.float32), fmt)
    for m in (1, 70):
        x = rng.normal(size=(m, 512)).astype(np.float32)
        ref = qmatmul_reference(x, q)
        err = np.abs(np.asarray(qmatmul(jnp.asarray(x), q, "interpret"), np.float64) - ref).max()
        assert err <= 1e-5 * np.abs(ref).max(), (fmt, m, err)
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", check, str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
