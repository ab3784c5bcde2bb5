"""Perplexity over non-overlapping windows (the GPTQ/LLMC convention), batched and jitted."""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.models import decoder_parts


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll / tokens)`` over ``tokens`` predicted tokens (seq_len - 1 per window)."""

    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """Input tokens processed per second (all ``windows * seq_len`` of them)."""
        return self.windows * self.seq_len / max(self.seconds, 1e-9)


# LM-head rows per step: a batch of 8 x 512 SmolLM2 logits (vocabulary 49,152) would be 805 MB,
# twice over with the log-softmax; 1,024 rows of them are 201 MB.
HEAD_ROWS = 1024


def head_nll(head, params, hidden, tokens, weight, rows: int = HEAD_ROWS):
    """Summed negative log-likelihood of next tokens, the LM head applied ``rows`` positions
    at a time (``lax.map``), so no array as big as a batch's logits is ever alive.

    Args:
      head: ``head(params, x) -> logits`` (:attr:`jaxcomp.models.DecoderParts.head`).
      params: the model params the head reads.
      hidden: ``(B, T, hidden)`` residual stream after the last block.
      tokens: ``(B, T)`` the windows; position ``t`` predicts ``tokens[:, t + 1]``.
      weight: ``(B,)`` per-window weight (0 masks a padding window).
      rows: positions per head application.

    Returns:
      ``sum_b weight_b * sum_t -log p(tokens[b, t + 1] | hidden[b, t])`` as a float32 scalar.
    """
    b, t, h = hidden.shape
    x = hidden[:, :-1].reshape(b * (t - 1), h)
    targets = tokens[:, 1:].reshape(-1)
    w = jnp.repeat(weight.astype(jnp.float32), t - 1)
    rows = max(1, min(rows, x.shape[0]))
    pad = -x.shape[0] % rows  # padded rows get weight 0
    x, targets, w = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, targets, w))

    def chunk(args):
        xc, yc, wc = args
        logits = head(params, xc[None])[0].astype(jnp.float32)
        picked = jnp.take_along_axis(logits, yc[:, None], axis=-1)[:, 0]
        return jnp.sum((jax.nn.logsumexp(logits, axis=-1) - picked) * wc)

    parts = (x.reshape(-1, rows, h), targets.reshape(-1, rows), w.reshape(-1, rows))
    return jnp.sum(jax.lax.map(chunk, parts))


@functools.partial(jax.jit, static_argnames=("model",))
def _batch_nll(model, params, batch, weight):
    hidden = model.apply({"params": params}, batch, hidden=True)
    return head_nll(decoder_parts(model).head, params, hidden, batch, weight)


def perplexity(model, params, windows: np.ndarray, batch_size: int = 8,
               progress: bool = True, desc: str = "eval") -> PerplexityResult:
    """Perplexity of ``model`` on token windows, each scored on its own.

    Args:
      model: a Flax module from :func:`jaxcomp.models.build_model`.
      params: its params (plain or compressed leaves).
      windows: (n, seq_len) int tokens, e.g. from :func:`jaxcomp.data.eval_windows`.
      batch_size: windows per forward pass (the last batch is padded and masked, so every
        batch has one shape and compiles once).
      progress: show a progress bar with tokens/s.
      desc: progress bar label.

    Returns:
      A :class:`PerplexityResult`.

    Example:
      >>> r = perplexity(model, params, windows, batch_size=8)  # doctest: +SKIP
      >>> r.ppl
    """
    windows = np.asarray(windows, np.int32)
    n, seq_len = windows.shape
    batch_size = max(1, min(batch_size, n))
    if not isinstance(params, dict):  # a streamed checkpoint: one block in memory at a time
        return _streamed_perplexity(model, params, windows, batch_size, progress, desc)
    total = 0.0
    start = time.perf_counter()
    bar = tqdm(total=n * seq_len, desc=desc, unit="tok", unit_scale=True, disable=not progress,
               leave=False)
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size]
        weight = np.ones(batch_size, np.float32)
        if len(batch) < batch_size:
            weight[len(batch):] = 0.0
            batch = np.concatenate([batch, np.zeros((batch_size - len(batch), seq_len),
                                                    np.int32)])
        total += float(_batch_nll(model, params, jnp.asarray(batch), jnp.asarray(weight)))
        bar.update(int(weight.sum()) * seq_len)
    bar.close()
    seconds = time.perf_counter() - start
    tokens = n * (seq_len - 1)
    return PerplexityResult(math.exp(total / tokens), total, tokens, n, seq_len, seconds)


def _streamed_perplexity(model, params, windows, batch_size, progress, desc):
    """Perplexity computed block by block over all windows at once: each block of a
    :class:`jaxcomp.models.hf.StreamedParams` is read, applied to every window, released."""
    parts = decoder_parts(model)
    n, seq_len = windows.shape
    start = time.perf_counter()
    top = {k: params[k] for k in params if not k.startswith(parts.prefix + "_")}
    positions = jnp.broadcast_to(jnp.arange(seq_len), (batch_size, seq_len))
    block = jax.jit(lambda bp, x: parts.block.apply({"params": bp}, x,
                                                    positions[:x.shape[0]])[0])
    batches = range(0, n, batch_size)
    x = [parts.embed(top, jnp.asarray(windows[i:i + batch_size])) for i in batches]
    for i in tqdm(range(model.cfg.num_layers), desc=f"{desc} (streamed)", disable=not progress,
                  leave=False):
        bp = params[f"{parts.prefix}_{i}"]
        x = [block(bp, xb) for xb in x]

    nll = jax.jit(functools.partial(head_nll, parts.head))
    total = 0.0
    for xb, i in zip(x, batches, strict=True):
        tokens = jnp.asarray(windows[i:i + batch_size])
        total += float(nll(top, xb, tokens, jnp.ones(len(tokens))))
    seconds = time.perf_counter() - start
    tokens = n * (seq_len - 1)
    return PerplexityResult(math.exp(total / tokens), total, tokens, n, seq_len, seconds)
