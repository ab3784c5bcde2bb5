"""Token streams, calibration windows and evaluation windows."""

from __future__ import annotations

import numpy as np

from jaxcomp.data.corpora import load_corpus
from jaxcomp.errors import JaxcompError


def tokenize_documents(tokenizer, docs, add_bos: bool = False) -> np.ndarray:
    """One int32 token stream from documents joined by blank lines (GPTQ/LLMC convention).

    Each document is tokenized on its own (with ``"\\n\\n"`` appended to all but the last), so
    huge corpora never become one giant string; the result is deterministic.

    Args:
      tokenizer: a Hugging Face tokenizer (``tokenizer(text, add_special_tokens=False)``).
      docs: documents, in order.
      add_bos: put the tokenizer's BOS token once at the start of the stream.

    Returns:
      1-D int32 array of token ids.

    Example:
      >>> tokenize_documents(tok, ["first doc", "second doc"]).shape  # doctest: +SKIP
    """
    docs = list(docs)
    ids: list[int] = []
    if add_bos and getattr(tokenizer, "bos_token_id", None) is not None:
        ids.append(tokenizer.bos_token_id)
    for i, doc in enumerate(docs):
        text = doc + ("\n\n" if i < len(docs) - 1 else "")
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return np.asarray(ids, np.int32)


def eval_tokens(tokenizer, corpus: str) -> np.ndarray:
    """Token stream of a corpus's ``eval`` part."""
    return tokenize_documents(tokenizer, load_corpus(corpus).eval)


def calib_tokens(tokenizer, corpus: str) -> np.ndarray:
    """Token stream of a corpus's ``calib`` part."""
    return tokenize_documents(tokenizer, load_corpus(corpus).calib)


def sample_calibration(tokens: np.ndarray, num_samples: int, seq_len: int,
                       seed: int = 0) -> np.ndarray:
    """``num_samples`` random windows of ``seq_len`` tokens (GPTQ's calibration sampling).

    Args:
      tokens: 1-D token stream (e.g. :func:`calib_tokens`).
      num_samples: number of windows (>= 1).
      seq_len: window length (>= 2).
      seed: the same seed gives the same windows.

    Returns:
      (num_samples, seq_len) int32 array.

    Example:
      >>> sample_calibration(np.arange(1000), 4, 128, seed=0).shape
      (4, 128)
    """
    if num_samples < 1:
        raise JaxcompError(f"calib.num_samples must be >= 1, got {num_samples}")
    if seq_len < 2:
        raise JaxcompError(f"calib.seq_len must be >= 2, got {seq_len}")
    tokens = np.asarray(tokens, np.int32)
    if len(tokens) < seq_len + 1:
        raise JaxcompError(f"calibration corpus has {len(tokens)} tokens, fewer than "
                           f"calib.seq_len + 1 = {seq_len + 1}")
    if num_samples * seq_len > len(tokens):
        raise JaxcompError(f"calibration corpus has {len(tokens):,} tokens, fewer than "
                           f"calib.num_samples x calib.seq_len = {num_samples * seq_len:,}; "
                           "lower calib.num_samples or use a larger calib.corpus")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq_len, size=num_samples)
    return np.stack([tokens[s:s + seq_len] for s in starts])


def eval_windows(tokens: np.ndarray, seq_len: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows in order; the remainder is dropped (GPTQ convention).

    Args:
      tokens: 1-D token stream.
      seq_len: window length (>= 2).
      max_tokens: keep at most this many tokens (whole windows); ``None`` or 0 keeps all.

    Returns:
      (n_windows, seq_len) int32 array.

    Example:
      >>> eval_windows(np.arange(1000), 128, max_tokens=512).shape
      (4, 128)
    """
    if seq_len < 2:
        raise JaxcompError(f"eval.seq_len must be >= 2, got {seq_len}")
    tokens = np.asarray(tokens, np.int32)
    n = len(tokens) // seq_len
    if max_tokens:
        n = min(n, max_tokens // seq_len)
    if n == 0:
        raise JaxcompError(f"no evaluation window: {len(tokens)} tokens, seq_len {seq_len}, "
                           f"max_tokens {max_tokens or 'unlimited'}")
    return tokens[: n * seq_len].reshape(n, seq_len)
