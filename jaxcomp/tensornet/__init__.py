"""Tensor-network and low-rank factorizations of weight matrices (CompactifAI, TQCompressor).

Leaves: :class:`TTMatrix` (tensor train / MPO), :class:`KronMatrix` (permuted Kronecker sum),
:class:`LowRank` (SVD, activation-aware SVD). Transforms registered by name: ``tt``, ``kron``,
``svd``, ``asvd``.
"""

from jaxcomp.tensornet.kron import KronMatrix, kron_factorize, nearest_kron_sum
from jaxcomp.tensornet.lowrank import LowRank, low_rank, svd_factors
from jaxcomp.tensornet.sensitivity import Profile, allocate
from jaxcomp.tensornet.transform import (
    METHODS,
    asvd_transform,
    factorize,
    kron_transform,
    non_embedding_params,
    non_embedding_size,
    svd_transform,
    tt_transform,
)
from jaxcomp.tensornet.tt import TTMatrix, balanced_factors, tt_matrix, tt_svd, tt_to_matrix

__all__ = ["METHODS", "KronMatrix", "LowRank", "Profile", "TTMatrix", "allocate",
           "asvd_transform", "balanced_factors", "factorize", "kron_factorize",
           "kron_transform", "low_rank", "nearest_kron_sum", "non_embedding_params",
           "non_embedding_size",
           "svd_factors", "svd_transform", "tt_matrix", "tt_svd", "tt_to_matrix",
           "tt_transform"]
