"""jaxcomp: make large language models small and keep them good (JAX/Flax)."""

__version__ = "0.1.0"
