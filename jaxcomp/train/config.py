"""The ``heal`` section of a recipe: distillation / QAT training of the compressed model."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class MeshConfig:
    """Device mesh of the train step; one size may be -1 (the remaining devices)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # [[regex over the param path, [axis or null per dimension]], ...]; first match wins,
    # unmatched arrays: last axis over `tensor`, largest other axis over `fsdp` (if divisible).
    rules: list[Any] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class HealConfig:
    steps: int = 0  # 0: no healing
    lr: float = 1e-4  # peak learning rate (AdamW, linear warmup then cosine decay)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    batch_size: int = 8  # sequences per optimizer step (global, across processes)
    grad_accum: int = 1  # micro-batches per step (batch_size sequences each)
    seq_len: int = 512
    corpus: str = "enwiki-sample"  # trains on its calib part; the eval part is never used
    # the CLI's model to distill from (as `model`; empty: the loaded one); jc.heal is handed
    # the teacher's params instead
    teacher: str = ""
    kd_temperature: float = 2.0
    kd_weight: float = 1.0  # KL(teacher || student) on logits at kd_temperature, times T^2
    ce_weight: float = 0.0  # next-token cross-entropy on the corpus
    hidden_mse_weight: float = 0.0  # mean squared error of every block's output
    qat: bool = True  # QArray leaves train as fake-quantized float master weights
    lsq: bool = False  # QAT also learns the group scales (LSQ)
    compute_dtype: str = "float32"  # or bfloat16 (master weights stay float32)
    remat: bool = True  # recompute block activations in the backward pass (less memory)
    targets: list[str] = dataclasses.field(default_factory=list)  # default: every compressed leaf
    ignore: list[str] = dataclasses.field(default_factory=list)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint_every: int = 0  # orbax checkpoint every N steps; 0: none
    keep_checkpoints: int = 2
    checkpoint_dir: str = ""  # default: <out_dir>.heal-checkpoints (kept across restarts)
    resume: bool = True  # continue from the newest good checkpoint in checkpoint_dir
    log_every: int = 1  # record the loss every N steps


def check_heal_config(h: HealConfig) -> list[tuple[bool, str]]:
    """(condition, message) pairs the recipe validator raises on."""
    return [
        (h.steps >= 0, "heal.steps must be >= 0"),
        (h.lr > 0, "heal.lr must be > 0"),
        (h.warmup_steps >= 0, "heal.warmup_steps must be >= 0"),
        (0 <= h.min_lr_ratio <= 1, "heal.min_lr_ratio must be in [0, 1]"),
        (h.weight_decay >= 0, "heal.weight_decay must be >= 0"),
        (h.grad_clip >= 0, "heal.grad_clip must be >= 0 (0 disables)"),
        (h.batch_size >= 1, "heal.batch_size must be >= 1"),
        (h.grad_accum >= 1, "heal.grad_accum must be >= 1"),
        (h.seq_len >= 2, "heal.seq_len must be >= 2"),
        (h.kd_temperature > 0, "heal.kd_temperature must be > 0"),
        (min(h.kd_weight, h.ce_weight, h.hidden_mse_weight) >= 0,
         "heal.kd_weight, heal.ce_weight and heal.hidden_mse_weight must be >= 0"),
        (h.kd_weight + h.ce_weight + h.hidden_mse_weight > 0,
         "heal: at least one of kd_weight, ce_weight, hidden_mse_weight must be > 0"),
        (h.compute_dtype in ("float32", "bfloat16"),
         "heal.compute_dtype must be float32 or bfloat16"),
        (h.checkpoint_every >= 0, "heal.checkpoint_every must be >= 0 (0: no checkpoints)"),
        (h.keep_checkpoints >= 1, "heal.keep_checkpoints must be >= 1"),
        (h.log_every >= 1, "heal.log_every must be >= 1"),
    ]
