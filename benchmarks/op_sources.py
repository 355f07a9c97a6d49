"""Which source lines issue the small ops of a training step: dtype copies, concatenations, multiplies.

The profiler's op table says that a b2×4096 step spends 34 ms in 1,057 `aten::copy_` calls, but not whose they
are (its stack grouping came back empty on the H100). Here one LM-loss training step runs under a dispatch mode
that records, for each op of interest, the innermost dsv4 frame of the Python stack that issued it, with the
bytes it wrote. Ops run by the backward are attributed to the forward line whose autograd node runs them
(autograd's anomaly mode keeps each node's forward stack; it slows this one counted step, nothing else).

    python benchmarks/op_sources.py --out DIR [--batch 1] [--seq 1024] [--ops copy,cat,mul]

On CUDA the bench config in bf16 (as bench_gpu.py's train rows), on the CPU the tiny preset (a check that it
runs; the CPU takes other paths). The counted step runs mHC uncompiled (`Fusion.enabled` off: a compiled
function under a dispatch mode is not what the real step runs either way), so mHC lines count ops that
inductor fuses in the real step; attention, compressor, indexer and MoE lines are the step's own. Writes DIR/op_sources.txt and DIR/op_sources.json, sorted by bytes written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from dsv4.config import load_config  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402
from dsv4.model.mhc import Fusion  # noqa: E402

SRC = str(HERE.parent / "src" / "dsv4")
FAMILIES = {"copy": ("copy_", "_to_copy", "clone", "contiguous"), "cat": ("cat", "stack"), "mul": ("mul",),
            "add": ("add",), "index": ("index", "index_put", "index_add", "gather", "scatter")}


def _forward_site() -> str | None:
    for fr in reversed(traceback.extract_stack()):
        if fr.filename.startswith(SRC):
            return f"{os.path.relpath(fr.filename, SRC)}:{fr.lineno} {(fr.line or '').strip()[:70]}"
    return None


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*(.*)')


def _backward_site() -> str | None:
    """In the backward: the innermost dsv4 line of the forward stack that autograd's anomaly mode stored in the
    node now running; "(backward)" where there is none; None outside any dsv4 code (the loss, the optimizer)."""
    node = torch._C._current_autograd_node()
    if node is None:
        return None
    frames = [m for m in _FRAME.findall("".join(node.metadata.get("traceback_", []))) if m[0].startswith(SRC)]
    if not frames:
        return f"(backward: {node.name()})"
    f, line, code = frames[-1]
    return f"(bwd) {os.path.relpath(f, SRC)}:{line} {code.strip()[:64]}"


class SourceCounter(TorchDispatchMode):
    """Counts ops whose name starts with one of `names` by the innermost frame under src/dsv4 that called them."""

    def __init__(self, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        self.rows: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = func.__name__.split(".")[0]
        if op.startswith(self.names):
            site = _forward_site() or _backward_site()
            if site is None:
                return out
            written = sum(t.numel() * t.element_size() for t in (out if isinstance(out, (tuple, list)) else [out])
                          if isinstance(t, torch.Tensor))
            row = self.rows[(op, site)]
            row[0] += 1
            row[1] += written
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--ops", default="copy,cat,mul", help=f"op families: {', '.join(FAMILIES)}")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    cfg = load_config(args.config if cuda else "tiny")
    torch.manual_seed(0)
    model = init_weights(Transformer(cfg), seed=0)
    model = model.to(device="cuda", dtype=torch.bfloat16) if cuda else model
    Transformer.head_fp32 = False
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda" if cuda else "cpu")

    def step():
        F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
    Fusion.enabled = False                    # mHC uncompiled (see above)
    step()                                    # warm-up: kernels; not counted
    names = tuple(n for fam in args.ops.split(",") for n in FAMILIES[fam])
    counter = SourceCounter(names)
    with counter, torch.autograd.detect_anomaly(check_nan=False):
        step()
    rows = sorted(((op, site, n, b) for (op, site), (n, b) in counter.rows.items()), key=lambda r: -r[3])
    lines = [f"one LM training step, b{args.batch}x{args.seq}, {'bench config bf16 on ' + torch.cuda.get_device_name() if cuda else 'tiny preset on the CPU'}",
             f"{'op':<14} {'calls':>6} {'MiB written':>12}  source (innermost dsv4 frame)"]
    lines += [f"{op:<14} {n:>6} {b / 2 ** 20:>12.1f}  {site}" for op, site, n, b in rows]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "op_sources.txt").write_text("\n".join(lines) + "\n")
    (Path(args.out) / "op_sources.json").write_text(json.dumps(
        [dict(op=op, site=site, calls=n, bytes=b) for op, site, n, b in rows], indent=1))
    print("\n".join(lines[:60]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
