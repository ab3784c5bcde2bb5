"""Evaluation: perplexity and size accounting."""

from jaxcomp.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
