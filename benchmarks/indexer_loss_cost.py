"""What the CSA indexers' KL loss costs in `dsv4 train`'s step (fp32 weights, bf16 autocast, compute_loss) on the
bench config: step time with indexer_weight 1 and 0 at b×4096, then the largest CUDA kernels of one step with it.

    python benchmarks/indexer_loss_cost.py --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402
from bench_gpu import log, timed  # noqa: E402

from dsv4.model import Transformer, init_weights  # noqa: E402
from dsv4.train.recipe import compute_loss  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent / "bench_small.json"))
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    cfg = bench_gpu.start_results(args.out, "indexer_loss_cost.json", args.config)
    model = init_weights(Transformer(cfg), seed=0).cuda().train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, 4097), device="cuda")
    x, y = ids[:, :-1], ids[:, 1:]

    def step(weight):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            parts = compute_loss(model, x, y, 0.3, 1e-4, weight)
        parts.total.backward()
        model.zero_grad(set_to_none=True)
        return parts

    for weight in (1.0, 0.0, 1.0):
        step(weight)
        step(weight)
        log(what="step", indexer_weight=weight, batch=args.batch, seq=4096, s=timed(lambda: step(weight), 3))
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(1.0)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    (Path(args.out) / "indexer_loss_profile.txt").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
