"""Quantization formats: integer k-bit and codebook formats (NF/quantile, fp8, fp4).

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

    NF/quantile formats (QLoRA's NF4, Dettmers & Zettlemoyer's quantile data types) and the
    finite values of fp8 e4m3 / e5m2 and fp4 e2m1 (from ml_dtypes) are all codebooks. Rounding
    is to the nearest codebook value.

    Attributes:
      kind: ``"nf"``, ``"fp8_e4m3"``, ``"fp8_e5m2"`` or ``"fp4"``.
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


FORMAT_NAMES = ("int", "nf", "fp8_e4m3", "fp8_e5m2", "fp4")


def format_from_name(name: str, bits: int | None = None, group_size=128,
                     symmetric: bool = False, scale_dtype: str = "bfloat16") -> Format:
    """Builds a format from recipe arguments.

    Args:
      name: ``"int"`` (needs ``bits``), ``"nf"`` (``bits`` default 4), ``"fp8_e4m3"``,
        ``"fp8_e5m2"``, ``"fp4"``; ``"int4"``/``"nf4"``-style names carry their bits.
      bits: code width where the name does not fix it.
      group_size: int rows per group, ``"channel"`` or ``"tensor"``.
      symmetric: integer formats only.
      scale_dtype: ``"bfloat16"`` or ``"float32"``.

    Returns:
      The format.

    Example:
      >>> format_from_name("int", bits=3, group_size=128).name
      'int3-asym-g128'
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
    close = difflib.get_close_matches(name, [*FORMAT_NAMES, "int4", "nf4"], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise JaxcompError(f"unknown quantization format {name!r}{hint} "
                       f"(formats: {', '.join(FORMAT_NAMES)})")
