"""Where the time of one step goes on the GPU (torch.profiler), on the bench config, bf16, random weights.

    python benchmarks/profile_step.py --out DIR [--what train,decode] [--batch 1] [--seq 4096]

train:  one forward+backward at batch x seq (eager; the loss of bench_gpu.py's training rows: the fused head
        loss + 0.3 MTP, or with --full-logits cross-entropy over full logits, LM only), after a warm-up; the top kernels and ops by
        CUDA time go to DIR/profile_train.txt (and a chrome trace, DIR/train_trace.json.gz)
train_compiled: the same with every block under torch.compile (as `dsv4 train --compile`; includes the compile
        time) -> DIR/profile_train_compiled.txt
train_compiled_graph: the compiled blocks' step replayed from a CUDA graph (`--compile --cuda-graph`)
        -> DIR/profile_train_compiled_graph.txt (with train_compiled in the same call, compiled once for both)
train_graph: the eager step captured in a CUDA graph and replayed (as `dsv4 train --cuda-graph`)
        -> DIR/profile_train_graph.txt
compiled: the decode step compiled before capture: compile time, ms/step, tok/s through generate_stream and its
        kernels (DIR/decode_compiled.txt)
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
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from dsv4.compiling import compile_blocks  # noqa: E402
from dsv4.config import load_config  # noqa: E402
from dsv4.inference.generate import generate, generate_stream  # noqa: E402
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


def profile_train(model, out: Path, b: int, s: int, compiled: bool = False, graph: bool = False,
                  full_logits: bool = False, mtp: bool = True) -> None:
    from dsv4.train.graphed import GraphedStep
    model.train()
    ids = torch.randint(0, model.cfg.vocab_size, (b, s + 1), device="cuda")
    name = "profile_train" + ("_compiled" if compiled else "") + ("_graph" if graph else "")
    t = time.perf_counter()
    if compiled and model.layers[0]._compiled_call_impl is None:   # as `dsv4 train --compile` does (once)
        compile_blocks(model)                            # the MTP block too, as `dsv4 train --compile` does

    from bench_gpu import make_loss                      # the loss of the README table's training rows
    loss = make_loss(model, mtp=mtp and not full_logits, chunked_loss=not full_logits)
    x, y = ids[:, :-1], ids[:, 1:]                       # s tokens in, s targets
    graphed = GraphedStep(model, loss, warmup=2, accumulate=False) if graph else None

    def step():
        if graphed is not None:                           # replayed (the first two calls eager, the third captures)
            graphed(x, y)
        else:
            loss(x, y)[0].backward()
        model.zero_grad(set_to_none=True)
    for _ in range(3 if graph else 2):
        step()
    torch.cuda.synchronize()
    head = f"compile + 2 warm-up steps {time.perf_counter() - t:.1f} s\n" if compiled else ""
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
    wall = sorted(walls)[1]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True, with_stack=True) as prof:
        step()
        torch.cuda.synchronize()
    txt = head + f"train b{b}x{s}: {wall * 1e3:.1f} ms wall (median of 3), {b * s / wall:,.0f} tok/s\n" + table(prof)
    # which source lines the time comes from (the op table alone cannot say whose copies and multiplies they are)
    txt += "\n\nby op and source line (5 frames):\n" + prof.key_averages(group_by_stack_n=5).table(
        sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60, max_src_column_width=110)
    (out / f"{name}.txt").write_text(txt)
    prof.export_chrome_trace(str(out / "train_trace.json"))
    with open(out / "train_trace.json", "rb") as f, gzip.open(out / f"{name}_trace.json.gz", "wb") as g:
        g.write(f.read())
    os.remove(out / "train_trace.json")
    from profile_summary import summarize, table as kinds_table      # the same kernels grouped by kind
    summary = summarize(out / f"{name}_trace.json.gz")
    (out / f"{name}_kinds.json").write_text(json.dumps(summary, indent=1))
    txt = kinds_table(summary) + "\n\n" + txt
    (out / f"{name}.txt").write_text(txt)
    print(txt[:6000], flush=True)


@torch.inference_mode()
def teacher_forced(model, prompt, steps: int = 24, graph: bool = True) -> list[str]:
    """Logits of the reference path, the eager static step and the graphed step on the same tokens."""
    from dsv4.inference.generate import StaticDecoder, prefill
    ids = torch.tensor([prompt], device="cuda")
    P = ids.shape[1]
    cap = P + steps + 512
    ref_c = model.new_caches(1, cap, mtp=False)
    eager, graphed = StaticDecoder(model, 1, cap, graph=False), StaticDecoder(model, 1, cap, graph=graph)
    ref, e, g = prefill(model, ids, ref_c), eager.prefill(ids), graphed.prefill(ids)
    worst = {"static_vs_ref": 0.0, "graph_vs_static": 0.0}
    flips = 0
    for pos in range(P, P + steps):
        tok = ref.argmax(-1, keepdim=True)
        flips += int(not torch.equal(tok, e.argmax(-1, keepdim=True)))
        ref = model(tok, pos, ref_c)[:, -1].float()
        e = eager.step(tok, pos).float().clone()
        g = graphed.step(tok, pos).float().clone()
        worst["static_vs_ref"] = max(worst["static_vs_ref"], float((e - ref).norm() / ref.norm()))
        worst["graph_vs_static"] = max(worst["graph_vs_static"], float((g - e).norm() / e.norm()))
    top2 = ref.topk(2, -1).values[0]
    return [f"teacher-forced {steps} steps: max rel logit diff {worst}; argmax flips static vs ref {flips}; "
            f"last top-2 logit gap {float(top2[0] - top2[1]):.4f} (logit std {float(ref.std()):.4f})"]


@torch.inference_mode()
def profile_decode(model, out: Path) -> None:
    from dsv4.inference.generate import release_static_decoder
    from dsv4.model.mhc import Fusion
    model.eval()
    V = model.cfg.vocab_size
    prompt = torch.randint(0, V, (2048,)).tolist()
    lines = teacher_forced(model, prompt)
    res = {}
    for name, cg, fuse in (("reference", False, True), ("graph, unfused mHC", None, False), ("graph", None, True)):
        Fusion.enabled = fuse
        release_static_decoder(model)
        t = time.perf_counter()
        generate(model, prompt, max_new_tokens=8, cuda_graph=cg)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        t = time.perf_counter()
        toks = generate(model, prompt, max_new_tokens=64, cuda_graph=cg)
        torch.cuda.synchronize()
        res[name] = toks
        lines.append(f"{name}: first call (capture) {first:.2f} s; 64 new tokens incl. prefill {time.perf_counter() - t:.3f} s")
        if cg is None:
            dec = model.__dict__["_static_decoder"]
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(50):
                dec.graph.replay()
            torch.cuda.synchronize()
            lines.append(f"  graph replay: {(time.perf_counter() - t) / 50 * 1e3:.3f} ms/step")
    Fusion.enabled = True
    lines.append(f"greedy tokens (64) equal to reference: {[res[k] == res['reference'] for k in res]}")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.graph.replay()
        torch.cuda.synchronize()
    lines.append(table(prof, 30))
    txt = "\n".join(lines)
    (out / "profile_decode.txt").write_text(txt)
    print(txt[:5000], flush=True)


def decode_fp32(model, out: Path) -> None:
    """Exactness of the static step on the real config: in fp32 (reference experts loop, no graph) the static
    step must match the reference path to rounding. (Not under inference mode: the dtype casts would turn the
    parameters into inference tensors, which training afterwards cannot use.)"""
    model.float()
    prompt = torch.randint(0, model.cfg.vocab_size, (2048,)).tolist()
    txt = "fp32 " + teacher_forced(model, prompt, 24, graph=False)[0]
    model.bfloat16()
    (out / "decode_fp32.txt").write_text(txt)
    print(txt, flush=True)


@torch.inference_mode()
def decode_compiled(model, out: Path) -> None:
    """The graphed step with torch.compile of the whole step before capture: compile time and ms/step."""
    from dsv4.inference.generate import StaticDecoder, release_static_decoder
    model.eval()
    prompt = torch.randint(0, model.cfg.vocab_size, (2048,)).tolist()
    ref = generate(model, prompt, max_new_tokens=32)
    StaticDecoder.compile_step = True
    release_static_decoder(model)
    t = time.perf_counter()
    toks = generate(model, prompt, max_new_tokens=32)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    dec = model.__dict__["_static_decoder"]
    t = time.perf_counter()
    for _ in range(50):
        dec.graph.replay()
    torch.cuda.synchronize()
    txt = (f"compiled step: first call {first:.1f} s; replay {(time.perf_counter() - t) / 50 * 1e3:.3f} ms/step; "
           f"tokens equal to the uncompiled graph: {toks == ref}")
    for _ in range(2):        # end to end through generate_stream (as bench_gpu.py's decode rows): first token to last
        stamps = [time.perf_counter() for _ in generate_stream(model, [prompt], 256)]
        txt += f"\ngenerate_stream b1, 256 new tokens: {(len(stamps) - 1) / (stamps[-1] - stamps[0]):.1f} tok/s"
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dec.graph.replay()
        torch.cuda.synchronize()
    txt += "\n" + table(prof, 40)
    StaticDecoder.compile_step = False
    release_static_decoder(model)
    (out / "decode_compiled.txt").write_text(txt)
    print(txt, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--what", default="decode,train")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--full-logits", action="store_true",
                    help="train*: LM cross-entropy over full logits, no MTP (the transformers baseline's loss)")
    ap.add_argument("--no-mtp", action="store_true",
                    help="train*: the fused head loss without MTP (the README's headline training row)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build(load_config(args.config))
    kw = dict(full_logits=args.full_logits, mtp=not args.no_mtp)     # the training profiles' loss
    if "fp32" in args.what.split(","):
        decode_fp32(model, out)
    if "decode" in args.what.split(","):
        profile_decode(model, out)
    if "compiled" in args.what.split(","):
        decode_compiled(model, out)
    if "train" in args.what.split(","):
        profile_train(model, out, args.batch, args.seq, **kw)
    if "train_graph" in args.what.split(","):
        profile_train(model, out, args.batch, args.seq, **kw, graph=True)
    if "train_compiled" in args.what.split(","):
        profile_train(model, out, args.batch, args.seq, **kw, compiled=True)
    if "train_compiled_graph" in args.what.split(","):                 # (compiled once for both)
        profile_train(model, out, args.batch, args.seq, **kw, compiled=True, graph=True)
    print(json.dumps({"done": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
