"""The protocol every compressed parameter leaf follows.

A compressed leaf is an immutable pytree dataclass (``flax.struct.dataclass``) that stands in
for a 2-D weight matrix ``W`` of shape ``(in_features, out_features)`` (Flax's kernel layout,
``y = x @ W``). Each leaf documents its reconstruction invariant ``W ≈ leaf.materialize()``.
"""

from __future__ import annotations

import abc

import jax
import numpy as np

from jaxcomp.errors import JaxcompError


class CompressedLeaf(abc.ABC):
    """Base class of compressed weight matrices (``QArray``, ``TTMatrix``, ...).

    Subclasses are ``flax.struct.dataclass`` types; their array fields are pytree children,
    their format description is static metadata.
    """

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the matrix this leaf reconstructs."""

    @property
    @abc.abstractmethod
    def dtype(self) -> np.dtype:
        """Dtype of the reconstructed matrix."""

    @abc.abstractmethod
    def materialize(self) -> jax.Array:
        """Builds the dense matrix ``W`` (for checks and export; avoid it in the forward)."""

    def left_matmul(self, x: jax.Array) -> jax.Array:
        """Returns ``x @ W`` for ``x`` of shape ``(..., in_features)``.

        Subclasses override this where a cheaper contraction exists.
        """
        return x @ self.materialize().astype(x.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored fields (codes, scales, cores, ...)."""
        return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                   for a in jax.tree_util.tree_leaves(self))

    @property
    def num_params(self) -> int:
        """Scalars actually stored (a packed byte of two int4 codes counts as two)."""
        return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(self))

    def map_factors(self, fn) -> CompressedLeaf:
        """A copy with ``fn(matrix, name)`` applied to each 2-D factor (TT cores, low-rank
        factors); how the quantize transform compresses a factorized leaf further."""
        raise JaxcompError(f"{type(self).__name__} has no factor matrices to transform")


def factor_array(factor, dtype) -> jax.Array:
    """A factor as a plain array in ``dtype``, dequantizing a compressed one."""
    if isinstance(factor, CompressedLeaf):
        return factor.materialize().astype(dtype)
    return jax.numpy.asarray(factor).astype(dtype)


def factor_num_params(factor) -> int:
    """Parameters a (possibly compressed) factor stands for."""
    if isinstance(factor, CompressedLeaf):
        return factor.num_params
    return int(np.prod(np.shape(factor)))
