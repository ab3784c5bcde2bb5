"""Healing: distillation and quantization-aware training of a compressed model in Optax.

The student is the compressed params; the teacher the original ones. Only the float arrays
inside compressed leaves are trained (TT cores, Kronecker and low-rank factors, QAT master
weights and learned scales), selected by path rules; everything else is frozen and carries no
optimizer state. One ``jax.jit`` train step with explicit in/out shardings over a
``(data, fsdp, tensor)`` mesh; the same code runs on one device, many devices, and many
processes (``jaxcomp.parallel.initialize_distributed``). Orbax checkpoints make it resumable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxcomp.core.leaf import CompressedLeaf
from jaxcomp.core.rules import is_leaf, make_rules, path_str, select
from jaxcomp.errors import JaxcompError
from jaxcomp.parallel.mesh import make_mesh, partition_specs, put_global
from jaxcomp.quant.qarray import QArray
from jaxcomp.quant.qat import finalize_qat, prepare_qat
from jaxcomp.train.config import HealConfig

# ----------------------------------------------------------------------------- trainable split


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which arrays of a params pytree train. ``split`` gives two flat ``{path: array}`` dicts
    (paths as :func:`jax.tree_util.keystr` writes them); ``merge`` rebuilds the pytree."""

    treedef: object
    paths: tuple[str, ...]
    trainable: tuple[bool, ...]

    def split(self, params) -> tuple[dict, dict]:
        leaves = jax.tree_util.tree_leaves(params)
        train = {p: a for p, a, t in zip(self.paths, leaves, self.trainable, strict=True) if t}
        frozen = {p: a for p, a, t in zip(self.paths, leaves, self.trainable, strict=True) if not t}
        return train, frozen

    def merge(self, train: dict, frozen: dict):
        leaves = [(train if t else frozen)[p]
                  for p, t in zip(self.paths, self.trainable, strict=True)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def trainable_partition(params, targets=(), ignore=()) -> Partition:
    """Which arrays train.

    Without ``targets``: the floating-point arrays inside every compressed leaf (TT cores,
    Kronecker and low-rank factors, QAT master weights and learned scales), never those held
    by a packed ``QArray`` (train those through QAT: :func:`jaxcomp.quant.qat.prepare_qat`).
    With ``targets`` (regexes over the "/"-joined path): the compressed leaves and plain
    floating-point arrays they select (e.g. ``norm`` scales, or whole kernels for ordinary
    fine-tuning). ``ignore`` patterns are never trained.

    Raises:
      JaxcompError: nothing is trainable.
    """
    rules = make_rules(None, targets=tuple(targets) or (r".",), ignore=tuple(ignore))
    chosen, unmatched = select(params, rules, warn=False)
    # A typo would silently train everything, or nothing extra: say which pattern.
    typos = [f"{'heal.ignore' if r.skip else 'heal.targets'}: {r.pattern!r} matched no "
             "parameter" for r in unmatched if r.skip or targets]

    def leaf_mask(x):  # inside a selected compressed leaf
        if isinstance(x, QArray):
            return jax.tree.map(lambda _: False, x)
        return jnp.issubdtype(x.dtype, jnp.floating)

    def mask(keypath, x):
        if path_str(keypath) not in chosen:
            return jax.tree.map(lambda _: False, x)
        if isinstance(x, CompressedLeaf):
            return jax.tree.map(leaf_mask, x, is_leaf=lambda y: isinstance(y, QArray))
        return bool(targets) and jnp.issubdtype(x.dtype, jnp.floating)

    marks = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map_with_path(mask, params, is_leaf=is_leaf))
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    if not any(marks):
        raise JaxcompError("healing has nothing to train: no compressed leaf is selected "
                           "(heal.targets / heal.ignore), or all are packed QArrays and "
                           "heal.qat is false" + "".join(f"; {t}" for t in typos))
    for t in typos:
        warnings.warn(t, stacklevel=2)
    return Partition(treedef, tuple(jax.tree_util.keystr(k) for k, _ in flat),
                     tuple(bool(m) for m in marks))


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class TokenBatches:
    """Deterministic batches of ``seq_len + 1``-token windows from a token stream.

    The stream is cut into non-overlapping windows, visited in a fresh permutation each epoch
    (``seed`` and the epoch number fix it), so step ``s`` always gets the same batch: the
    data position of a checkpoint is its step.
    """

    tokens: np.ndarray
    seq_len: int
    batch_size: int
    grad_accum: int = 1
    seed: int = 0

    def __post_init__(self):
        per_step = self.batch_size * self.grad_accum
        if self.num_windows < per_step:
            raise JaxcompError(f"heal corpus has {len(self.tokens):,} tokens = "
                               f"{self.num_windows} windows of heal.seq_len + 1 = "
                               f"{self.seq_len + 1}, fewer than heal.batch_size * "
                               f"heal.grad_accum = {per_step}")

    @property
    def num_windows(self) -> int:
        return len(self.tokens) // (self.seq_len + 1)

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def batch(self, step: int) -> np.ndarray:
        """``(grad_accum, batch_size, seq_len + 1)`` int32 tokens of ``step``."""
        n, per_step = self.num_windows, self.batch_size * self.grad_accum
        idx = np.arange(step * per_step, (step + 1) * per_step)
        epochs = idx // n
        windows = np.empty(per_step, np.int64)
        for e in np.unique(epochs):
            windows[epochs == e] = self._order(int(e))[idx[epochs == e] % n]
        w = self.seq_len + 1
        out = np.stack([self.tokens[i * w:(i + 1) * w] for i in windows]).astype(np.int32)
        return out.reshape(self.grad_accum, self.batch_size, w)


