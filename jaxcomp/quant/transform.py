"""The ``quantize`` transform: rule-selected kernels -> ``QArray`` leaves (RTN)."""

from __future__ import annotations

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import require_matrix
from jaxcomp.core.transform import leaf_transform, register_transform
from jaxcomp.errors import JaxcompError
from jaxcomp.quant.formats import format_from_name, resolve_format
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.rtn import quantize_array

# Linear kernels of the decoder blocks (LLaMA ``layers_i``, GPT-2 ``h_i``); embeddings and the
# LM head stay unless a rule asks.
DEFAULT_TARGETS = (r"^(layers|h)_\d+/.*kernel$",)
DEFAULT_IGNORE = ()


def _quantize_leaf(w, path, fmt=None, format="int", bits=None, group_size=128, symmetric=False,
                   scale_dtype="bfloat16", clip_search=False):
    fmt = resolve_format(dict(fmt=fmt, format=format, bits=bits, group_size=group_size,
                              symmetric=symmetric, scale_dtype=scale_dtype))

    def quantize_matrix(m, name):
        if isinstance(m, CompressedLeaf):
            raise JaxcompError(f"{name} is already compressed ({type(m).__name__})")
        return quantize_array(m, fmt, clip_search=clip_search, name=name)

    if isinstance(w, QArray):
        raise JaxcompError("already compressed (QArray); select another parameter")
    if isinstance(w, CompressedLeaf):  # a factorized leaf: quantize its factors (TT cores, ...)
        return w.map_factors(lambda m, name: quantize_matrix(m, f"{path}/{name}"))
    require_matrix(path, w)
    return quantize_matrix(w, path)


@register_transform("quantize")
def quantize(fmt=None, *, format: str = "int", bits: int | None = 4, group_size=128,
             symmetric: bool = False, scale_dtype: str = "bfloat16", clip_search: bool = False,
             rules=None, targets=DEFAULT_TARGETS, ignore=DEFAULT_IGNORE, progress=None):
    """Round-to-nearest quantization of the selected kernels into packed ``QArray`` leaves.

    Args:
      fmt: a format object (``int4(128)``, ``nf4()``, ...); or build one from ``format``,
        ``bits``, ``group_size``, ``symmetric``, ``scale_dtype`` (the recipe form).
      clip_search: per-group clip-ratio grid search minimizing weight MSE.
      rules: ordered rules; a rule's ``args`` override any of the arguments above for the
        leaves it selects (mixed precision).
      targets, ignore: patterns selected / skipped (ignore first). Default: every kernel
        inside a decoder block.
      progress: progress bar (default: when stderr is a terminal).

    Returns:
      A pure transform ``params -> params``.

    Example:
      >>> q = quantize(int4(group_size=128), rules=[Rule("down_proj", args={"bits": 8})])
      >>> small = q(params)  # doctest: +SKIP
    """
    if fmt is None:  # fail on a bad format now, not at the first selected leaf
        format_from_name(format, bits, group_size, symmetric, scale_dtype)
    return leaf_transform(_quantize_leaf, rules, targets=targets, ignore=ignore,
                          progress=progress, desc="quantize", fmt=fmt, format=format, bits=bits,
                          group_size=group_size, symmetric=symmetric, scale_dtype=scale_dtype,
                          clip_search=clip_search)
