"""Why the bench model's training step fails CUDA-graph capture (the tiny model's captures): one variant per
subprocess, each reporting whether capture + replay worked, and the C++ stack of the first failing CUDA call.

    TORCH_SHOW_CPP_STACKTRACES=1 python benchmarks/graph_capture_diag.py --out DIR
Variants: bf16 weights (as bench_gpu.py) with capture_error_mode global / thread_local; fp32 weights under
bf16 autocast (as `dsv4 train`)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def one(variant: str, out: Path) -> None:
    import torch
    from dsv4.config import load_config
    from dsv4.model import Transformer, init_weights
    from dsv4.train.graphed import GraphedStep
    cfg = load_config(HERE / "bench_small.json")
    torch.manual_seed(0)
    model = init_weights(Transformer(cfg), seed=0).cuda()
    amp = variant == "autocast"
    if not amp:
        model = model.to(torch.bfloat16)
    Transformer.head_fp32 = False
    model.train()

    def loss_of(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss, h = model(x, return_hidden=True, targets=y)
            return (loss + 0.3 * model.mtp_forward(h[:, :-1], y[:, :-1], targets=y[:, 1:]),)
    ids = torch.randint(0, cfg.vocab_size, (1, 2049), device="cuda")
    x, y = ids[:, :-1], ids[:, 1:]
    step = GraphedStep(model, loss_of, warmup=2,
                       capture_error_mode="thread_local" if variant == "thread_local" else "global")
    rec = {"variant": variant}
    try:
        for i in range(4):
            model.zero_grad(set_to_none=False)
            rec[f"loss{i}"] = float(step(x, y)[0])
        rec["ok"] = True
        torch.cuda.synchronize()
        import time
        t = time.perf_counter()
        for _ in range(3):
            step(x, y)
        torch.cuda.synchronize()
        rec["replay_ms"] = (time.perf_counter() - t) / 3 * 1e3
    except Exception as e:  # noqa: BLE001
        rec["ok"] = False
        rec["error"] = str(e)[:500]
        (out / f"trace_{variant}.txt").write_text(traceback.format_exc()[-20000:])
    print(json.dumps(rec), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--variant")
    ap.add_argument("--variants", default="global,thread_local,autocast")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variant:
        one(args.variant, out)
        return 0
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1", PYTHONUNBUFFERED="1")
    for v in args.variants.split(","):
        subprocess.run([sys.executable, __file__, "--out", str(out), "--variant", v], env=env, timeout=150)
    return 0


if __name__ == "__main__":
    sys.exit(main())
