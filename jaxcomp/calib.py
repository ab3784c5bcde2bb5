"""Calibration: what the inputs of each linear layer look like on real text.

Two ways to get there:

* :func:`collect_input_stats`: one pass of the whole model (the tensor-network transforms).
* :func:`run_blocks`, the block-sequential pass of GPTQ/AWQ/SmoothQuant/clipping (LLMC style):
  for each decoder block in order, collect its linear layers' statistics from the activations
  the *already transformed* upstream blocks produce, transform the block, then push the
  activations through the transformed block. Only one block's params and the calibration
  activations are live at a time, so a lazily loaded checkpoint streams through.

Every :class:`jaxcomp.models.layers.Linear` sows, when the ``calib`` collection is mutable, the
Gram matrix ``X^T X`` of its inputs and their per-channel absolute maximum. Sums are kept in
float64. For any replacement ``W'``: ``||X W - X W'||_F^2 = tr((W - W')^T G (W - W'))``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxcomp.core.rules import (
    check_rule_args,
    leaves_by_path,
    make_rules,
    path_str,
    replace_leaves,
    select,
)
from jaxcomp.errors import JaxcompError


@dataclasses.dataclass(frozen=True)
class InputStats:
    """Statistics of one linear layer's inputs ``X`` (``count`` rows of ``in_features``).

    Attributes:
      gram: ``(in_features, in_features)`` float64 ``X^T X``.
      count: number of rows (tokens) summed.
      absmax: ``(in_features,)`` per-channel ``max |X|`` (SmoothQuant), when collected.
      head_grams: LLaMA ``v_proj`` only: ``(kv_heads, in, in)`` Gram matrices of the
        attention-mixed inputs ``A_h X`` per kv head, whose output error is what a value error
        costs after attention (GPTQ uses them: the first token is an attention sink).
    """

    gram: np.ndarray
    count: int
    absmax: np.ndarray | None = None
    head_grams: np.ndarray | None = None

    def channel_rms(self) -> np.ndarray:
        """Root-mean-square of each input channel."""
        return np.sqrt(np.maximum(np.diag(self.gram), 0.0) / max(self.count, 1))

    def output_error(self, w, w_hat) -> float:
        """Relative output error ``||X (W - W')||_F / ||X W||_F`` on these inputs."""
        return relative_output_error(self.gram, w, w_hat)


def relative_output_error(gram, w, w_hat, chunk: int = 1024) -> float:
    """``||X (W - W')||_F / ||X W||_F`` from ``gram = X^T X``, for ``(K, N)`` kernels.

    ``tr(D^T G D)`` as BLAS matmuls over ``chunk`` output columns at a time, so the float64
    temporaries stay ``K x chunk`` (a full ``G @ W`` is 360 MB for LLaMA-2-7B's down_proj).
    """
    gram = np.asarray(gram, np.float64)
    num = den = 0.0
    for j in range(0, np.shape(w)[1], chunk):
        wc = np.asarray(w[:, j:j + chunk], np.float64)
        dc = wc - np.asarray(w_hat[:, j:j + chunk], np.float64)
        num += float(np.sum(dc * (gram @ dc)))
        den += float(np.sum(wc * (gram @ wc)))
    return float(np.sqrt(max(num, 0.0) / den)) if den > 0 else 0.0


def _accumulate(sums: dict, sown) -> None:
    """Adds one batch's sown ``gram``/``absmax``/``head_grams`` into ``sums[kernel path]``.

    Sums are float64 and updated in place. Layers fed the same input (q/k/v, gate/up: equal
    statistics on the first batch) share one sum array: at LLaMA-2-7B that saves three of
    seven 4096^2 float64 Grams per block and their additions.
    """
    batch: dict[str, dict] = {}
    for keypath, value in jax.tree_util.tree_flatten_with_path(sown)[0]:
        # keypath: (..., "q_proj", "gram", 0) -> the kernel beside it; an attention module's
        # (..., "self_attn", "v_proj_head_grams", 0) -> its v_proj kernel
        kind = path_str(keypath[-2:-1])
        if kind == "v_proj_head_grams":
            path, kind = path_str(keypath[:-2]) + "/v_proj/kernel", "head_grams"
        else:
            path = path_str(keypath[:-2]) + "/kernel"
        batch.setdefault(path, {})[kind] = np.asarray(value)  # no copy on the CPU
    updated: set[int] = set()
    for path, new in batch.items():
        entry = sums.get(path)
        if entry is None:
            # first batch: a layer created from this batch with the same input is the twin
            twin = next((p for p in sums if p in batch and "gram" in batch[p]
                         and _same_input(batch[p], new)), None) if "gram" in new else None
            entry = sums[path] = {k: v for k, v in sums[twin].items()
                                  if k in ("gram", "absmax")} if twin else {}
        for kind, value in new.items():
            if kind not in entry:
                entry[kind] = np.array(value, np.float64)
            elif id(entry[kind]) not in updated:  # a shared sum is added to once
                (np.maximum if kind == "absmax" else np.add)(entry[kind], value, out=entry[kind])
            updated.add(id(entry[kind]))


def _same_input(a: dict, b: dict) -> bool:
    return (a["gram"].shape == b["gram"].shape and np.array_equal(a.get("absmax"), b.get("absmax"))
            and np.array_equal(a["gram"], b["gram"]))


def _finish(sums: dict, count: int) -> dict[str, InputStats]:
    return {p: InputStats(e["gram"], count, e.get("absmax"), e.get("head_grams"))
            for p, e in sums.items()}


@functools.partial(jax.jit, static_argnames=("model",))
def _sown_stats(model, params, batch):
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
    sums: dict[str, dict] = {}
    for i in tqdm(range(0, len(windows), batch_size), desc="calibration", disable=not progress,
                  leave=False):
        _accumulate(sums, _sown_stats(model, params, jnp.asarray(windows[i:i + batch_size])))
    return _finish(sums, windows.size)


def fisher_diagonal(model, params, windows, paths, progress: bool = True
                    ) -> dict[str, np.ndarray]:
    """Diagonal empirical Fisher of the next-token loss for the plain matrices at ``paths``.

    ``F = mean_n (dL_n/dW)^2`` over the calibration windows, ``L_n`` a window's mean
    cross-entropy on its own next tokens. At a trained model (gradient ~ 0, Hessian ~ Fisher)
    ``0.5 * sum(F * (W - W')^2)`` is the second-order estimate of how much replacing ``W`` by
    ``W'`` raises the loss, up to one factor all matrices share (a window's gradient averages
    its tokens'): the loss-based sensitivity, and it adds up over matrices.

    Args:
      model: a Flax module from :func:`jaxcomp.models.build_model`.
      params: its params (compressed leaves elsewhere are fine; ``paths`` must be arrays).
      windows: ``(n, seq_len)`` int tokens; one backward pass each.
      paths: "/"-joined paths of the matrices.
      progress: progress bar.

    Returns:
      path -> float32 array of the matrix's shape.
    """
    leaves = leaves_by_path(params)
    chosen = {p: leaves[p] for p in paths}

    def loss(sel, everything, tokens):
        merged = replace_leaves(everything, sel)
        logits = model.apply({"params": merged}, tokens[None, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tokens[None, 1:, None], axis=-1).mean()

    @functools.partial(jax.jit, donate_argnums=0)
    def add(acc, sel, everything, tokens):
        grads = jax.grad(loss)(sel, everything, tokens)
        return jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), acc, grads)

    windows = np.asarray(windows, np.int32)
    acc = {p: jnp.zeros(w.shape, jnp.float32) for p, w in chosen.items()}
    for tokens in tqdm(windows, desc="fisher", disable=not progress, leave=False):
        acc = add(acc, chosen, params, jnp.asarray(tokens))
    return {p: np.asarray(a) / len(windows) for p, a in acc.items()}


