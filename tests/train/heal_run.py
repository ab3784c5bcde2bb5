"""Runs a small heal on a random tiny LLaMA; the subprocess side of the train tests.

Usage: python tests/train/heal_run.py OUT.npz [--mesh D F T] [--steps N] [--ckpt DIR]
       [--every K] [--step-delay S] [--lr LR] [--grad-accum A]

Multi-process: set JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT, JAX_NUM_PROCESSES,
JAX_PROCESS_ID (and XLA_FLAGS for the local device count). Process 0 writes OUT.npz with the
losses and the final params (flattened).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402

from jaxcomp.parallel import initialize_distributed  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mesh", nargs=3, type=int, default=[-1, 1, 1])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--every", type=int, default=0)
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--model-seed", type=int, default=0)
    args = ap.parse_args()
    initialize_distributed()

    import transformers

    from jaxcomp.core import chain, get_transform
    from jaxcomp.models import build_model, from_hf_config
    from jaxcomp.train import HealConfig, MeshConfig, heal

    hf = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)
    cfg = from_hf_config(hf)
    model = build_model(cfg)
    params = model.init(jax.random.key(args.model_seed), np.zeros((1, 4), np.int32))["params"]
    # Sharper teacher logits than a random init gives, so the losses are not ~0.
    params = jax.tree.map(lambda x: x * 4 if x.ndim == 2 else x, params)
    # TT-factorized attention (trains the cores), int4 MLPs (train through QAT).
    student = chain(
        get_transform("tt")(param_ratio=0.5, targets=[r"self_attn/.*kernel$"], progress=False),
        get_transform("quantize")(bits=4, group_size=16, targets=[r"mlp/.*kernel$"],
                                  progress=False))(params)
    tokens = np.random.default_rng(0).integers(0, 64, 20000)
    heal_cfg = HealConfig(steps=args.steps, lr=args.lr, batch_size=8, seq_len=32,
                          warmup_steps=2, grad_accum=args.grad_accum, ce_weight=0.5,
                          hidden_mse_weight=0.1, mesh=MeshConfig(*args.mesh),
                          checkpoint_every=args.every)
    delay = (lambda step, metrics: time.sleep(args.step_delay)) if args.step_delay else None
    result = heal(model, student, params, tokens, heal_cfg, checkpoint_dir=args.ckpt,
                  run_id={"model_seed": args.model_seed}, on_step=delay)
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_leaves(result.params)
        np.savez(args.out, losses=np.array([m["loss"] for _, m in result.losses]),
                 steps=np.array([s for s, _ in result.losses]),
                 resumed=-1 if result.resumed_from is None else result.resumed_from,
                 **{f"p{i}": np.asarray(x) for i, x in enumerate(leaves)})


if __name__ == "__main__":
    main()
