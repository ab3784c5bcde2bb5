"""The one dense-matmul dispatch point every linear layer of every model calls."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.core.leaf import CompressedLeaf


def dense(x: jax.Array, kernel, bias: jax.Array | None = None) -> jax.Array:
    """Computes ``x @ kernel (+ bias)`` for a plain array or any compressed leaf.

    Args:
      x: activations of shape ``(..., in_features)``; their dtype is the compute dtype.
      kernel: a ``(in_features, out_features)`` array, or a :class:`CompressedLeaf`.
      bias: optional ``(out_features,)`` array.

    Returns:
      ``(..., out_features)`` array in ``x``'s dtype.

    Example:
      >>> dense(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
      (2, 4)
    """
    if isinstance(kernel, CompressedLeaf):
        y = kernel.left_matmul(x)
    elif isinstance(kernel, (jax.Array, np.ndarray)):
        y = jnp.matmul(x, kernel.astype(x.dtype))
    else:
        raise TypeError(f"dense() got an unsupported kernel of type {type(kernel).__name__}")
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(x.dtype)