# --- block-sequential calibration -------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Calibration:
    """What a calibrated (block-sequential) transform runs on.

    Attributes:
      model: the Flax module (:func:`jaxcomp.models.build_model`) the params belong to.
      windows: ``(num_samples, seq_len)`` int calibration tokens.
      batch_size: windows per forward pass.
      progress: progress bar over blocks.
    """

    model: Any
    windows: np.ndarray
    batch_size: int = 8
    progress: bool = True


@dataclasses.dataclass
class BlockContext:
    """What a block step sees of decoder block ``index``.

    Attributes:
      index: block number.
      prefix: the block's key in the params (``"layers_3"``).
      cfg: the model config.
      inputs: ``(num_samples, seq_len, hidden)`` float32 activations entering the block,
        produced by the already transformed upstream blocks.
      params: the block params as handed to this step.
      block: the decoder block's Flax module (``block.apply({"params": p}, x, positions)``),
        for steps that differentiate through the block.
      run: ``run(block_params, x) -> y``: the block's forward over a batch of activations.
      collect: ``collect(block_params) -> stats`` of any block params on ``inputs``.
      stats: ``{"self_attn/q_proj/kernel": InputStats}`` (paths relative to the block) of
        ``params`` on ``inputs``; collected on first use.
    """

    index: int
    prefix: str
    cfg: Any
    inputs: jax.Array
    params: Any
    block: Any
    run: Callable[[Any, jax.Array], jax.Array]
    collect: Callable[[Any], dict[str, InputStats]]

    @functools.cached_property
    def stats(self) -> dict[str, InputStats]:
        return self.collect(self.params)


