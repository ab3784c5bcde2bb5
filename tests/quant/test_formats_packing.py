"""Packing, formats and RTN on plain arrays: properties, golden values, bad input."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp.errors import JaxcompError
from jaxcomp.quant import (
    IntFormat,
    fake_quantize,
    format_from_name,
    int4,
    int_format,
    minifloat,
    nf,
    nf4,
    normal_float_values,
    pack,
    quantize_array,
    unpack,
)
from jaxcomp.quant.qarray import group_rows

# QLoRA's published NF4 code values (bitsandbytes), float32.
NF4_PUBLISHED = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                 -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 70), cols=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip(bits, rows, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, cols))
    packed = pack(codes, bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (-(-rows // 8) * bits, cols)
    np.testing.assert_array_equal(unpack(packed, bits, rows), codes)


def test_pack_layout_int4_two_per_byte():
    codes = np.array([1, 2, 3, 4, 5, 6, 7, 0])[:, None]
    assert pack(codes, 4)[:, 0].tolist() == [0x21, 0x43, 0x65, 0x07]
    assert pack(np.array([1, 2, 3, 0, 0, 0, 0, 0])[:, None], 2)[:, 0].tolist() == [0x39, 0]


def _step_bound(q, w):
    """Per-element half step of an int QArray: |w - deq| <= scale / 2."""
    k = w.shape[0]
    rows = group_rows(q.fmt, k)
    scale = np.repeat(np.asarray(q.scales, np.float32), rows, axis=0)[:k]
    return np.abs(np.asarray(q.materialize()) - w) <= scale / 2 * (1 + 1e-6) + 1e-12


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 300), cols=st.integers(1, 4),
       group=st.sampled_from([1, 7, 32, 64, 128, "channel", "tensor"]),
       symmetric=st.booleans(), scale_dtype=st.sampled_from(["float32", "bfloat16"]),
       seed=st.integers(0, 2**31 - 1))
def test_int_error_within_half_step(bits, rows, cols, group, symmetric, scale_dtype, seed):
    w = np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32)
    q = quantize_array(w, int_format(bits, group, symmetric, scale_dtype))
    assert _step_bound(q, w).all()
    assert q.packed.shape == (-(-rows // 8) * bits, cols)


@pytest.mark.parametrize("fmt", [nf4(64), nf(3, 32), minifloat("fp4", 32),
                                 minifloat("fp8_e4m3", 32), minifloat("fp8_e5m2", 32)],
                         ids=lambda f: f.name)
def test_codebook_error_within_half_gap(fmt):
    w = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    q = quantize_array(w, fmt)
    values = np.asarray(fmt.values)
    half_gap = np.max(np.diff(values)) / 2
    scale = np.repeat(np.asarray(q.scales, np.float32), fmt.group_size, axis=0)[:200]
    assert (np.abs(np.asarray(q.materialize()) - w) <= half_gap * scale * (1 + 1e-6)).all()


def test_grid_values_survive_exactly():
    """Weights already on a format's grid (power-of-two scale, extremes present) come back
    exactly."""
    rng = np.random.default_rng(1)
    k, n, g, scale = 64, 8, 32, 2.0**-5
    codes = rng.integers(0, 16, size=(k, n))
    codes[0], codes[1], codes[g], codes[g + 1] = 0, 15, 0, 15  # full range in each group
    zero = 5
    w = ((codes - zero) * scale).astype(np.float32)
    q = quantize_array(w, int_format(4, g, scale_dtype="float32"))
    np.testing.assert_array_equal(np.asarray(q.materialize()), w)
    sym = ((codes - 8).clip(-7, 7) * scale).astype(np.float32)
    sym[0] = 7 * scale
    sym[g] = -7 * scale
    q = quantize_array(sym, int_format(4, g, symmetric=True, scale_dtype="float32"))
    np.testing.assert_array_equal(np.asarray(q.materialize()), sym)
    values = np.asarray(nf4().values)
    on_grid = (values[codes] * scale).astype(np.float32)
    on_grid[0] = scale
    on_grid[g] = -scale
    q = quantize_array(on_grid, nf4(g, scale_dtype="float32"))
    np.testing.assert_array_equal(np.asarray(q.materialize()), on_grid)


def test_shorter_last_group_is_quantized_on_its_own():
    w = np.random.default_rng(2).normal(size=(576, 8)).astype(np.float32)
    q = quantize_array(w, int4(128))
    assert q.scales.shape == (5, 8)  # 4 full groups + one of 64 rows
    alone = quantize_array(w[512:], int4(128))
    np.testing.assert_array_equal(np.asarray(q.materialize())[512:],
                                  np.asarray(alone.materialize()))


def test_nf4_codebook_matches_qlora():
    np.testing.assert_allclose(normal_float_values(4), NF4_PUBLISHED, atol=2e-7)


def test_minifloat_codebooks_come_from_ml_dtypes():
    fp4 = np.asarray(minifloat("fp4").values)
    assert len(fp4) == 15 and fp4.max() == 6.0
    np.testing.assert_array_equal(fp4.astype(ml_dtypes.float4_e2m1fn).astype(np.float64), fp4)
    e4m3 = np.asarray(minifloat("fp8_e4m3").values)
    assert e4m3.max() == float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)
    np.testing.assert_array_equal(e4m3.astype(ml_dtypes.float8_e4m3fn).astype(np.float64), e4m3)


def test_nbytes_int4_g128():
    k, n = 576, 1536
    w = np.random.default_rng(3).normal(size=(k, n)).astype(np.float32)
    for scale_dtype, scale_bytes in (("bfloat16", 2), ("float32", 4)):
        q = quantize_array(w, int4(128, scale_dtype=scale_dtype))
        groups = 5
        assert q.nbytes == k * n // 2 + groups * n * (scale_bytes + 1)
        assert q.nbytes <= 0.145 * w.nbytes
        assert q.num_params == k * n + 2 * groups * n


def test_straight_through_gradient():
    w = jax.random.normal(jax.random.key(0), (64, 8))
    g = jax.grad(lambda w: jnp.sum(fake_quantize(w, int4(32)) * 3.0))(w)
    np.testing.assert_array_equal(g, np.full(w.shape, 3.0))
    np.testing.assert_array_equal(fake_quantize(w, int4(32)),
                                  quantize_array(w, int4(32)).materialize())


def test_clip_search_never_worse():
    w = np.random.default_rng(4).standard_t(3, size=(256, 32)).astype(np.float32)
    for fmt in (int4(128), int_format(3, 64), nf4(64)):
        plain = np.mean((np.asarray(quantize_array(w, fmt).materialize()) - w) ** 2)
        clipped = np.mean((np.asarray(quantize_array(w, fmt, clip_search=True).materialize())
                           - w) ** 2)
        assert clipped <= plain


@pytest.mark.parametrize("make, match", [
    (lambda: int_format(1), "bits in 2..8"),
    (lambda: int_format(9), "bits in 2..8"),
    (lambda: int_format(4, 0), "group_size"),
    (lambda: int_format(4, -3), "group_size"),
    (lambda: int_format(4, 128, scale_dtype="float16"), "scale_dtype"),
    (lambda: format_from_name("nf5x"), "nf5x"),
    (lambda: format_from_name("fp9"), "unknown quantization format"),
    (lambda: format_from_name("int"), "needs bits"),
])
def test_bad_formats(make, match):
    with pytest.raises(JaxcompError, match=match):
        make()


def test_bad_weights():
    w = np.ones((64, 4), np.float32)
    w[3, 1] = np.nan
    with pytest.raises(JaxcompError, match="layers_0/mlp/up_proj/kernel: .*NaN"):
        quantize_array(w, int4(32), name="layers_0/mlp/up_proj/kernel")
    with pytest.raises(JaxcompError, match="2-D"):
        quantize_array(np.ones(8, np.float32), int4(32))


def test_format_names():
    assert format_from_name("int", bits=4) == IntFormat(4, "group", 128, False, "bfloat16")
    assert format_from_name("nf4", group_size=64) == nf4(64)
    assert format_from_name("fp4", group_size=32) == minifloat("fp4", 32)


# --- general k-bit minifloats (float_format) ---------------------------------------------------

def test_minifloat_values_by_hand():
    from jaxcomp.quant.formats import minifloat_values

    # e1m0 (bias 0): subnormal 0, normal 2^1.
    assert minifloat_values(2, 1) == (-2.0, 0.0, 2.0)
    # e2m0 (bias 1): 0, 2^0, 2^1, 2^2.
    assert minifloat_values(3, 2) == (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    # e1m1 (bias 0): subnormals 0, 1; normals 2, 3 -- a uniform grid.
    assert minifloat_values(3, 1) == (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)
    # e2m2 (bias 1): subnormals k/4 * 2^0, normals (1 + k/4) * 2^(E-1).
    pos = [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0]
    assert minifloat_values(5, 2) == tuple([-v for v in reversed(pos)] + [0.0] + pos)
    # e3m0 (bias 3): subnormal 0 only, then 2^-2 .. 2^4.
    assert minifloat_values(4, 3) == tuple(sorted({0.0} | {s * 2.0**e for s in (1, -1)
                                                           for e in range(-2, 5)}))


@pytest.mark.parametrize("bits", range(2, 9))
def test_float_format_value_sets(bits):
    from jaxcomp.quant.formats import DEFAULT_EXP_BITS, float_format

    fmt = float_format(bits)
    values = np.asarray(fmt.values)
    assert fmt.bits == bits and fmt.kind == f"fp{bits}e{DEFAULT_EXP_BITS[bits]}"
    assert len(values) == 2**bits - 1  # every code finite; only +-0 coincide
    assert (np.diff(values) > 0).all()  # sorted, unique
    np.testing.assert_array_equal(values, -values[::-1])  # symmetric
    assert 0.0 in values and not np.signbit(values[len(values) // 2])  # +0, not -0
    assert np.isfinite(values).all()


def test_float_format_default_exponent_bits():
    from jaxcomp.quant.formats import float_format

    assert [float_format(b).kind for b in range(2, 9)] == [
        "fp2e1", "fp3e2", "fp4e2", "fp5e2", "fp6e3", "fp7e3", "fp8e4"]


def test_float_format_agrees_with_named_minifloats():
    from jaxcomp.quant.formats import float_format

    assert float_format(4, 2).values == minifloat("fp4").values  # e2m1: no inf/NaN either
    general = set(float_format(8, 4).values)
    e4m3fn = set(minifloat("fp8_e4m3").values)
    # e4m3fn spends S.1111.111 on NaN (max 448); here it is the finite value 480.
    assert general - e4m3fn == {480.0, -480.0} and e4m3fn <= general
    e5m2 = set(minifloat("fp8_e5m2").values)
    general_e5 = set(float_format(8, 5).values)
    extra = sorted(general_e5 - e5m2)
    assert e5m2 <= general_e5 and len(extra) == 8 and extra[-1] == 114688.0  # 1.75 * 2^16
    assert min(v for v in extra if v > 0) > max(e5m2)  # only the top (inf/NaN) exponent added


def test_float_format_names_and_format_from_name():
    from jaxcomp.quant.formats import float_format

    assert float_format(5).name == "fp5e2-g64"
    assert float_format(6, group_size="channel").name == "fp6e3-channel"
    assert float_format(4, 3, 32).name == "fp4e3-g32"
    assert format_from_name("fp", bits=5, group_size=64) == float_format(5, None, 64)
    assert format_from_name("fp5e3", group_size=128) == float_format(5, 3, 128)
    assert format_from_name("fp", bits=3, group_size="tensor").granularity == "tensor"
    # the named formats keep their meaning
    assert format_from_name("fp4", group_size=32) == minifloat("fp4", 32)
    assert format_from_name("fp8_e4m3", group_size=32) == minifloat("fp8_e4m3", 32)


@pytest.mark.parametrize("make, match", [
    (lambda: format_from_name("fp"), "needs bits"),
    (lambda: format_from_name("fp", bits=9), "bits in 2..8"),
    (lambda: format_from_name("fp", bits=1), "bits in 2..8"),
    (lambda: format_from_name("fp5e5"), "exp_bits in 1..4"),
    (lambda: format_from_name("fp3e0"), "exp_bits in 1..2"),
    (lambda: format_from_name("fp5e2", group_size=0), "group_size"),
])
def test_bad_float_formats(make, match):
    with pytest.raises(JaxcompError, match=match):
        make()


@pytest.mark.parametrize("bits, group", [(2, 32), (3, 64), (5, 32), (6, "channel"), (7, 16),
                                         (8, "tensor")])
def test_float_format_quantize_round_trip(bits, group):
    from jaxcomp.quant.formats import float_format

    fmt = float_format(bits, group_size=group, scale_dtype="float32")
    rng = np.random.default_rng(bits)
    k, n = 100, 6
    w = rng.normal(size=(k, n)).astype(np.float32)
    q = quantize_array(w, fmt)
    assert q.packed.shape == (-(-k // 8) * bits, n)  # bits per code as the name says
    codes = np.asarray(q.codes())
    assert codes.max() < len(fmt.values)
    rows = group_rows(fmt, k)
    scale = np.repeat(np.asarray(q.scales, np.float32), rows, axis=0)[:k]
    if fmt.granularity == "tensor":
        scale = np.broadcast_to(scale[:1, :1], (k, n))
    else:
        scale = np.broadcast_to(scale, (k, n))
    values = np.asarray(fmt.values)
    deq = np.asarray(q.materialize())
    # Decoding is the codebook times the scale; nearest rounding: within half the largest gap.
    np.testing.assert_allclose(deq, values[codes] * scale, rtol=1e-6)
    assert (np.abs(deq - w) <= np.max(np.diff(values)) / 2 * scale * (1 + 1e-5)).all()
    # The absmax weight of a group lands on the top code exactly (float32 scales).
    if fmt.granularity == "tensor":
        at = np.unravel_index(np.argmax(np.abs(w)), w.shape)
    else:
        at = (np.argmax(np.abs(w[:rows, 0])), 0)
    np.testing.assert_allclose(abs(deq[at]), abs(w[at]), rtol=1e-6)
    assert abs(codes[at] - (len(values) - 1) / 2) == (len(values) - 1) / 2


def test_float_format_grid_values_survive():
    from jaxcomp.quant.formats import float_format

    fmt = float_format(5, 2, 32, scale_dtype="float32")
    values = np.asarray(fmt.values)
    codes = np.random.default_rng(7).integers(0, len(values), size=(64, 4))
    codes[0], codes[32] = len(values) - 1, 0  # the extremes present in each group
    w = (values[codes] * 2.0**-3).astype(np.float32)
    q = quantize_array(w, fmt)
    np.testing.assert_array_equal(np.asarray(q.materialize()), w)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)
