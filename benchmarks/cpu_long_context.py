"""Long context on a CPU: prefill a tiny V4 (every layer type, binding top-k) at up to 64K tokens, then decode,
and record time and peak memory (issue #3: memory must follow O(seq x (top-k + window)), no dense masks).

    python benchmarks/cpu_long_context.py [--lengths 4096,16384,65536] [--out benchmarks/results/cpu_long_context.json]

Each length runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. Reported per length: prefill mode
(one pass, or chunks of 8192 through the KV cache), seconds, tokens/s, peak RSS, the RSS before the prefill
(model + Python), the allocated KV-cache bytes, and decode tokens/s for 16 greedy tokens after the prompt.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(length: int, one_pass: bool) -> dict:
    import torch
    sys.path.insert(0, str(HERE.parent / "src"))
    import dsv4
    from dsv4.inference.generate import prefill
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = dsv4.preset("tiny").replace(max_position_embeddings=length + 64)
    model = dsv4.build(cfg, seed=0).eval()
    ids = torch.randint(2, cfg.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.inference_mode():
        caches = model.new_caches(1, length + 16, mtp=False)
        t = time.perf_counter()
        logits = prefill(model, ids, caches, chunk=length if one_pass else 8192)
        s = time.perf_counter() - t
        nxt = logits.argmax(-1, keepdim=True)
        t = time.perf_counter()
        for i in range(16):
            nxt = model(nxt, length + i, caches)[:, -1].argmax(-1, keepdim=True)
        d = time.perf_counter() - t
    return {"seq": length, "mode": "one pass" if one_pass else "chunks of 8192 via KV cache", "prefill_s": s,
            "prefill_tok_s": length / s, "decode_tok_s": 16 / d, "kv_cache_bytes": sum(c.nbytes() for c in caches),
            "rss_before_prefill_mib": base / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="4096,16384,65536")
    ap.add_argument("--out", default=str(HERE / "results" / "cpu_long_context.json"))
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(one(int(args._child[0]), args._child[1] == "1")))
        return 0
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        for one_pass in ((True, False) if n > 8192 else (True,)):
            r = subprocess.run([sys.executable, __file__, "--_child", str(n), "1" if one_pass else "0"],
                               capture_output=True, text=True)
            if r.returncode:
                print(r.stderr, file=sys.stderr)
                return r.returncode
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            x = rows[-1]
            print(f"{x['seq']:>7} {x['mode']:<28} prefill {x['prefill_s']:7.1f} s ({x['prefill_tok_s']:6.0f} tok/s)"
                  f"  decode {x['decode_tok_s']:5.1f} tok/s  peak RSS {x['peak_rss_mib']:7.0f} MiB"
                  f"  (before prefill {x['rss_before_prefill_mib']:.0f})  KV {x['kv_cache_bytes'] / 2**20:.1f} MiB",
                  flush=True)
    import torch
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "model": "tiny preset, fp32, random"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