@dataclasses.dataclass(frozen=True)
class BlockStep:
    """One calibrated method applied inside the block-sequential pass.

    ``fn(block_params, ctx, selected, **args) -> block_params`` where ``selected`` maps the
    block-relative paths the rules chose to their merged arguments (``args`` updated by the
    selecting rule's ``args``).
    """

    fn: Callable[..., Any]
    rules: tuple
    defaults: Mapping[str, Any]
    desc: str
    head_grams: bool = False  # also collect v_proj's per-kv-head attention-mixed Grams


def _batches(x, batch_size):
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


def run_blocks(params, calib: Calibration, steps: tuple[BlockStep, ...]):
    """The block-sequential pass: every step transforms every block, in order, on the
    activations of the already transformed upstream blocks.

    Args:
      params: the model params; any mapping works (a lazily loading one streams: each block is
        read when it is its turn; the new params hold the transformed blocks).
      calib: model and calibration windows.
      steps: block steps, applied in order inside each block (statistics are re-collected
        between steps, since a step such as AWQ changes the next step's inputs).

    Returns:
      New params: the transformed blocks, every other entry the same object.

    Example:
      >>> new = run_blocks(params, Calibration(model, windows), gptq(int4(128)).block_steps)
    """
    model = calib.model
    cfg = model.cfg
    from jaxcomp.models import decoder_parts

    parts = decoder_parts(model)
    embed, block, prefix = parts.embed, parts.block, parts.prefix
    windows = jnp.asarray(np.asarray(calib.windows, np.int32))
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise JaxcompError(f"calibration windows must be (num_samples, seq_len), got "
                           f"{tuple(windows.shape)}")
    bs = calib.batch_size
    positions = jnp.broadcast_to(jnp.arange(windows.shape[1]), (bs, windows.shape[1]))

    @jax.jit
    def forward(bp, x):
        return block.apply({"params": bp}, x, positions[:x.shape[0]])[0]

    # Per-head value Grams cost kv_heads x in^2 each (4 GB for LLaMA-2-7B): only when asked.
    collections = ["calib", *(["calib_heads"] if any(s.head_grams for s in steps) else [])]

    @jax.jit
    def sown(bp, x):
        _, out = block.apply({"params": bp}, x, positions[:x.shape[0]], mutable=collections)
        return [out.get(c, {}) for c in collections]

    def run(bp, x):
        return jnp.concatenate([forward(bp, b) for b in _batches(x, bs)])

    # Everything but the blocks (embeddings, LM head) is read for the embedding and again at
    # the end, not held during the pass: a streamed checkpoint reads on lookup, and LLaMA-2-7B's
    # embedding + LM head are 1 GB in float32.
    outer_keys = [k for k in params if not re.fullmatch(rf"{prefix}_\d+", k)]
    outer = {k: params[k] for k in outer_keys}
    x = jnp.concatenate([embed(outer, b).astype(jnp.float32) for b in _batches(windows, bs)])
    del outer
    new_params = {}
    unmatched_rules = [{id(r) for r in step.rules} for step in steps]
    for i in tqdm(range(cfg.num_layers), desc="blocks", disable=not calib.progress):
        key = f"{prefix}_{i}"
        bp = params[key]

        def collect(bp, x=x):
            sums: dict[str, dict] = {}
            for b in _batches(x, bs):
                for tree in sown(bp, b):
                    _accumulate(sums, tree)
            return _finish(sums, x.shape[0] * x.shape[1])

        for j, step in enumerate(steps):
            # Selection per block (full paths), so a streamed checkpoint is never walked whole.
            selected, unmatched = select({key: bp}, step.rules, warn=False)
            unmatched_rules[j] &= {id(r) for r in unmatched}
            mine = {p[len(key) + 1:]: {**step.defaults, **args} for p, args in selected.items()}
            if not mine:
                continue
            ctx = BlockContext(i, key, cfg, x, bp, block, run, collect)
            try:
                bp = step.fn(bp, ctx, mine)
            except JaxcompError as e:
                raise JaxcompError(f"{key} ({step.desc}): {e}") from None
            del ctx  # its statistics (Gram matrices) can be large: free before the next
        new_params[key] = bp
        x = run(bp, x).astype(jnp.float32)
    new_params = {**{k: params[k] for k in outer_keys}, **new_params}
    for step, ids in zip(steps, unmatched_rules, strict=True):
        for r in step.rules:
            if id(r) in ids:
                warnings.warn(f"{step.desc}: rule {r.pattern!r} matched no parameter",
                              stacklevel=2)
    return new_params


