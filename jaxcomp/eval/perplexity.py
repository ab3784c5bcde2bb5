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


@functools.partial(jax.jit, static_argnames=("model",))
def _batch_nll(model, params, batch, weight):
    logits = model.apply({"params": params}, batch)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll.sum(axis=1) * weight)


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
    from jaxcomp.models import decoder_parts

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

    @jax.jit
    def nll(top, xb, tokens):
        logp = jax.nn.log_softmax(parts.head(top, xb)[:, :-1], axis=-1)
        return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    total = sum(float(nll(top, xb, jnp.asarray(windows[i:i + batch_size])))
                for xb, i in zip(x, batches, strict=True))
    seconds = time.perf_counter() - start
    tokens = n * (seq_len - 1)
    return PerplexityResult(math.exp(total / tokens), total, tokens, n, seq_len, seconds)
