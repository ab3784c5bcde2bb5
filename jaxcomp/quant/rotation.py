"""Hadamard rotations (QuaRot): construction and fast application, on plain arrays.

An orthonormal Hadamard-type matrix ``H`` of order ``n`` (``H @ H.T == I``, every entry
``±1/sqrt(n)``) is built as a Kronecker product of small factors:

* Sylvester factors of order ``2^k``;
* Paley (type I) factors of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``: 4, 8, 12, 20, 24,
  32, 44, 48, 60, 68, 72, 80, 84, 104, 108, 128, 132, 140, ... (at most :data:`MAX_PALEY`).

So ``576 = 12·12·4`` and ``1536 = 12·128`` are true Hadamard orders. When no such product has
order ``n`` (``n`` odd, ``n = 2·odd``, or e.g. ``11008 = 43·256`` whose only Paley route needs a
5504-order factor), ``H`` is **block-diagonal**: ``n/m`` copies of the Hadamard matrix of ``m``,
the largest constructible divisor of ``n``. It is still orthogonal, but mixes only within each
block of ``m`` consecutive channels (for odd ``n``, ``m = 1``: the identity).

``x @ H`` is computed factor by factor (``n · Σ factor sizes`` multiply-adds per row, not
``n²``), never by building ``H``. The Paley factors are not symmetric, so ``H.T != H`` in
general; :func:`apply_hadamard` takes ``transpose=`` for ``x @ H.T``.

NumPy inputs are computed in float64 (weights are rotated offline at full precision), JAX
inputs in at least float32 at the highest matmul precision (online rotation of activations).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcomp.errors import JaxcompError

# Largest Paley factor used: a larger one would make the "fast" product cost close to a dense
# n x n matmul (and its constant would be large).
MAX_PALEY = 512
# Sylvester orders above this are split into several factors (each a small matmul).
MAX_SYLVESTER = 128


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _is_paley_order(p: int) -> bool:
    return p % 4 == 0 and _is_prime(p - 1) and (p - 1) % 4 == 3


@functools.cache
def _plan(n: int) -> tuple[int, tuple[int, ...]]:
    """``(blocks, factors)``: ``n == blocks · prod(factors)``; every factor a Hadamard order.

    Maximizes ``prod(factors)`` (so ``blocks`` is 1 whenever ``n`` is constructible), then
    minimizes ``sum(factors)`` (the cost of applying them).
    """
    best: tuple[int, int, tuple[int, ...]] | None = None  # (-product, cost, paley factors)

    def search(rest: int, chosen: tuple[int, ...], start: int):
        nonlocal best
        product = math.prod(chosen) * (rest & -rest)  # Paley factors times the powers of two
        key = (-product, sum(chosen), tuple(sorted(chosen)))
        if best is None or key < best:
            best = key
        for p in range(start, min(rest, MAX_PALEY) + 1, 4):
            # A Paley factor of a power-of-two order is no better than a Sylvester one.
            if rest % p == 0 and p & (p - 1) and _is_paley_order(p):
                search(rest // p, chosen + (p,), p)

    search(n, (), 12)
    paley = best[2]
    two_part = n // math.prod(paley)
    two_part &= -two_part  # the power of two left for Sylvester factors
    k = two_part.bit_length() - 1
    chunks = -(-k // (MAX_SYLVESTER.bit_length() - 1)) if k else 0
    sylvester = tuple(2 ** (k // chunks + (i < k % chunks)) for i in range(chunks))
    factors = tuple(sorted(paley)) + sylvester
    return n // math.prod(factors), factors


@functools.cache
def _factor(p: int) -> np.ndarray:
    """The unnormalized ±1 Hadamard matrix of order ``p`` (Sylvester or Paley I), read-only."""
    if p & (p - 1) == 0:
        h = np.ones((1, 1))
        while h.shape[0] < p:
            h = np.block([[h, h], [h, -h]])
    else:
        q = p - 1
        residues = np.zeros(q, bool)
        residues[(np.arange(1, q) ** 2) % q] = True
        chi = np.where(residues, 1.0, -1.0)
        chi[0] = 0.0
        idx = np.arange(q)
        jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # skew-symmetric for q ≡ 3 mod 4
        s = np.zeros((p, p))
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = jacobsthal
        h = np.eye(p) + s
    h.setflags(write=False)
    return h


def hadamard_factors(n: int) -> tuple[int, tuple[int, ...]]:
    """How the order-``n`` Hadamard matrix is built: ``(blocks, factor orders)``.

    Args:
      n: matrix order, >= 1.

    Returns:
      ``(blocks, factors)`` with ``n == blocks * prod(factors)``: ``H = I_blocks ⊗ H_f1 ⊗ ...``
      (``blocks == 1`` when ``n`` is a constructible Hadamard order).

    Example:
      >>> hadamard_factors(576), hadamard_factors(1536), hadamard_factors(11008)
      ((1, (12, 12, 4)), (1, (12, 128)), (43, (16, 16)))
    """
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise JaxcompError(f"Hadamard order must be a positive integer, got {n!r}")
    return _plan(int(n))


def hadamard_matrix(n: int) -> np.ndarray:
    """The orthonormal ``(n, n)`` Hadamard-type matrix (entries ``±1/sqrt(m)``).

    Sylvester/Paley Kronecker products where ``n`` allows, else block-diagonal over the largest
    constructible divisor ``m`` of ``n`` (see the module docstring). Always ``H @ H.T == I``.

    Args:
      n: order.

    Returns:
      ``(n, n)`` float64 NumPy array.

    Example:
      >>> h = hadamard_matrix(12)
      >>> np.allclose(h @ h.T, np.eye(12))
      True
    """
    blocks, factors = hadamard_factors(n)
    h = np.eye(blocks)
    for p in factors:
        h = np.kron(h, _factor(p) / math.sqrt(p))
    return h


def hadamard_signs(n: int, seed: int) -> np.ndarray:
    """The random ``±1`` vector ``s`` of :func:`random_hadamard` (float64, ``(n,)``)."""
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """QuaRot's randomized Hadamard matrix ``Q = diag(s) @ H`` with random signs ``s``.

    The signs flip input channels before mixing (``x @ Q = (x * s) @ H``), so a fixed outlier
    pattern does not line up with one Hadamard row. ``Q`` is orthogonal.

    Args:
      n: order.
      seed: seed of the signs (NumPy ``default_rng``).

    Returns:
      ``(n, n)`` float64 NumPy array.

    Example:
      >>> q = random_hadamard(576, seed=0)
      >>> np.allclose(q.T @ q, np.eye(576))
      True
    """
    return hadamard_signs(n, seed)[:, None] * hadamard_matrix(n)


def apply_hadamard(x, n: int | None = None, *, transpose: bool = False):
    """``x @ H`` (or ``x @ H.T``) over the last axis, factor by factor.

    Args:
      x: ``(..., n)`` NumPy or JAX array.
      n: the order; defaults to ``x.shape[-1]`` (given, it must match).
      transpose: compute ``x @ H.T`` (the inverse rotation) instead.

    Returns:
      An array of ``x``'s shape, type and dtype (NumPy: computed in float64; JAX: in at least
      float32 at the highest precision).

    Example:
      >>> x = np.random.default_rng(0).normal(size=(3, 1536))
      >>> np.allclose(apply_hadamard(x), x @ hadamard_matrix(1536))
      True
    """
    size = x.shape[-1]
    n = size if n is None else n
    if size != n:
        raise JaxcompError(f"apply_hadamard: last axis has {size} entries, expected {n}")
    blocks, factors = hadamard_factors(n)
    is_numpy = isinstance(x, np.ndarray)
    compute = np.float64 if is_numpy else jnp.promote_types(x.dtype, jnp.float32)
    lead = x.shape[:-1]
    y = x.astype(compute).reshape(-1, blocks, *factors)
    for axis, p in enumerate(factors, start=2):
        f = _factor(p)
        f = (f.T if transpose else f) / math.sqrt(p)
        # Contract axis `axis` of y with the factor's rows; the new axis lands last, moved back.
        if is_numpy:
            y = np.moveaxis(np.tensordot(y, f, axes=([axis], [0])), -1, axis)
        else:
            y = jnp.moveaxis(jnp.tensordot(y, jnp.asarray(f, compute), axes=([axis], [0]),
                                           precision=jax.lax.Precision.HIGHEST), -1, axis)
    return y.reshape(*lead, n).astype(x.dtype)
