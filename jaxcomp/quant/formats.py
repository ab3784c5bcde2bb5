"""Quantization formats: integer k-bit and codebook formats (NF/quantile, fp8, fp4, k-bit fp).

Every format groups a ``(K, N)`` kernel along its input dimension K, per output column: one
scale (and, for asymmetric int, one zero point) per group of ``group_size`` consecutive rows.
A group size that does not divide K leaves a shorter last group; weights are never padded.
Formats are frozen, hashable dataclasses: they are static metadata of ``QArray`` leaves.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from statistics import NormalDist

import ml_dtypes
import numpy as np

from jaxcomp.errors import JaxcompError

SCALE_DTYPES = ("bfloat16", "float32")


def _check_grouping(granularity: str, group_size: int | None, scale_dtype: str) -> None:
    if granularity not in ("group", "channel", "tensor"):
        raise JaxcompError(f"granularity must be group, channel or tensor, got {granularity!r}")
    if granularity == "group" and (not isinstance(group_size, int) or group_size < 1):
        raise JaxcompError(f"group_size must be an integer >= 1, got {group_size!r}")
    if scale_dtype not in SCALE_DTYPES:
        raise JaxcompError(f"scale_dtype must be one of {SCALE_DTYPES}, got {scale_dtype!r}")


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """Uniform integer k-bit quantization.

    Asymmetric: ``w ≈ (q - zero) * scale`` with ``q`` in ``[0, 2^bits)`` and an integer zero
    point per group. Symmetric: ``w ≈ (q - 2^(bits-1)) * scale``, ``scale = absmax/(2^(bits-1)-1)``.

    Attributes:
      bits: 2..8.
      granularity: ``"group"`` (``group_size`` rows of K), ``"channel"`` (one group spans K),
        or ``"tensor"`` (one scale for the whole matrix).
      group_size: rows per group for ``"group"``.
      symmetric: no zero point.
      scale_dtype: ``"bfloat16"`` or ``"float32"``.
    """

    bits: int
    granularity: str = "group"
    group_size: int | None = 128
    symmetric: bool = False
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise JaxcompError(f"integer formats need bits in 2..8, got {self.bits!r}")
        _check_grouping(self.granularity, self.group_size, self.scale_dtype)

    @property
    def name(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        return f"int{self.bits}-{kind}-{_grouping_name(self)}"


@dataclasses.dataclass(frozen=True)
class CodebookFormat:
    """Values from a fixed codebook times a block absmax scale: ``w ≈ values[q] * scale``.

    NF/quantile formats (QLoRA's NF4, Dettmers & Zettlemoyer's quantile data types), the
    finite values of fp8 e4m3 / e5m2 and fp4 e2m1 (from ml_dtypes) and the general k-bit
    minifloats of :func:`float_format` are all codebooks. Rounding is to the nearest codebook
    value.

    Attributes:
      kind: ``"nf"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp4"``, or ``"fp<bits>e<exp_bits>"``
        (:func:`float_format`, e.g. ``"fp5e2"``).
      bits: code width (codebook has at most ``2**bits`` values).
      values: sorted codebook, ``max |value|`` is the value an absmax weight maps to.
      granularity, group_size, scale_dtype: as in :class:`IntFormat`.
    """

    kind: str
    bits: int
    values: tuple[float, ...]
    granularity: str = "group"
    group_size: int | None = 64
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        _check_grouping(self.granularity, self.group_size, self.scale_dtype)

    @property
    def name(self) -> str:
        return f"{self.kind}{self.bits if self.kind == 'nf' else ''}-{_grouping_name(self)}"


Format = IntFormat | CodebookFormat


def _grouping_name(fmt) -> str:
    return f"g{fmt.group_size}" if fmt.granularity == "group" else fmt.granularity


@functools.cache
def normal_float_values(bits: int) -> tuple[float, ...]:
    """The k-bit NormalFloat codebook (QLoRA's construction; k=4 gives NF4).

    Quantiles of N(0, 1) with one more positive than negative level and an exact zero,
    normalized to [-1, 1]. The outermost quantile is taken at ``offset`` so the extreme levels
    are finite (QLoRA's offset 0.9677 for 4 bits: the mean of the quantiles at
    ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``).
    """
    if not 2 <= bits <= 8:
        raise JaxcompError(f"NF formats need bits in 2..8, got {bits}")
    n = 2**bits
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    inv = NormalDist().inv_cdf
    pos = [inv(p) for p in np.linspace(offset, 0.5, n // 2 + 1)[:-1]]
    neg = [-inv(p) for p in np.linspace(offset, 0.5, n // 2)[:-1]]
    values = np.array(sorted([*pos, 0.0, *neg]))
    return tuple(float(v) for v in values / np.abs(values).max())


@functools.cache
def float_values(kind: str) -> tuple[float, ...]:
    """Finite values of a minifloat format, enumerated from its bit patterns with ml_dtypes."""
    dtype, bits = {"fp8_e4m3": (ml_dtypes.float8_e4m3fn, 8), "fp8_e5m2": (ml_dtypes.float8_e5m2, 8),
                   "fp4": (None, 4)}[kind]
    patterns = np.arange(2**bits, dtype=np.uint8)
    if bits == 4:  # numpy cannot view bytes as 4-bit floats; decode the bit fields directly
        values = _e2m1_decode(patterns)
    else:
        values = patterns.view(dtype).astype(np.float64)
    values = values[np.isfinite(values)]
    return tuple(float(v) for v in np.unique(values))


def _e2m1_decode(patterns: np.ndarray) -> np.ndarray:
    # e2m1: sign, 2 exponent bits (bias 1), 1 mantissa bit; exponent 0 is subnormal.
    sign = np.where(patterns & 0x8, -1.0, 1.0)
    exp = (patterns >> 1) & 0x3
    man = patterns & 0x1
    mag = np.where(exp == 0, man * 0.5, (1 + man / 2) * 2.0 ** (exp - 1.0))
    return sign * mag


# Exponent bits of the k-bit float data type by total bits, following the exponent-bit finding of
# Dettmers & Zettlemoyer (2023), "The case for 4-bit precision": 2 for 3-5 bit floats, 3 for 6-7,
# 4 for 8. Two bits leave one exponent bit and no mantissa (a ternary code); only e1m0 fits there.
# float_format(bits, exp_bits) (or the name "fp5e3") picks another split.
DEFAULT_EXP_BITS = {2: 1, 3: 2, 4: 2, 5: 2, 6: 3, 7: 3, 8: 4}


@functools.cache
def minifloat_values(bits: int, exp_bits: int) -> tuple[float, ...]:
    """Distinct values of a sign / ``exp_bits`` exponent / mantissa float with no inf or NaN.

    The mantissa has ``m = bits - 1 - exp_bits`` bits; the exponent bias is IEEE's
    ``2^(exp_bits-1) - 1``. Exponent field 0 is subnormal (``M/2^m * 2^(1-bias)``); every
    other field is normal (``(1 + M/2^m) * 2^(E-bias)``), the all-ones exponent included: no
    code is spent on inf or NaN. +0 and -0 coincide, so there are ``2^bits - 1`` values.

    Args:
      bits: total bits, 2..8.
      exp_bits: exponent bits, 1..bits-1.

    Returns:
      Sorted values (not normalized: ``(4, 2)`` gives e2m1's ``0, ±0.5, ..., ±6``).

    Example:
      >>> minifloat_values(3, 2)
      (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0)
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise JaxcompError(f"float formats need bits in 2..8, got {bits!r}")
    if isinstance(exp_bits, bool) or not isinstance(exp_bits, int) or not 1 <= exp_bits < bits:
        raise JaxcompError(f"a {bits}-bit float needs exp_bits in 1..{bits - 1} (one bit is the "
                           f"sign), got {exp_bits!r}")
    man_bits = bits - 1 - exp_bits
    bias = 2 ** (exp_bits - 1) - 1
    exp = np.arange(2**exp_bits)[:, None]
    frac = np.arange(2**man_bits)[None, :] / 2**man_bits
    mag = np.where(exp == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (exp - bias))
    values = np.unique(np.concatenate([mag.ravel(), -mag.ravel()])) + 0.0  # -0.0 -> 0.0
    return tuple(float(v) for v in values)


def float_format(bits: int, exp_bits: int | None = None, group_size=64,
                 scale_dtype: str = "bfloat16") -> CodebookFormat:
    """k-bit minifloat codebook (sign, exponent, mantissa; no inf/NaN) with block absmax scales.

    The value set is :func:`minifloat_values`; a block's absmax weight maps to the largest
    value. ``exp_bits`` defaults to Dettmers & Zettlemoyer's best choice for each width
    (:data:`DEFAULT_EXP_BITS`): 1 for 2 bits (ternary, the only 2-bit float), 2 for 3-5 bits,
    3 for 6-7 bits, 4 for 8 bits.

    Relation to the named formats: ``float_format(4, 2)`` has exactly the values of
    ``minifloat("fp4")`` (e2m1 has no inf/NaN either). ``float_format(8, 4)`` differs from
    ``minifloat("fp8_e4m3")`` (e4m3fn) only at the top: e4m3fn spends exponent 15 / mantissa 7
    on NaN, so its largest value is 448, while here that pattern is the finite value 480 (one
    more level per sign). ``float_format(8, 5)`` likewise extends e5m2's finite values (max
    57344) with the patterns IEEE e5m2 reserves for inf/NaN (up to 114688).

    Args:
      bits: code width, 2..8.
      exp_bits: exponent bits, 1..bits-1 (default: see above).
      group_size: rows per group, ``"channel"`` or ``"tensor"``.
      scale_dtype: ``"bfloat16"`` or ``"float32"``.

    Returns:
      A :class:`CodebookFormat` of kind ``"fp<bits>e<exp_bits>"``.

    Example:
      >>> float_format(5).name
      'fp5e2-g64'
    """
    if exp_bits is None:
        if isinstance(bits, bool) or bits not in DEFAULT_EXP_BITS:
            raise JaxcompError(f"float formats need bits in 2..8, got {bits!r}")
        exp_bits = DEFAULT_EXP_BITS[bits]
    values = minifloat_values(bits, exp_bits)
    gran, size = _grouping(group_size)
    return CodebookFormat(f"fp{bits}e{exp_bits}", bits, values, gran, size, scale_dtype)


def int_format(bits: int, group_size: int | str | None = 128, symmetric: bool = False,
               scale_dtype: str = "bfloat16") -> IntFormat:
    """Integer format; ``group_size`` is an int, ``"channel"`` or ``"tensor"``.

    Example:
      >>> int_format(4, 128).name
      'int4-asym-g128'
    """
    gran, size = _grouping(group_size)
    return IntFormat(bits, gran, size, symmetric, scale_dtype)


def _grouping(group_size) -> tuple[str, int | None]:
    if group_size in ("channel", None):
        return "channel", None
    if group_size == "tensor":
        return "tensor", None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise JaxcompError(f"group_size must be an integer, 'channel' or 'tensor', "
                           f"got {group_size!r}")
    return "group", group_size


def int8(group_size="channel", symmetric=True, scale_dtype="bfloat16") -> IntFormat:
    return int_format(8, group_size, symmetric, scale_dtype)


def int4(group_size=128, symmetric=False, scale_dtype="bfloat16") -> IntFormat:
    return int_format(4, group_size, symmetric, scale_dtype)


def int3(group_size=128, symmetric=False, scale_dtype="bfloat16") -> IntFormat:
    return int_format(3, group_size, symmetric, scale_dtype)


def int2(group_size=64, symmetric=False, scale_dtype="bfloat16") -> IntFormat:
    return int_format(2, group_size, symmetric, scale_dtype)


def nf(bits: int = 4, group_size=64, scale_dtype="bfloat16") -> CodebookFormat:
    """k-bit NormalFloat with block-wise absmax (``nf(4)`` is NF4)."""
    gran, size = _grouping(group_size)
    return CodebookFormat("nf", bits, normal_float_values(bits), gran, size, scale_dtype)


def nf4(group_size=64, scale_dtype="bfloat16") -> CodebookFormat:
    return nf(4, group_size, scale_dtype)


def minifloat(kind: str, group_size=32, scale_dtype="bfloat16") -> CodebookFormat:
    """fp8 (``"fp8_e4m3"``, ``"fp8_e5m2"``) or fp4 (``"fp4"``, e2m1) with block scales."""
    gran, size = _grouping(group_size)
    values = float_values(kind)
    return CodebookFormat(kind, math.ceil(math.log2(len(values))), values, gran, size,
                          scale_dtype)


FORMAT_NAMES = ("int", "nf", "fp", "fp8_e4m3", "fp8_e5m2", "fp4")


def format_from_name(name: str, bits: int | None = None, group_size=128,
                     symmetric: bool = False, scale_dtype: str = "bfloat16") -> Format:
    """Builds a format from recipe arguments.

    Args:
      name: ``"int"`` (needs ``bits``), ``"nf"`` (``bits`` default 4), ``"fp"`` (needs
        ``bits``; the k-bit minifloat of :func:`float_format` with its default exponent bits),
        ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp4"``; ``"int4"``/``"nf4"``-style names carry their
        bits and ``"fp5e3"``-style names bits and exponent bits.
      bits: code width where the name does not fix it.
      group_size: int rows per group, ``"channel"`` or ``"tensor"``.
      symmetric: integer formats only.
      scale_dtype: ``"bfloat16"`` or ``"float32"``.

    Returns:
      The format.

    Example:
      >>> format_from_name("int", bits=3, group_size=128).name
      'int3-asym-g128'
      >>> format_from_name("fp", bits=6, group_size="channel").name
      'fp6e3-channel'
    """
    base = name.rstrip("0123456789") if name.startswith(("int", "nf")) else name
    if base != name:
        bits = int(name[len(base):])
    if base == "int":
        if bits is None:
            raise JaxcompError("format 'int' needs bits (2..8)")
        return int_format(bits, group_size, symmetric, scale_dtype)
    if base == "nf":
        return nf(4 if bits is None else bits, group_size, scale_dtype)
    if base in ("fp8_e4m3", "fp8_e5m2", "fp4"):
        return minifloat(base, group_size, scale_dtype)
    if base == "fp":
        if bits is None:
            raise JaxcompError("format 'fp' needs bits (2..8)")
        return float_format(bits, None, group_size, scale_dtype)
    if match := re.fullmatch(r"fp(\d)e(\d)", name):
        return float_format(int(match[1]), int(match[2]), group_size, scale_dtype)
    close = difflib.get_close_matches(name, [*FORMAT_NAMES, "int4", "nf4", "fp5e2"], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise JaxcompError(f"unknown quantization format {name!r}{hint} "
                       f"(formats: {', '.join(FORMAT_NAMES)})")


def resolve_format(args, where: str = "") -> Format:
    """The format a transform's arguments ask for: ``args["fmt"]`` when it is set, else one
    built from ``format``, ``bits``, ``group_size``, ``symmetric``, ``scale_dtype`` (the
    recipe form). ``where`` (a param path) prefixes errors.

    Example:
      >>> resolve_format({"fmt": None, "format": "int", "bits": 3, "group_size": 128,
      ...                 "symmetric": False, "scale_dtype": "bfloat16"}).name
      'int3-asym-g128'
    """
    fmt = args.get("fmt")
    prefix = f"{where}: " if where else ""
    if fmt is None:
        try:
            return format_from_name(args["format"], args["bits"], args["group_size"],
                                    args["symmetric"], args["scale_dtype"])
        except JaxcompError as e:
            raise JaxcompError(f"{prefix}{e}") from None
    if not isinstance(fmt, (IntFormat, CodebookFormat)):
        raise JaxcompError(f"{prefix}fmt must be a quantization format, got {fmt!r}")
    return fmt
