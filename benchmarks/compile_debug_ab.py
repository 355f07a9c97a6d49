"""A/B of Inductor's debug flag on dsv4's Triton kernels, on the README's headline training row.

Inductor compiles the user-defined Triton kernels inside a compiled block with Triton's `debug` flag equal to its
`assert_indirect_indexing` option (default True), which adds an overflow assert to every int32 add/sub/mul of
the kernel; `dsv4.compiling.OPTIONS` turns it off (see that module). Rows, one process, each compiled anew:

  default   Inductor's default (assert_indirect_indexing True: the kernels compile with debug)
  dsv4      dsv4.compiling.OPTIONS (debug off)
  dsv4+mhc  the same with the fused mHC kernels on (Fusion.pre_kernel, Fusion.expand_kernel)

Each row: compiled blocks + CUDA graph, chunked head loss, b2x4096 (bench_gpu.bench_train), ~2 min of compile.

    python benchmarks/compile_debug_ab.py --out DIR [--rows default,dsv4,dsv4+mhc] [--budget-s 480]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import bench_gpu  # noqa: E402
from dsv4 import compiling  # noqa: E402
from dsv4.model import Transformer  # noqa: E402
from dsv4.model.mhc import Fusion  # noqa: E402

ROWS = {"default": (True, False), "dsv4": (False, False), "dsv4+mhc": (False, True)}  # (debug, mHC kernels)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--rows", default="default,dsv4,dsv4+mhc", help=f"comma-separated, of {', '.join(ROWS)}")
    ap.add_argument("--budget-s", type=float, default=480, help="no new row starts after this many seconds")
    args = ap.parse_args()
    rows = args.rows.split(",")
    for r in rows:
        if r not in ROWS:
            ap.error(f"--rows: no row {r!r} (choose from {', '.join(ROWS)})")
    deadline = time.time() + args.budget_s
    cfg = bench_gpu.start_results(args.out, "compile_debug_ab.json", args.config)
    bench_gpu.TRAIN_SHAPES[:] = [(2, 4096)]
    model = bench_gpu.build(cfg)
    Transformer.head_fp32 = False                 # bf16 head, as bench_gpu.py and the transformers baseline
    peak = bench_gpu.matmul_peak()
    saved = dict(compiling.OPTIONS), Fusion.pre_kernel, Fusion.expand_kernel
    for r in rows:
        if time.time() > deadline:
            bench_gpu.log(what="skipped", row=r, why="--budget-s reached")
            continue
        debug, mhc = ROWS[r]
        compiling.OPTIONS["assert_indirect_indexing"] = debug
        Fusion.pre_kernel = Fusion.expand_kernel = mhc
        torch._dynamo.reset()
        compiling.compile_blocks(model)           # anew: each block's compiled call holds the options it was given
        bench_gpu.bench_train(cfg, model, peak, f"compiled blocks, CUDA graph, row {r} (debug {debug}, mHC "
                              f"kernels {mhc})", mtp=False, chunked_loss=True, graph=True)
    compiling.OPTIONS.clear()
    compiling.OPTIONS.update(saved[0])
    Fusion.pre_kernel, Fusion.expand_kernel = saved[1], saved[2]
    return 0


if __name__ == "__main__":
    sys.exit(main())
