"""The one switch between the XLA dequantize path and the Pallas kernels.

``JAXCOMP_MATMUL`` (environment) or :func:`use_matmul_impl` (context manager) picks:

* ``auto`` (default): the Pallas kernel on GPU/TPU where the format and shape are supported,
  XLA elsewhere (on CPU always XLA: Pallas only interprets there, slower than XLA);
* ``xla``: always the XLA dequantize-then-matmul path;
* ``pallas``: the kernel wherever supported, in interpret mode on CPU (tests, debugging).

The choice is read at trace time. jit caches traces by function, not by this switch, so
:func:`use_matmul_impl` clears jax's caches when it is entered and left: code inside the block
is traced afresh with the chosen path (switching is for tests and benchmarks, not hot loops).
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import jax

IMPLS = ("auto", "xla", "pallas")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("matmul_impl",
                                                                      default=None)


def matmul_impl() -> str:
    impl = _override.get() or os.environ.get("JAXCOMP_MATMUL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"JAXCOMP_MATMUL must be one of {IMPLS}, got {impl!r}")
    return impl


@contextlib.contextmanager
def use_matmul_impl(impl: str):
    """Forces ``impl`` (``auto``, ``xla`` or ``pallas``) inside the ``with`` block.

    Example:
      >>> with use_matmul_impl("xla"):
      ...     y = jax.jit(forward)(params, tokens)  # doctest: +SKIP
    """
    if impl not in IMPLS:
        raise ValueError(f"matmul impl must be one of {IMPLS}, got {impl!r}")
    token = _override.set(impl)
    jax.clear_caches()
    try:
        yield
    finally:
        _override.reset(token)
        jax.clear_caches()


def kernel_backend() -> str | None:
    """The Pallas backend to use now, or ``None`` for the XLA path."""
    impl = matmul_impl()
    if impl == "xla":
        return None
    platform = jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "interpret" if impl == "pallas" else None
