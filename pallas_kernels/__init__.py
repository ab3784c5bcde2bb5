"""Pallas kernels, one folder per op: ``kernel.py`` (the kernel), ``ops.py`` (jit wrapper,
dispatch and VJP), ``reference.py`` (float64 reference)."""