# ----------------------------------------------------------------------------- losses


def _is_block(module, method_name: str) -> bool:
    return method_name == "__call__" and bool(re.fullmatch(r"(layers|h)_\d+", module.name or ""))


def forward(model, params, tokens, hidden: bool):
    """Logits, and every decoder block's output when ``hidden``."""
    if not hidden:
        return model.apply({"params": params}, tokens), []
    logits, state = model.apply({"params": params}, tokens, capture_intermediates=_is_block,
                                mutable=["intermediates"])
    blocks = state["intermediates"]
    names = sorted((k for k in blocks if k != "__call__"), key=lambda k: int(k.split("_")[1]))
    return logits, [blocks[k]["__call__"][0][0] for k in names]


def distill_loss(s_logits, t_logits, labels, s_hidden, t_hidden, cfg: HealConfig):
    """Weighted sum of the KD, cross-entropy and hidden-state terms, and each term."""
    temp = cfg.kd_temperature
    t_logp = jax.nn.log_softmax(t_logits / temp, axis=-1)
    s_logp = jax.nn.log_softmax(s_logits / temp, axis=-1)
    kd = (temp**2) * jnp.mean(jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1))
    ce = optax.softmax_cross_entropy_with_integer_labels(s_logits, labels).mean()
    hid = (sum(jnp.mean(jnp.square(s.astype(jnp.float32) - t.astype(jnp.float32)))
               for s, t in zip(s_hidden, t_hidden, strict=True)) / max(len(s_hidden), 1)
           if s_hidden else jnp.zeros(()))
    total = cfg.kd_weight * kd + cfg.ce_weight * ce + cfg.hidden_mse_weight * hid
    return total, {"loss": total, "kd": kd, "ce": ce, "hidden_mse": hid}


# ----------------------------------------------------------------------------- optimizer, step


def make_optimizer(cfg: HealConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, min(cfg.warmup_steps, max(cfg.steps - 1, 0)), max(cfg.steps, 1),
        cfg.lr * cfg.min_lr_ratio)
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    return optax.chain(*parts, optax.adamw(schedule, weight_decay=cfg.weight_decay))


def _opt_specs(opt_state, specs: dict) -> object:
    """Optimizer-state leaves keyed by a trainable path (Adam's moments) take that param's
    spec; the rest (step counts) are replicated."""
    def spec(keypath, leaf):
        last = keypath[-1] if keypath else None
        if isinstance(last, jax.tree_util.DictKey) and last.key in specs:
            return specs[last.key]
        return PartitionSpec()
    return jax.tree_util.tree_map_with_path(spec, opt_state)


@dataclasses.dataclass
class Trainer:
    """The compiled train step and the shardings of everything it touches."""

    step_fn: Callable
    state_shardings: dict
    batch_sharding: NamedSharding
    frozen: dict
    teacher: dict
    optimizer: optax.GradientTransformation


def heal_mesh(cfg: HealConfig):
    """The heal's device mesh; refuses sizes that do not fit the devices or the batch (the
    pipeline asks before loading the model, not after compressing it)."""
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards:
        raise JaxcompError(f"heal.batch_size {cfg.batch_size} is not divisible by the "
                           f"data x fsdp mesh size {shards}")
    return mesh


