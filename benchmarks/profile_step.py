"""Where the time of one step goes on the GPU (torch.profiler), on the bench config, bf16, random weights.

    python benchmarks/profile_step.py --out DIR [--what train,decode] [--batch 1] [--seq 4096]

train:  one forward+backward at batch x seq (eager, LM loss), after a warm-up; the top kernels and ops by
        CUDA time go to DIR/profile_train.txt (and a chrome trace, DIR/train_trace.json.gz)
decode: the graphed static decode step against the reference path: same greedy tokens after a 2048-token
        prompt, per-step milliseconds of each, and the kernels of one eager static step (DIR/profile_decode.txt)
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from dsv4.config import load_config  # noqa: E402
from dsv4.inference.generate import generate  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402


def build(cfg) -> Transformer:
    torch.manual_seed(0)
    model = init_weights(Transformer(cfg), seed=0).to(device="cuda", dtype=torch.bfloat16)
    Transformer.head_fp32 = False
    return model


def table(prof, n: int = 40) -> str:
    ka = prof.key_averages()
    total = sum(e.self_device_time_total for e in ka)
    out = [f"total self CUDA time {total / 1e3:.1f} ms"]
    out.append(ka.table(sort_by="self_cuda_time_total", row_limit=n, max_name_column_width=90))
    return "\n".join(out)


def profile_train(model, out: Path, b: int, s: int) -> None:
    model.train()
    ids = torch.randint(0, model.cfg.vocab_size, (b, s), device="cuda")

    def step():
        logits = model(ids)
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
    step()
    step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    txt = f"train b{b}x{s}: {wall * 1e3:.1f} ms wall, {b * s / wall:,.0f} tok/s\n" + table(prof)
    (out / "profile_train.txt").write_text(txt)
    prof.export_chrome_trace(str(out / "train_trace.json"))
    with open(out / "train_trace.json", "rb") as f, gzip.open(out / "train_trace.json.gz", "wb") as g:
        g.write(f.read())
    os.remove(out / "train_trace.json")
    print(txt[:6000], flush=True)


@torch.inference_mode()
def profile_decode(model, out: Path) -> None:
    model.eval()
    V = model.cfg.vocab_size
    prompt = torch.randint(0, V, (2048,)).tolist()
    res = {}
    for name, cg in (("reference", False), ("graph", None)):
        generate(model, prompt, max_new_tokens=8, cuda_graph=cg)
        torch.cuda.synchronize()
        t = time.perf_counter()
        toks = generate(model, prompt, max_new_tokens=32, cuda_graph=cg)
        torch.cuda.synchronize()
        res[name] = (toks, time.perf_counter() - t)
    same = res["reference"][0] == res["graph"][0]
    lines = [f"greedy tokens equal (32 new): {same}",
             f"reference: {res['reference'][1]:.3f} s for 32 (incl. prefill)", f"graph: {res['graph'][1]:.3f} s"]
    dec = model.__dict__["_static_decoder"]
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        dec.graph.replay()
    torch.cuda.synchronize()
    lines.append(f"graph replay: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms/step")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.graph.replay()
        torch.cuda.synchronize()
    lines.append(table(prof, 30))
    txt = "\n".join(lines)
    (out / "profile_decode.txt").write_text(txt)
    print(txt[:5000], flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--what", default="decode,train")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build(load_config(args.config))
    if "decode" in args.what:
        profile_decode(model, out)
    if "train" in args.what:
        profile_train(model, out, args.batch, args.seq)
    print(json.dumps({"done": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
