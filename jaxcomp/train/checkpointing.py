"""Resumable healing: orbax ``CheckpointManager`` over the train state.

A checkpoint holds the trainable params, the optimizer state and the step (the data position:
batches are a pure function of the seed and the step, see ``TokenBatches``), plus JSON metadata
with the fingerprint of the run that wrote it. Saves are asynchronous; the last K are kept.
"""

from __future__ import annotations

import os
import warnings

import jax
import orbax.checkpoint as ocp

from jaxcomp.errors import JaxcompError


def _flat(state) -> dict:
    """Orbax names arrays after their keys; param paths contain brackets and quotes, so the
    state is stored as numbered leaves and rebuilt from the known tree structure."""
    return {f"{i:06d}": leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(state))}


class HealCheckpoints:
    """Saves every ``every`` steps into ``directory``, keeps ``keep``; restores the newest
    readable one written by the same run (``ident``)."""

    def __init__(self, directory: str, every: int, keep: int, ident: str):
        self.directory = os.path.abspath(directory)
        self.every = every
        self.ident = ident
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every,
                                               enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def save(self, step: int, state) -> None:
        if step % self.every:
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_flat(state)),
            meta=ocp.args.JsonSave({"step": step, "ident": self.ident})))

    def restore_latest(self, abstract_state, shardings):
        """The newest good checkpoint's state placed on ``shardings``, or ``None`` when there
        is none. A checkpoint that cannot be read is skipped with a warning; one written by a
        different run raises."""
        leaves = jax.tree_util.tree_leaves(abstract_state)
        sh = jax.tree_util.tree_leaves(shardings)
        target = {f"{i:06d}": jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                  for i, (a, s) in enumerate(zip(leaves, sh, strict=True))}
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                meta = self.manager.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
            except Exception as e:  # noqa: BLE001 - any unreadable step is skipped
                warnings.warn(f"heal checkpoint step {step} in {self.directory} is unreadable "
                              f"({type(e).__name__}); trying an older one", stacklevel=2)
                continue
            if meta.get("ident") != self.ident:
                raise JaxcompError(
                    f"heal checkpoints in {self.directory} were written by a different recipe "
                    "or model; resume needs the same one (or set heal.resume=false, or use "
                    "another out_dir / heal.checkpoint_dir)")
            try:
                flat = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))["state"]
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"heal checkpoint step {step} in {self.directory} is unreadable "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                              "trying an older one", stacklevel=2)
                continue
            treedef = jax.tree_util.tree_structure(abstract_state)
            return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in sorted(flat)])
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
