"""Memory of the training loss at V4's 129K vocabulary: full logits + cross-entropy against the fused, chunked head +
cross-entropy of `Transformer.forward(targets=...)` (what `dsv4 train` runs), on the CPU.

    python benchmarks/cpu_loss_memory.py [--batch 4] [--seq 2048] [--out benchmarks/results/cpu_loss_memory.json]

The tiny preset with vocab_size 129280, fp32, one forward+backward per mode, each in its own process (peak RSS
is per process): peak RSS growth over the built model, loss, wall time.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def one(mode: str, batch: int, seq: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dsv4.config import preset
    from dsv4.model import Transformer, init_weights
    torch.manual_seed(0)
    cfg = preset("tiny").replace(vocab_size=129280)
    model = init_weights(Transformer(cfg), seed=0).train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    x, y = ids[:, :-1], ids[:, 1:]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) if mode == "full logits" else model(x, targets=y)
    loss.backward()
    return {"mode": mode, "batch": batch, "seq": seq, "loss": float(loss.detach()), "s": time.perf_counter() - t,
            "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_loss_memory.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.batch, args.seq)))
        return 0
    rows = []
    for mode in ("full logits", "fused chunks (forward(targets=...))"):
        p = subprocess.run([sys.executable, __file__, "--one", mode, "--batch", str(args.batch), "--seq",
                            str(args.seq)], capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print("| loss path | tokens | peak RSS growth | forward+backward | loss |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['batch']}x{r['seq']} | {r['peak_rss_growth_mib']:,.0f} MiB | {r['s']:.1f} s | "
              f"{r['loss']:.6f} |")
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
