"""Activation quantization: a kernel whose inputs are quantized on the fly (W8A8, W4A4).

:class:`ActQuant` wraps any kernel (plain array or compressed leaf). Its ``left_matmul`` fake
quantizes ``x`` per token (row) with a dynamic symmetric k-bit scale (SmoothQuant's per-token
dynamic scheme; QuaRot's A4), then multiplies by the kernel. Fake quantization keeps the
arithmetic in the compute dtype: what is measured is the accuracy of the format, not the speed
of int kernels.

With ``hadamard=n`` the inputs are first rotated online by the orthonormal Hadamard matrix
``H`` of order ``n`` (QuaRot's online Hadamard before ``down_proj``/``o_proj``):
``x -> x @ H``, which spreads outlier channels before the quantizer sees them. The stored
kernel is then ``H.T @ W`` so the float product is unchanged (see
:func:`jaxcomp.quant.rotation_transform.rotate`).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf, factor_array
from jaxcomp.errors import JaxcompError
from jaxcomp.quant.rotation import apply_hadamard


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
    """A kernel applied to (optionally Hadamard-rotated, then) per-token fake-quantized inputs.

    With ``K`` the inner kernel and ``H`` the order-``hadamard`` Hadamard matrix (the identity
    when ``hadamard == 0``):

    * ``left_matmul(x) == quantize_tokens(x @ H, act_bits) @ K`` (no quantization when
      ``act_bits is None``);
    * reconstruction invariant ``W == materialize() == H @ K``: the matrix the float layer
      applies, so ``x @ materialize() == left_matmul(x)`` when ``act_bits is None``.

    Attributes:
      kernel: the inner ``(K, N)`` weights: an array or a compressed leaf (a ``QArray`` for
        W4A4/W8A8), the factor ``map_factors`` (the quantize transform, GPTQ) compresses.
      act_bits: input bits, 2..8, or ``None`` for float inputs (rotation only) (static).
      hadamard: order of the online Hadamard rotation of the inputs (``K``), or 0 for none
        (static).

    Example:
      >>> leaf = ActQuant(w, act_bits=4)  # W16A4 # doctest: +SKIP
      >>> y = leaf.left_matmul(x)  # doctest: +SKIP
    """

    kernel: Any
    act_bits: int | None = flax.struct.field(pytree_node=False, default=8)
    hadamard: int = flax.struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        if self.act_bits is not None and (not isinstance(self.act_bits, int)
                                          or not 2 <= self.act_bits <= 8):
            raise JaxcompError(f"act_bits must be in 2..8 or None, got {self.act_bits!r}")
        if not isinstance(self.hadamard, int) or self.hadamard < 0:
            raise JaxcompError(f"hadamard must be an order >= 1, or 0 for none, got "
                               f"{self.hadamard!r}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kernel.shape)

    @property
    def dtype(self) -> np.dtype:
        return jnp.dtype(self.kernel.dtype)

    def materialize(self) -> jax.Array:
        inner = factor_array(self.kernel, self.dtype)
        if not self.hadamard:
            return inner
        # H @ K == (K.T @ H.T).T
        return apply_hadamard(inner.T, self.hadamard, transpose=True).T

    def rotate_inputs(self, x: jax.Array) -> jax.Array:
        """``x @ H``: the inputs as the inner kernel's quantizer sees them (before it)."""
        return apply_hadamard(x, self.hadamard) if self.hadamard else x

    def left_matmul(self, x: jax.Array) -> jax.Array:
        from jaxcomp.core.dense import dense

        x = self.rotate_inputs(x)
        if self.act_bits is not None:
            x = quantize_tokens(x, self.act_bits)
        return dense(x, self.kernel)

    def map_factors(self, fn) -> ActQuant:
        return self.replace(kernel=fn(self.kernel, "kernel"))

    def input_gram(self, gram: np.ndarray) -> np.ndarray:
        """The Gram matrix of the inputs the inner kernel sees, from that of ``x`` (before
        quantization: calibrated weight methods match the float activations).

        With an online Hadamard that is the Gram of ``x @ H``: ``H.T @ gram @ H``.

        Example:
          >>> g_inner = leaf.input_gram(stats.gram)  # GPTQ's Gram for leaf.kernel # doctest: +SKIP
        """
        if not self.hadamard:
            return gram
        gram = np.asarray(gram, np.float64)
        # (G @ H).T @ H == H.T @ G.T @ H == H.T @ G @ H for a symmetric G; transposing the
        # result keeps it exact for any G.
        return apply_hadamard(apply_hadamard(gram, self.hadamard).T, self.hadamard).T
