#!/usr/bin/env python
"""Streams a LLaMA-2-7B-shaped checkpoint through the TT transform one tensor at a time.

Usage: python scripts/bench/tt_stream.py [--dir /tmp/llama7b_random] [--param-ratio 0.3]
       [--layers 32] [--keep]

1. Writes a random bf16 HF checkpoint with LLaMA-2-7B's shapes (config.json + one safetensors
   shard per decoder layer + an index), unless --dir already holds one. Random weights: the
   point is memory and time, not quality.
2. Reads it back tensor by tensor (memory-mapped), factorizes every attention and MLP kernel
   with the registered ``tt`` transform at --param-ratio (3 cores), writes each layer's cores
   to ``<dir>_tt/layers_<i>.npz`` and drops them, so peak memory is about one float32 tensor
   plus its SVD workspace. Reports time and peak RSS (``ru_maxrss``) as JSON.
"""

import argparse
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from jaxcomp.core import get_transform  # noqa: E402
from jaxcomp.models.hf import hf_name_to_path, iter_safetensors, load_hf_config  # noqa: E402

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
             "torch_dtype": "bfloat16"}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_checkpoint(path: str, layers: int) -> None:
    import ml_dtypes
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    cfg = {**LLAMA2_7B, "num_hidden_layers": layers}
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    weight_map = {}
    shards = [("embed", {"model.embed_tokens.weight": lambda: rand(v, h),
                         "model.norm.weight": lambda: np.ones(h, ml_dtypes.bfloat16),
                         "lm_head.weight": lambda: rand(v, h)})]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append((f"layer{i}", {
            **{p + f"self_attn.{n}_proj.weight": (lambda: rand(h, h)) for n in "qkvo"},
            p + "mlp.gate_proj.weight": lambda: rand(f, h),
            p + "mlp.up_proj.weight": lambda: rand(f, h),
            p + "mlp.down_proj.weight": lambda: rand(h, f),
            p + "input_layernorm.weight": lambda: np.ones(h, ml_dtypes.bfloat16),
            p + "post_attention_layernorm.weight": lambda: np.ones(h, ml_dtypes.bfloat16)}))
    for name, tensors in tqdm(shards, desc="write random checkpoint"):
        file = f"model-{name}.safetensors"
        save_file({k: make() for k, make in tensors.items()}, os.path.join(path, file))
        weight_map.update({k: file for k in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/llama7b_random")
    ap.add_argument("--param-ratio", type=float, default=0.3)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    args = ap.parse_args()
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        start = time.perf_counter()
        write_checkpoint(args.dir, args.layers)
        print(json.dumps({"wrote_checkpoint_s": round(time.perf_counter() - start, 1)}))
    cfg, _ = load_hf_config(args.dir)
    out_dir = args.dir.rstrip("/") + "_tt"
    os.makedirs(out_dir, exist_ok=True)
    transform = get_transform("tt")(param_ratio=args.param_ratio, num_cores=3, progress=False)
    start = time.perf_counter()
    dense_params = kept_params = matrices = 0
    layer_cores: dict[int, dict[str, np.ndarray]] = {}
    total = 7 * cfg.num_layers
    bar = tqdm(total=total, desc="tt", unit="matrix")
    for name, array in iter_safetensors(args.dir):  # one float32 tensor in memory at a time
        path, transpose = hf_name_to_path(cfg, name)
        if not path.endswith("_proj/kernel"):
            continue
        w = array.T if transpose else array
        node = tree = {}
        parts = path.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = w
        leaf = transform(tree)
        for p in parts:
            leaf = leaf[p]
        layer = int(parts[0].split("_")[1])
        cores = layer_cores.setdefault(layer, {})
        for k, core in enumerate(leaf.cores):
            cores[f"{'/'.join(parts[1:-1])}/core{k}"] = np.asarray(core)
        dense_params += w.size
        kept_params += leaf.num_params
        matrices += 1
        bar.update()
        bar.set_postfix(rss_gib=f"{peak_rss_gib():.2f}")
        del array, w, leaf, tree
        if len(cores) == 7:  # a layer is complete: write it and let it go
            np.savez(os.path.join(out_dir, f"layers_{layer}.npz"), **layer_cores.pop(layer))
    bar.close()
    seconds = time.perf_counter() - start
    print(json.dumps({"matrices": matrices, "dense_params": dense_params,
                      "tt_params": kept_params, "param_ratio": round(kept_params / dense_params, 4),
                      "seconds": round(seconds, 1), "s_per_matrix": round(seconds / matrices, 2),
                      "peak_rss_gib": round(peak_rss_gib(), 2)}))
    if not args.keep:
        import shutil

        shutil.rmtree(args.dir, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
