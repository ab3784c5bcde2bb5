"""Activation quantization: a kernel whose inputs are quantized on the fly (W8A8, W4A4).

:class:`ActQuant` wraps any kernel (plain array or compressed leaf). Its ``left_matmul`` fake
quantizes ``x`` per token (row) with a dynamic symmetric k-bit scale (SmoothQuant's per-token
dynamic scheme; QuaRot's A4), then multiplies by the kernel. Fake quantization keeps the
arithmetic in the compute dtype: what is measured is the accuracy of the format, not the speed
of int kernels.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf, factor_array
from jaxcomp.errors import JaxcompError


def quantize_tokens(x: jax.Array, bits: int) -> jax.Array:
    """Per-token (last axis) dynamic symmetric fake quantization with a straight-through
    gradient: ``round(x / s) * s``, ``s = max|x_token| / (2^(bits-1) - 1)``.

    Example:
      >>> quantize_tokens(jnp.array([[0.1, -1.0, 0.5]]), 8)  # the absmax is exact
    """
    top = 2 ** (bits - 1) - 1
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / top
    scale = jnp.where(scale > 0, scale, 1.0)
    q = (jnp.clip(jnp.round(x32 / scale), -top - 1, top) * scale).astype(x.dtype)
    return x + jax.lax.stop_gradient(q - x)


@flax.struct.dataclass
class ActQuant(CompressedLeaf):
    """A kernel applied to per-token fake-quantized inputs.

    Reconstruction invariant: ``W == materialize()`` (the weights are the inner kernel's;
    only the inputs are quantized): ``left_matmul(x) == quantize_tokens(x, act_bits) @ W``.

    Attributes:
      kernel: the ``(K, N)`` weights: an array or a compressed leaf (a ``QArray`` for W8A8).
      act_bits: input bits, 2..8 (static).
    """

    kernel: Any
    act_bits: int = flax.struct.field(pytree_node=False, default=8)

    def __post_init__(self):
        if not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8:
            raise JaxcompError(f"act_bits must be in 2..8, got {self.act_bits!r}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kernel.shape)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.kernel.dtype)

    def materialize(self) -> jax.Array:
        return factor_array(self.kernel, self.dtype)

    def left_matmul(self, x: jax.Array) -> jax.Array:
        from jaxcomp.core.dense import dense

        return dense(quantize_tokens(x, self.act_bits), self.kernel)

    def map_factors(self, fn) -> ActQuant:
        return self.replace(kernel=fn(self.kernel, "kernel"))

    def input_gram(self, gram: np.ndarray) -> np.ndarray:
        """The Gram matrix of the inputs the inner kernel sees, from that of ``x`` (before
        quantization: calibrated weight methods match the float activations)."""
        return gram
