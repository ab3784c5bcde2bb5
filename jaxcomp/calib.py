"""Calibration statistics: what the inputs of each linear layer look like on real text.

One pass of the model over calibration windows with the ``calib`` collection mutable makes every
:class:`jaxcomp.models.layers.Linear` sow the Gram matrix ``X^T X`` of its inputs; this module
sums them over batches (in float64) and keys them by the kernel's param path. ASVD uses their
diagonals (per-channel RMS), sensitivity profiles the whole matrix: for any replacement ``W'``,
``||X W - X W'||_F^2 = tr((W - W')^T G (W - W'))``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.core.rules import path_str


@dataclasses.dataclass(frozen=True)
class InputStats:
    """Statistics of one linear layer's inputs ``X`` (``count`` rows of ``in_features``).

    Attributes:
      gram: ``(in_features, in_features)`` float64 ``X^T X``.
      count: number of rows (tokens) summed.
    """

    gram: np.ndarray
    count: int

    def channel_rms(self) -> np.ndarray:
        """Root-mean-square of each input channel."""
        return np.sqrt(np.maximum(np.diag(self.gram), 0.0) / max(self.count, 1))

    def output_error(self, w, w_hat) -> float:
        """Relative output error ``||X (W - W')||_F / ||X W||_F`` on these inputs."""
        w = np.asarray(w, np.float64)
        diff = w - np.asarray(w_hat, np.float64)
        num = np.sum(diff * (self.gram @ diff))  # tr(D^T G D) as a matmul (BLAS), not einsum
        den = np.sum(w * (self.gram @ w))
        return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


@functools.partial(jax.jit, static_argnames=("model",))
def _sown_grams(model, params, batch):
    _, sown = model.apply({"params": params}, batch, mutable=["calib"])
    return sown["calib"]


def collect_input_stats(model, params, windows, batch_size: int = 8,
                        progress: bool = True) -> dict[str, InputStats]:
    """Runs ``model`` over calibration windows and returns every linear layer's input stats.

    Args:
      model: a Flax module from :func:`jaxcomp.models.build_model`.
      params: its params (plain or compressed: stats describe *these* params' activations).
      windows: ``(n, seq_len)`` int tokens, e.g. from :func:`jaxcomp.data.sample_calibration`.
      batch_size: windows per forward pass.
      progress: progress bar.

    Returns:
      ``{"layers_0/self_attn/q_proj/kernel": InputStats, ...}``.

    Example:
      >>> stats = collect_input_stats(model, params, calib_windows)  # doctest: +SKIP
    """
    windows = np.asarray(windows, np.int32)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for i in tqdm(range(0, len(windows), batch_size), desc="calibration", disable=not progress,
                  leave=False):
        batch = windows[i:i + batch_size]
        sown = _sown_grams(model, params, jnp.asarray(batch))
        for keypath, gram in jax.tree_util.tree_flatten_with_path(sown)[0]:
            # keypath: (..., "q_proj", "gram", 0) -> the kernel beside it
            path = path_str(keypath[:-2]) + "/kernel"
            sums[path] = sums.get(path, 0.0) + np.asarray(gram, np.float64)
        count += batch.size
    return {p: InputStats(g, count) for p, g in sums.items()}
