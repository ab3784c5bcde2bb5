"""``y = x @ dequant(W_packed)`` for int8/int4/int2 (grouped or per channel) and 4-bit
codebook (NF4, fp4) weights in jaxcomp's packing layout."""

from pallas_kernels.qmatmul.ops import qmatmul, supported

__all__ = ["qmatmul", "supported"]
