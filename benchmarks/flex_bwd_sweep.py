"""Which FlexAttention backward tiles suit head_dim 512 (torch's default for head_dim > 256 is 16×16 tiles)?
Times `sparse_attention.attend` forward+backward for one CSA layer of the bench config (b2 × 4096 tokens,
16 heads, top-256 of 1024 entries, random picks) under each candidate `kernel_options`, bf16, one GPU, and
checks each candidate's gradients against the default tiles.

    python benchmarks/flex_bwd_sweep.py --out DIR      -> DIR/flex_bwd_sweep.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from bench_gpu import timed  # noqa: E402
from dsv4.model import sparse_attention  # noqa: E402

CANDIDATES = [None] + [
    {"bwd_BLOCK_M1": m1, "bwd_BLOCK_N1": n1, "bwd_BLOCK_M2": n1, "bwd_BLOCK_N2": m1, "bwd_num_stages": s,
     "bwd_num_warps": w}
    for m1, n1, s, w in [(32, 16, 1, 4), (64, 16, 1, 4), (32, 32, 1, 4), (32, 32, 1, 8), (64, 32, 1, 8),
                         (16, 32, 1, 4), (64, 64, 1, 8), (32, 64, 1, 8)]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    out = Path(args.out) / "flex_bwd_sweep.json"
    b, L, h, d, N, k = 2, 4096, 16, 512, 1024, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    kv = torch.randn(b, L, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    comp = torch.randn(b, N, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    sink = torch.randn(h, device="cuda", generator=g).requires_grad_()
    n_vis = (torch.arange(L, device="cuda") + 1) // 4
    scores = torch.rand(b, L, N, device="cuda", generator=g).masked_fill(torch.arange(N, device="cuda") >= n_vis[:, None], -1)
    top = scores.topk(k, -1).indices
    sel = torch.where(top < n_vis[:, None], top, -1)
    go = torch.randn(b, L, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    rows, ref = [], None
    for opts in CANDIDATES:
        if time.time() > deadline:
            break
        torch._dynamo.reset()
        sparse_attention._compiled = None

        def step():
            for t in (q, kv, comp, sink):
                t.grad = None
            sparse_attention.attend(q, kv, comp, sel, sink, 128, 4, kernel_options=opts).backward(go)
        try:
            t0 = time.perf_counter()
            step()
            compile_s = time.perf_counter() - t0
            grads = [t.grad.float().clone() for t in (q, kv, comp, sink)]
            ref = ref or grads
            err = max(float((a - r).norm() / r.norm()) for a, r in zip(grads, ref))
            t = timed(step, 5)
            row = {"options": opts, "fwd_bwd_ms": t * 1e3, "compile_s": compile_s, "grad_rel_vs_default": err}
        except Exception as e:                      # noqa: BLE001 - a tile that does not fit is a result too
            row = {"options": opts, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