def make_trainer(model, partition: Partition, train_params: dict, frozen: dict, teacher,
                 cfg: HealConfig) -> Trainer:
    """Places params, frozen arrays and teacher on the mesh and jit-compiles the step."""
    mesh = heal_mesh(cfg)
    rules = cfg.mesh.rules
    t_flat = {jax.tree_util.keystr(k): v
              for k, v in jax.tree_util.tree_flatten_with_path(teacher)[0]}
    t_tree = jax.tree_util.tree_structure(teacher)
    spec_train = partition_specs(train_params, mesh, rules)
    spec_frozen = partition_specs(frozen, mesh, rules)
    spec_teacher = partition_specs(t_flat, mesh, rules)
    for rule in rules:  # a rule matching nothing leaves the automatic layout: say so
        if not any(re.search(str(rule[0]), p) for d in (train_params, frozen, t_flat) for p in d):
            warnings.warn(f"heal.mesh.rules: {rule[0]!r} matched no array (paths read like "
                          f"{next(iter(train_params))})", stacklevel=2)
    optimizer = make_optimizer(cfg)
    opt_shape = jax.eval_shape(optimizer.init, train_params)
    state_specs = {"params": spec_train, "opt": _opt_specs(opt_shape, spec_train),
                   "step": PartitionSpec()}
    to_sharding = lambda s: NamedSharding(mesh, s)  # noqa: E731
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    state_shardings = jax.tree.map(to_sharding, state_specs, is_leaf=is_spec)
    frozen_sh = {k: to_sharding(s) for k, s in spec_frozen.items()}
    teacher_sh = {k: to_sharding(s) for k, s in spec_teacher.items()}
    batch_sharding = to_sharding(PartitionSpec(None, ("data", "fsdp"), None))
    hidden = cfg.hidden_mse_weight > 0

    def loss_fn(train, frozen_arrays, teacher_arrays, tokens):
        params = partition.merge(train, frozen_arrays)
        t_params = jax.tree_util.tree_unflatten(t_tree, list(teacher_arrays.values()))
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        s_logits, s_hidden = forward(model, params, inputs, hidden)
        t_logits, t_hidden = jax.lax.stop_gradient(forward(model, t_params, inputs, hidden))
        return distill_loss(s_logits, t_logits, labels, s_hidden, t_hidden, cfg)

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def step(state, frozen_arrays, teacher_arrays, tokens):
        def micro(acc, batch):
            g, metrics = grad_fn(state["params"], frozen_arrays, teacher_arrays, batch)
            return jax.tree.map(jnp.add, acc, (g, metrics)), None

        zeros = jax.tree.map(jnp.zeros_like, state["params"])
        zero_metrics = {k: jnp.zeros(()) for k in ("loss", "kd", "ce", "hidden_mse")}
        (grads, metrics), _ = jax.lax.scan(micro, (zeros, zero_metrics), tokens)
        n = tokens.shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = {k: v / n for k, v in metrics.items()}
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt": opt, "step": state["step"] + 1}, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(step, in_shardings=(state_shardings, frozen_sh, teacher_sh, batch_sharding),
                      out_shardings=(state_shardings, replicated), donate_argnums=0)
    frozen_dev = {k: put_global(v, frozen_sh[k]) for k, v in frozen.items()}
    teacher_dev = {k: put_global(v, teacher_sh[k]) for k, v in t_flat.items()}
    return Trainer(step_fn, state_shardings, batch_sharding, frozen_dev, teacher_dev,
                   optimizer)


def init_state(trainer: Trainer, train_params: dict) -> dict:
    """Step 0: params on the mesh, optimizer state initialized there."""
    params = {k: put_global(v, trainer.state_shardings["params"][k])
              for k, v in train_params.items()}
    opt = jax.jit(trainer.optimizer.init, out_shardings=trainer.state_shardings["opt"])(params)
    step = put_global(np.zeros((), np.int32), trainer.state_shardings["step"])
    return {"params": params, "opt": opt, "step": step}


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class HealResult:
    params: object
    losses: list  # [(step, {"loss": ..., "kd": ..., ...}), ...] of the steps run here
    steps_run: int
    resumed_from: int | None
    tokens_trained: int
    seconds: float
    trainable_params: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_trained / self.seconds if self.seconds else 0.0


