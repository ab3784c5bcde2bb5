"""The protocol every compressed parameter leaf follows.

A compressed leaf is an immutable pytree dataclass (``flax.struct.dataclass``) that stands in
for a 2-D weight matrix ``W`` of shape ``(in_features, out_features)`` (Flax's kernel layout,
``y = x @ W``). Each leaf documents its reconstruction invariant ``W ≈ leaf.materialize()``.
"""

from __future__ import annotations

import abc

import jax
import numpy as np


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
