"""Corpora by name, tokenization, calibration sampling and evaluation windows."""

from jaxcomp.data.corpora import CORPORA, Corpus, load_corpus
from jaxcomp.data.tokens import (
    calib_tokens,
    eval_tokens,
    eval_windows,
    sample_calibration,
    tokenize_documents,
)

__all__ = ["CORPORA", "Corpus", "calib_tokens", "eval_tokens", "eval_windows", "load_corpus",
           "sample_calibration", "tokenize_documents"]
