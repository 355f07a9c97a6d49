"""GPU time of a profiled step by kind of kernel, from the chrome trace `profile_step.py` writes.

    python benchmarks/profile_summary.py TRACE.json.gz [--json OUT.json]

The op table of torch.profiler lists kernels one by one; the question "where is the step's time, and what
would a 10x step have to cut" needs them grouped: tensor-core GEMMs (dense and the experts' grouped GEMM),
fp32 GEMMs on the CUDA cores, dsv4's own Triton kernels (attention, head loss, mHC, indexer), the
elementwise/reduction kernels Inductor generates, and ATen's own kernels. Also the GPU's idle time inside the
profiled window (first kernel start to last kernel end, minus the time some kernel ran), which a CUDA-graph
step should keep near zero.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# (kind, pattern on the kernel name), first match wins
KINDS = [
    ("grouped GEMM (experts, bf16)", r"GroupProblemShape|prepare_grouped_gemm"),
    ("fp32 GEMM (CUDA cores)", r"f32f32_f32f32|sgemm|simt_sgemm"),
    ("GEMM (bf16 tensor cores)", r"nvjet|cutlass|gemm|xmma"),
    ("dsv4 attention (Triton)", r"^_(fwd_kernel|bwd_kernel|dkv_window_kernel)"),
    ("dsv4 head loss (Triton)", r"^_ce_"),
    ("dsv4 mHC (Triton)", r"^_(sinkhorn_|pre_|expand_|mix_)"),
    ("dsv4 indexer (Triton)", r"^_scores_kernel"),
    ("Inductor fused (Triton)", r"^triton_"),
    ("top-k / sort (ATen)", r"topk|sort|radix"),
    ("ATen other", r""),
]


def load(path: Path) -> list[dict]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")
            and e.get("ph") == "X"]


def kind_of(name: str) -> str:
    for kind, pat in KINDS:
        if re.search(pat, name):
            return kind
    return KINDS[-1][0]


def busy_us(events: list[dict]) -> float:
    """Time at least one kernel ran (overlapping kernels on several streams counted once)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarize(path: Path) -> dict:
    events = load(path)
    if not events:
        raise SystemExit(f"{path}: no GPU kernels in this trace")
    by_kind: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "launches": 0, "names": defaultdict(float)})
    for e in events:
        k = by_kind[kind_of(e["name"])]
        k["ms"] += e["dur"] / 1e3
        k["launches"] += 1
        k["names"][e["name"][:70]] += e["dur"] / 1e3
    window = (max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)) / 1e3
    busy = busy_us(events) / 1e3
    kinds = {kind: {"ms": v["ms"], "launches": v["launches"],
                    "top": sorted(v["names"].items(), key=lambda kv: -kv[1])[:4]}
             for kind, v in sorted(by_kind.items(), key=lambda kv: -kv[1]["ms"])}
    return {"trace": str(path), "window_ms": window, "busy_ms": busy, "idle_ms": window - busy,
            "kernel_ms": sum(v["ms"] for v in kinds.values()), "launches": len(events), "kinds": kinds}


def table(s: dict) -> str:
    rows = [f"GPU window {s['window_ms']:.1f} ms: busy {s['busy_ms']:.1f} ms, idle {s['idle_ms']:.1f} ms; "
            f"{s['launches']} kernels, {s['kernel_ms']:.1f} ms summed",
            "", "| kind | ms | share | launches | largest |", "|---|---|---|---|---|"]
    for kind, v in s["kinds"].items():
        top = "; ".join(f"{n} {ms:.2f}" for n, ms in v["top"][:3])
        rows.append(f"| {kind} | {v['ms']:.1f} | {100 * v['ms'] / s['kernel_ms']:.0f}% | {v['launches']} | {top} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path, help="chrome trace of profile_step.py (*_trace.json.gz)")
    ap.add_argument("--json", type=Path, help="also write the summary as JSON here")
    args = ap.parse_args()
    if not args.trace.is_file():
        ap.error(f"{args.trace}: no such file")
    try:
        s = summarize(args.trace)
    except (json.JSONDecodeError, KeyError, OSError) as e:
        ap.error(f"{args.trace}: not a chrome trace ({type(e).__name__}: {e})")
    print(table(s))
    if args.json:
        args.json.write_text(json.dumps(s, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
