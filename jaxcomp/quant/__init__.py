"""k-bit quantization: formats, bit-packing, the QArray leaf, RTN and the quantize transform."""

# The calibrated methods' modules register their transforms (gptq, awq, smoothquant, rotate,
# act_quant, learn_clip) when imported here (no package walking).
from jaxcomp.quant import (  # noqa: F401
    awq_transform,
    clipping_transform,
    gptq_transform,
    rotation_transform,
)
from jaxcomp.quant.formats import (
    CodebookFormat,
    IntFormat,
    format_from_name,
    int2,
    int3,
    int4,
    int8,
    int_format,
    minifloat,
    nf,
    nf4,
    normal_float_values,
)
from jaxcomp.quant.packing import pack, unpack
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.rtn import fake_quantize, quantize_array
from jaxcomp.quant.transform import quantize

__all__ = ["CodebookFormat", "IntFormat", "QArray", "fake_quantize", "format_from_name", "int2",
           "int3", "int4", "int8", "int_format", "minifloat", "nf", "nf4", "normal_float_values",
           "pack", "quantize", "quantize_array", "unpack"]
