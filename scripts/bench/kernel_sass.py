#!/usr/bin/env python
"""Static view of the GPU kernel without a GPU: registers and SASS of its main loop.

Usage: python scripts/bench/kernel_sass.py [--formats int4_g128 nf4_g64 ...] [--k 4096]
       [--n 11008] [--m 1] [--sweep decode=64:4:3:528:ptx ...] [--arch 90] [--out FILE.jsonl]

Lowers the Pallas kernel for ``cuda`` on this CPU (jax's Triton dialect), compiles that
Triton IR with the ``triton`` package for ``sm_<arch>`` and disassembles the cubin with the
``cuobjdump`` it bundles. Per format and tiling it reports the registers per thread and the
spills (``ptxas -v``), the instructions of the main loop (the body of the last backward
branch) per K step and per weight a thread handles, and the loop's instruction mix. It needs
``pip install triton`` (not a jaxcomp dependency); the pip release need not be the Triton that
XLA builds into jaxlib, so read the numbers as a close proxy for the code a GPU runs, and time
on a GPU with ``kernel_profile.py``. The inline-PTX code conversions are assembled here too,
so a syntax error in them shows up without a GPU.
"""

import argparse
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxcomp.quant import quantize_array  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qmatmul import FORMATS, apply_tilings_or_exit  # noqa: E402

INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.\S+)?([^;]*);")


def triton_ir(q, m: int) -> list[str]:
    """The Triton IR texts of ``qmatmul(x, q)`` for an (m, K) bf16 x lowered for cuda (one per
    pallas_call)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    from pallas_kernels.qmatmul import qmatmul

    texts, lower = [], registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        texts.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    x = jax.ShapeDtypeStruct((m, q.orig_shape[0]), jnp.bfloat16)
    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        jax.jit(lambda x, q: qmatmul(x, q, "gpu")).trace(x, q).lower(
            lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    return texts


def loop_body(sass: str) -> list[str]:
    """Opcodes of the main loop: from the target of the last backward branch to the branch."""
    rows = [(int(a, 16), op, rest) for a, _, op, _, rest in INSTRUCTION.findall(sass)]
    loops = [(int(rest.split()[0], 16), addr) for addr, op, rest in rows
             if op == "BRA" and rest.split() and int(rest.split()[0], 16) < addr]
    if not loops:
        return []
    start, end = loops[-1]
    return [op for addr, op, _ in rows if start <= addr <= end]


def compile_sass(ttir: str, tiling, arch: int) -> dict:
    """Registers, spills and main-loop SASS of one Triton IR text compiled for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ttir")
        with open(path, "w") as f:
            f.write(ttir)
        kernel = triton.compile(path, target=GPUTarget("cuda", arch, 32), options={
            "num_warps": tiling.num_warps, "num_stages": tiling.num_stages})
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        ptxas = subprocess.run([os.path.join(tools, "ptxas"), "-v", f"-arch=sm_{arch}a", ptx,
                                "-o", os.devnull], capture_output=True, text=True, check=True)
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", ptxas.stderr).group(1))
    spill = re.search(r"(\d+) bytes spill stores", ptxas.stderr)
    return {"registers": registers, "spill_store_bytes": int(spill.group(1)) if spill else 0,
            "shared_bytes": kernel.metadata.shared, "total_instructions":
            len(INSTRUCTION.findall(sass)), "loop": loop_body(sass)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=11008)
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--sweep", nargs="*", default=[],
                   help="tiling specs as in qmatmul.py, each compiled in turn (default: the "
                        "GPU tilings of ops.py)")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    try:
        import triton  # noqa: F401
    except ImportError:
        print("kernel_sass.py: needs the triton package (pip install triton)", file=sys.stderr)
        sys.exit(2)
    import pallas_kernels.qmatmul.ops as ops

    default = dict(ops.TILINGS["gpu"])
    rows = []
    weights = {name: quantize_array(np.zeros((args.k, args.n), np.float32), FORMATS[name])
               for name in args.formats}
    for spec in args.sweep or [None]:
        ops.TILINGS["gpu"] = dict(default)
        if spec:
            apply_tilings_or_exit("gpu", [spec])
        for name, q in weights.items():
            if not ops.supported(q, (args.m, args.k), "gpu"):
                print(f"{name}: XLA path at M={args.m}, no kernel")
                continue
            tiling = ops._tiling("gpu", args.m, args.n)
            kf = ops.kernel_format(q)
            [ttir] = triton_ir(q, args.m)
            try:
                stats = compile_sass(ttir, tiling, args.arch)
            except Exception as e:  # a tiling or IR this Triton rejects is a result, not a crash
                print(f"{name} {spec or 'default'}: compile failed: {str(e).splitlines()[0]}")
                continue
            loop = stats.pop("loop")
            # Weights a thread dequantizes per K step: the (block_k, block_n) tile over the threads.
            per_thread = kf.block_k * tiling.block_n / (32 * tiling.num_warps)
            row = {"format": name, "tiling": dataclasses.asdict(tiling), "arch": args.arch,
                   "K": args.k, "N": args.n, "M": args.m, **stats,
                   "loop_instructions": len(loop),
                   "loop_instructions_per_weight": len(loop) / per_thread,
                   "loop_mix": dict(collections.Counter(loop).most_common(12))}
            rows.append(row)
            t = tiling
            print(f"{name:10} {t.block_n}:{t.num_warps}:{t.num_stages}:{t.min_programs}:"
                  f"{t.codes:8} regs {row['registers']:3} spills {row['spill_store_bytes']} "
                  f"loop {len(loop):4} instr = {row['loop_instructions_per_weight']:.2f} per "
                  f"weight  {row['loop_mix']}")
    if args.out:
        with open(args.out, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
