"""Healing: distillation and quantization-aware training of compressed params."""

from jaxcomp.train.config import HealConfig, MeshConfig
from jaxcomp.train.heal import (
    HealResult,
    Partition,
    TokenBatches,
    distill_loss,
    heal,
    make_optimizer,
    trainable_partition,
)

__all__ = ["HealConfig", "HealResult", "MeshConfig", "Partition", "TokenBatches",
           "distill_loss", "heal", "make_optimizer", "trainable_partition"]