def fingerprint(data) -> str:
    """A stable hash of a JSON-able description of the run (recipe, model)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def heal(model, params, teacher, tokens: np.ndarray, cfg: HealConfig, *, seed: int = 0,
         checkpoint_dir: str | None = None, run_id: dict | None = None,
         progress: bool = False, on_step: Callable[[int, dict], None] | None = None) -> HealResult:
    """Trains the compressed ``params`` toward ``teacher`` for ``cfg.steps`` steps.

    Args:
      model: the Flax module both param trees run in (its dtype is the compute dtype).
      params: the compressed params (``QArray`` leaves train through QAT when ``cfg.qat``).
      teacher: the original params.
      tokens: 1-D training token stream (never the eval part).
      cfg: the heal config.
      seed: fixes the data order.
      checkpoint_dir: where orbax checkpoints go (``None``: no checkpoints).
      run_id: what the checkpoints must have been written for (e.g. the recipe); resuming a
        directory written for a different one fails.
      progress: tqdm bar with the loss and tokens/s.
      on_step: called as ``on_step(step, metrics)`` after each logged step.

    Returns:
      A :class:`HealResult` whose ``params`` has the trained leaves (``QATArray`` converted
      back to packed ``QArray``).
    """
    from jaxcomp.train.checkpointing import HealCheckpoints

    if cfg.qat:
        params = prepare_qat(params, cfg.lsq, originals=teacher)
    partition = trainable_partition(params, cfg.targets, cfg.ignore)
    train_params, frozen = partition.split(params)
    trainer = make_trainer(model, partition, train_params, frozen, teacher, cfg)
    batches = TokenBatches(np.asarray(tokens), cfg.seq_len, cfg.batch_size, cfg.grad_accum, seed)
    # What the trained numbers depend on; the mesh is left out (a run may resume on another).
    ident = fingerprint({"run": run_id, "heal": dataclasses.asdict(cfg) | dict.fromkeys(
        ("checkpoint_dir", "resume", "checkpoint_every", "keep_checkpoints", "log_every",
         "mesh"))})
    ckpt = (HealCheckpoints(checkpoint_dir, cfg.checkpoint_every, cfg.keep_checkpoints, ident)
            if checkpoint_dir and cfg.checkpoint_every else None)
    state, resumed = None, None
    if ckpt is not None and cfg.resume:
        abstract = {"params": jax.eval_shape(lambda: train_params),
                    "opt": jax.eval_shape(trainer.optimizer.init, train_params),
                    "step": jax.ShapeDtypeStruct((), np.int32)}
        state = ckpt.restore_latest(abstract, trainer.state_shardings)
        resumed = None if state is None else int(state["step"])
    if state is None:
        state = init_state(trainer, train_params)
    start = int(state["step"])
    losses = []
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=start, desc="heal", disable=not progress,
               unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    for s in range(start, cfg.steps):
        batch = put_global(batches.batch(s), trainer.batch_sharding)
        state, metrics = trainer.step_fn(state, trainer.frozen, trainer.teacher, batch)
        if (s + 1) % cfg.log_every == 0 or s + 1 == cfg.steps:
            m = {k: float(v) for k, v in metrics.items()}
            if not np.isfinite(m["loss"]):
                raise JaxcompError(f"heal: the loss became {m['loss']} at step {s + 1}; "
                                   "lower heal.lr or enable heal.grad_clip")
            losses.append((s + 1, m))
            if on_step is not None:
                on_step(s + 1, m)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{m['loss']:.4f}",
                            tok_s=f"{tokens_per_step * (s + 1 - start) / elapsed:,.0f}")
        bar.update(1)
        if ckpt is not None:
            ckpt.save(s + 1, state)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    bar.close()
    if ckpt is not None:
        ckpt.close()
    trained = {k: np.asarray(jax.device_get(_gather(v))) for k, v in state["params"].items()}
    params = finalize_qat(partition.merge(trained, frozen))
    n_train = sum(int(np.prod(np.shape(v))) for v in train_params.values())
    return HealResult(params, losses, cfg.steps - start, resumed,
                      tokens_per_step * (cfg.steps - start), seconds, n_train)


def _gather(x: jax.Array) -> jax.Array:
    """The full value of a (possibly multi-process) sharded array on every process."""
    if x.is_fully_addressable:
        return x
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(x, tiled=True)
