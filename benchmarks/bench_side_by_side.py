"""dsv4 against Hugging Face transformers on the same GPU, same config (bench_small.json), bf16, random weights.

    python benchmarks/bench_side_by_side.py run --out DIR [--dsv4-timeout 330] [--hf-timeout 240]
    python benchmarks/bench_side_by_side.py table --dsv4 DIR/dsv4_gpu.json [DIR2/dsv4_gpu.json] --hf DIR/hf.jsonl \
        [DIR2/hf.jsonl] --out benchmarks/results

`run` measures both in one go, each in its own subprocess (an HF out-of-memory or crash cannot take the dsv4
numbers with it): benchmarks/bench_gpu.py (train, decode, prefill) then benchmarks/hf_baseline.py, whose JSON
lines go to DIR/hf.jsonl. `table` joins the two into side_by_side.md (dsv4 vs transformers per metric, with a
speedup column, date, GPU, torch, transformers and the git commit) and side_by_side.json.

Metric notes: train = forward+backward of the LM loss (no MTP) at b x 4096; prefill = no-grad forward that
keeps the last position's logits (dsv4: one pass to 32K, then chunked through the KV cache); decode = greedy
tokens/s after a 2048-token prompt (dsv4: CUDA-graphed static decode step, prefill time subtracted;
transformers: model.generate with its own cache, 128 new tokens, prefill included — ~1% of that time).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t = time.time()
    cmd = [sys.executable, str(HERE / "bench_gpu.py"), "--out", str(out), "--sections", args.sections,
           "--max-context", str(args.max_context), "--budget-s", str(args.dsv4_timeout - 90), "--fusion", args.fusion]
    try:
        subprocess.run(cmd, env=env, timeout=args.dsv4_timeout)
    except subprocess.TimeoutExpired:
        print(f"dsv4 part stopped at its {args.dsv4_timeout} s limit", flush=True)
    print(f"dsv4 part: {time.time() - t:.0f} s", flush=True)
    t = time.time()
    with open(out / "hf.jsonl", "w") as f:
        try:
            p = subprocess.run([sys.executable, str(HERE / "hf_baseline.py")], env=env, timeout=args.hf_timeout,
                               capture_output=True, text=True)
            stdout, rc = p.stdout, p.returncode
            sys.stderr.write(p.stderr[-3000:])
        except subprocess.TimeoutExpired as e:
            stdout, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        for line in stdout.splitlines():
            if line.startswith("{"):
                f.write(line + "\n")
        try:
            import transformers
            f.write(json.dumps({"what": "env", "transformers": transformers.__version__, "rc": rc}) + "\n")
        except ImportError:
            f.write(json.dumps({"what": "env", "transformers": None, "rc": rc}) + "\n")
    print(stdout[-3000:], flush=True)
    print(f"transformers part: {time.time() - t:.0f} s (exit {rc})", flush=True)
    return 0


def _fmt(v, digits=0):
    return "-" if v is None else f"{v:,.{digits}f}"


def table(args) -> int:
    if len(args.hf) not in (1, len(args.dsv4)):
        raise SystemExit(f"--hf: one file, or one per --dsv4 file ({len(args.dsv4)}), not {len(args.hf)}")
    # several runs: the first that has a row wins; each row's transformers number comes from the same run's
    # hf.jsonl where one is given per run (rows tagged with their run's index)
    ours = [dict(r, _run=i) for i, path in enumerate(args.dsv4) for r in json.loads(Path(path).read_text())]
    hf_runs = [[json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()] for p in args.hf]
    hf = hf_runs[0]

    def hf_for(a) -> list:
        """transformers' records of the run that measured dsv4's row a (the first hf file if one, or no row)."""
        return hf_runs[a["_run"]] if a and len(hf_runs) > 1 else hf
    envs = [r for r in ours if r["what"] == "env"]
    env = envs[0]
    hf_env = {}
    for r in hf:
        if r["what"] in ("params", "env"):
            hf_env.update(r)
    commit = args.commit
    if not commit:          # the device has no .git: the measured commit is the one checked out when rendering
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=HERE).stdout.strip() or "?"
        except OSError:
            commit = "?"
    rows = []

    def add(metric, size, a, b, unit="tok/s", note=""):
        speed = (a / b) if a and b else None
        rows.append({"metric": metric, "size": size, "dsv4": a, "transformers": b, "unit": unit,
                     "speedup": speed, "note": note})

    # LM-loss steps against transformers' (same loss); `dsv4 train`'s own step (LM + MTP + balance (+ indexer),
    # fp32 weights under autocast) has no transformers counterpart: listed without one
    train_rows = [(impl, False) for impl in ("eager", "CUDA graph", "compiled blocks", "compiled blocks, CUDA graph")]
    train_rows += [(impl, True) for impl in ("dsv4 train step (fp32 weights, bf16 autocast)",
                                             "dsv4 train step without the indexer loss", "dsv4 train step, CUDA graph")]
    # runs since the indexer loss (which also measure the step without it) include it in the recipe rows
    with_indexer = any(r.get("impl") == "dsv4 train step without the indexer loss" for r in ours)
    for (impl, recipe), bsz in ((row, b) for row in train_rows for b in (1, 2)):
        a = next((r for r in ours if r["what"] == "train" and bool(r.get("mtp")) == recipe and r["batch"] == bsz
                  and r.get("impl") == impl and not r.get("oom")), None)
        b = None if recipe else next((r for r in hf_for(a) if r["what"] == "train" and r.get("bsz") == bsz), None)
        if a is None and impl != "eager":
            continue
        add("train fwd+bwd" + (f" ({impl})" if impl != "eager" else ""), f"b{bsz}x4096",
            a and a["tok_s"], b and b.get("tok_s"),
            note=(f"dsv4 MFU {100 * a['mfu']:.1f}%, {a['peak_gib']:.1f} GiB" if a else "")
            + (f"; HF {b['peak_gib']:.1f} GiB" if b and not b.get("oom") else "; HF OOM" if b else "")
            + (f"; LM + MTP + balance{' + indexer' if with_indexer and 'without' not in impl else ''} losses, "
               "no transformers counterpart" if recipe else ""))
    seqs = sorted({r["seq"] for r in ours + hf if r["what"] == "prefill"})
    for s in seqs:
        a = next((r for r in ours if r["what"] == "prefill" and r["seq"] == s), None)
        b = next((r for r in hf_for(a) if r["what"] == "prefill" and r["seq"] == s), None)
        note = []
        if a:
            note.append("dsv4 OOM" if a.get("oom") else f"dsv4 {a['peak_gib']:.1f} GiB ({a['mode']})")
        if b:
            note.append("HF OOM" if b.get("oom") else f"HF {b['peak_gib']:.1f} GiB")
        else:
            note.append("HF not run (stopped at its first OOM)" if any(r["what"] == "prefill" and r.get("oom")
                                                                       for r in hf_for(a)) else "HF not run")
        add("prefill", f"{s:,}", a and a.get("tok_s"), b and b.get("tok_s"), note="; ".join(note))
    for r in ours:
        if r["what"] == "decode" and not r.get("oom"):
            hf_dec = next((x for x in hf_for(r) if x["what"] == "decode" and "tok_s" in x), None)
            label = ("decode (compiled step, CUDA graph)" if r.get("compiled") else
                     "decode (CUDA graph)" if r.get("cuda_graph", True) else "decode (reference path, no graph)")
            b = hf_dec["tok_s"] if hf_dec and r["batch"] == 1 else None
            add(label, f"batch {r['batch']}", r["tok_s"], b,
                note=f"{r['tok_s_per_seq']:.1f} tok/s per sequence" + ("" if r["batch"] == 1 else "; HF not measured"))
    date = dt.date.today().isoformat()
    head = (f"# dsv4 vs transformers, {env['gpu']}\n\n"
            f"date {date} · torch {env['torch']} · transformers {hf_env.get('transformers', '?')} · "
            f"dsv4 commit {commit} · config benchmarks/bench_small.json ({env['params']['total'] / 1e9:.2f}B "
            f"params, {env['params']['active'] / 1e6:.0f}M active), bf16, random weights · "
            f"bf16 matmul peak measured {env['bf16_peak_tflops']:.0f} TFLOP/s"
            + "".join(f" · mHC switches ({i + 1}) {r['fusion']}" for i, r in enumerate(envs) if "fusion" in r)
            + "\n\n" + (f"{args.note}\n\n" if args.note else "")
            + "| metric | size | dsv4 | transformers | speedup | note |\n|---|---|---|---|---|---|\n")
    def line(r):
        speed = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        a, b = r["dsv4"], r["transformers"]
        return (f"| {r['metric']} | {r['size']} | {_fmt(a, 1 if a and a < 100 else 0)} | "
                f"{_fmt(b, 1 if b and b < 100 else 0)} | {speed} | {r['note']} |")
    body = "\n".join(line(r) for r in rows)
    runs = ("one device run: dsv4 then transformers, each in its own process" if len(args.dsv4) == 1 else
            f"{len(args.dsv4)} device runs, each row's dsv4 and transformers numbers from the same run"
            if len(args.hf) > 1 else
            f"dsv4's rows from {len(args.dsv4)} device runs, the first with transformers in the same run")
    foot = (f"\n\nUnits: tokens/s. Produced by `benchmarks/bench_side_by_side.py` ({runs}); raw numbers in "
            "side_by_side.json.\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "side_by_side.md").write_text(head + body + foot)
    (out / "side_by_side.json").write_text(json.dumps(
        {"date": date, "gpu": env["gpu"], "torch": env["torch"], "transformers": hf_env.get("transformers"),
         "commit": commit, "rows": rows, "dsv4_raw": ours,
         "transformers_raw": hf if len(hf_runs) == 1 else hf_runs}, indent=1))
    print(head + body)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.environ.get("OUT", "out"))
    r.add_argument("--sections", default="check,train,decode,prefill")
    r.add_argument("--max-context", type=int, default=1 << 18)
    r.add_argument("--dsv4-timeout", type=int, default=330)
    r.add_argument("--hf-timeout", type=int, default=240)
    r.add_argument("--fusion", default="", help="passed to bench_gpu.py (mHC fast-path switches, e.g. pre_kernel=1)")
    t = sub.add_parser("table")
    t.add_argument("--dsv4", required=True, nargs="+",
                   help="dsv4_gpu.json of one run, or of several runs (e.g. training and inference in two device "
                        "calls; say which in --note); where two have the same row, the first file's is used")
    t.add_argument("--hf", required=True, nargs="+",
                   help="hf.jsonl of the run, or one per --dsv4 file (in the same order): each row's transformers "
                        "number then comes from the run that measured dsv4's")
    t.add_argument("--out", default=str(HERE / "results"))
    t.add_argument("--commit", help="the commit the numbers were measured at (default: the checked-out HEAD)")
    t.add_argument("--note", help="a line printed under the header (e.g. which rows come from which run)")
    args = ap.parse_args()
    return run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    sys.exit(main())