def block_transform(fn: Callable[..., Any], rules=None, *, targets=(), ignore=(),
                    desc: str = "calibrate", head_grams: bool = False, **defaults):
    """Makes a calibrated transform ``transform(params, calib) -> params`` from a block step.

    Args:
      fn: ``fn(block_params, ctx, selected) -> block_params``; ``selected`` maps each chosen
        block-relative path to its arguments (``defaults`` updated by the rule's ``args``).
      rules, targets, ignore: selection over full param paths (``layers_3/mlp/up_proj/kernel``).
      desc: name in errors.
      head_grams: the step reads ``InputStats.head_grams`` (collected only then).
      **defaults: arguments for every selected leaf; a rule's ``args`` may set only these
        (any other raises now).

    Returns:
      The transform, with ``needs_calibration = "blocks"`` (the pipeline hands it a
      :class:`Calibration`) and ``block_steps`` (``chain`` fuses adjacent calibrated transforms
      into one pass over the blocks).
    """
    rule_list = make_rules(rules, targets=targets, ignore=ignore)
    check_rule_args(rule_list, defaults, desc)
    step = BlockStep(fn, tuple(rule_list), defaults, desc, head_grams)
    return steps_transform((step,))


def steps_transform(steps: tuple[BlockStep, ...]):
    """The calibrated transform running ``steps`` in one block-sequential pass."""

    def transform(params, calib: Calibration | None = None):
        if not isinstance(calib, Calibration):
            names = ", ".join(s.desc for s in steps)
            raise JaxcompError(f"{names} needs calibration data: call it as "
                               "transform(params, Calibration(model, windows))")
        return run_blocks(params, calib, steps)

    transform.needs_calibration = "blocks"
    transform.block_steps = steps
    return transform

