#!/usr/bin/env bash
# One GPU session's kernel checks and timings, in one command (a lent GPU is short on time).
# Usage: OUT=dir bash scripts/bench/gpu_kernels.sh [sweep specs...]
# 1. correctness of every format against float64 (f32 and bf16 activations) and of the Mosaic
# GPU int4 kernel, 2. device times (profiler) of the Mosaic GPU int4 kernel (kernel_mgpu.py;
# profile_mosaic.jsonl) and dense bf16, then of the Triton kernel / XLA dequantize / bf16 dense at
# the LLaMA-7B decode shapes and each tiling spec given (default: the two that kernel_sass.py
# counts fewest instructions for), and of NF4's two code conversions, 3. the kernel on N-major
# packed weights (scripts/bench/patches/n_major_packed.patch applied to a copy in
# .devbench/nmajor; read its kernel_us, the transpose is a separate op), 4. an old tree in
# .devbench/old (if present) profiled the same way, as the baseline, 5. the whole-model check.
# Everything is written under $OUT as it is measured (a run cut off by the 600 s call limit
# keeps its rows); a summary is printed (per row: device time, kernel alone, dense bf16 / total).
# To compare with revision REV: mkdir -p .devbench/old/scripts/bench && git archive REV
# pallas_kernels jaxcomp | tar -x -C .devbench/old && cp scripts/bench/kernel_profile.py
# scripts/bench/qmatmul.py .devbench/old/scripts/bench/ (.devbench is git-ignored: carry it).
set -u
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
SHAPES="4096x11008 11008x4096 4096x4096"
SWEEP=("$@")
[ $# -eq 0 ] && SWEEP=(decode=64:4:2:528:ptx decode=128:8:2:528:ptx)
# wider slabs first: at block_n 64 each step moves as many x^T bytes (M padded to 16) as codes
MOSAIC_SWEEP=(mosaic=128:2:4:528 mosaic=256:2:3:528 mosaic=64:1:6:528 mosaic=64:4:3:528
    mosaic=64:2:4:264 mosaic=64:2:4:528:1 mosaic=128:2:4:528:1)
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, triton; print('jax', jax.__version__, 'triton', triton.__version__, jax.devices())"
timeout 90 python3 scripts/bench/qmatmul.py --check-only --out "$OUT/checks.jsonl" \
    > "$OUT/checks.log" 2>&1 || tail -5 "$OUT/checks.log"
# The Mosaic GPU int4 experiment (kernel_mgpu.py), first: never timed yet. Default HopperTiling,
# then wider, one-group, deeper and fewer-program steps, and one step's wgmma left in flight.
timeout 180 python3 scripts/bench/kernel_profile.py --shapes $SHAPES --paths mosaic dense_bf16 \
    --sweep "${MOSAIC_SWEEP[@]}" --out "$OUT/profile_mosaic.jsonl" \
    > "$OUT/profile_mosaic.log" 2>&1 || tail -5 "$OUT/profile_mosaic.log"
timeout 270 python3 scripts/bench/kernel_profile.py --shapes $SHAPES --sweep "${SWEEP[@]}" \
    --out "$OUT/profile.jsonl" > "$OUT/profile.log" 2>&1 || tail -5 "$OUT/profile.log"
# NF4: the prmt table lookup (the default ptx codes) against the select chain (convert).
timeout 120 python3 scripts/bench/kernel_profile.py --shapes $SHAPES --format nf4_g64 \
    --paths kernel dense_bf16 --sweep decode=64:4:3:528:convert --out "$OUT/profile_nf4.jsonl" \
    > "$OUT/profile_nf4.log" 2>&1 || tail -5 "$OUT/profile_nf4.log"
rm -rf .devbench/nmajor && mkdir -p .devbench/nmajor && cp -r pallas_kernels jaxcomp scripts \
    .devbench/nmajor/ && (cd .devbench/nmajor && git apply scripts/bench/patches/n_major_packed.patch \
    && timeout 100 python3 scripts/bench/kernel_profile.py --shapes $SHAPES --paths kernel \
    --sweep "${SWEEP[@]}" --out "$OUT/profile_nmajor.jsonl" > "$OUT/profile_nmajor.log" 2>&1) \
    || tail -5 "$OUT/profile_nmajor.log"
if [ -d .devbench/old ]; then
    (cd .devbench/old && timeout 70 python3 scripts/bench/kernel_profile.py --shapes $SHAPES \
        --paths kernel --out "$OUT/profile_old.jsonl" > "$OUT/profile_old.log" 2>&1)
fi
python3 - "$OUT" <<'PY'
import json, os, sys
def rows(name):
    path = os.path.join(sys.argv[1], name)
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []
worst = {}
for r in rows("checks.jsonl"):
    if "error" in r:
        print("check", r["check"], "M", r["M"], "ERROR", r["error"][:120])
        continue
    key = (r["check"], r["dtype"])
    worst[key] = max(worst.get(key, 0), r["max_rel_err_vs_f64"])
print("checks, max rel err:", {f"{k[0]}/{k[1]}": f"{v:.1e}" for k, v in worst.items()})
profiled = (rows("profile.jsonl") + rows("profile_mosaic.jsonl") + rows("profile_nf4.jsonl")
            + [dict(r, path="NMAJOR") for r in rows("profile_nmajor.jsonl")]
            + [dict(r, path="OLD") for r in rows("profile_old.jsonl")])
dense = {(r["K"], r["N"]): r["device_us_per_call"] for r in profiled
         if r["path"] == "dense_bf16" and "error" not in r}
for r in profiled:
    if "error" in r:
        print(r["K"], r["N"], r["path"], r["tiling"], "ERROR", r["error"][:120])
        continue
    ratio = dense.get((r["K"], r["N"]), float("nan")) / r["device_us_per_call"]
    print(f'{r["format"]:9} {r["K"]}x{r["N"]} {r["path"]:10} {str(r["tiling"])[:32]:32} total '
          f'{r["device_us_per_call"]:6.1f} kernel {r.get("kernel_us") or 0:6.1f} '
          f'dense/total {ratio:4.2f}x err {r["max_rel_err"] or 0:.1e}')
PY
timeout 50 python3 scripts/bench/model_check.py --layers 4 --hidden 4096 --tokens 1 | tee "$OUT/model.txt"
