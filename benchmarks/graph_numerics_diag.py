"""Why tests/test_graphed.py's replay differed from the eager step on the H100 (loss 8.7027 vs 8.6988 at the
first, still eager, call): the same bf16-autocast training step of the random tiny model on one batch, run
eagerly on the default stream or on a side stream (as GraphedStep's warm-up and its graph do), with the ids as
strided views or contiguous (GraphedStep makes them contiguous), twice each; then GraphedStep's own calls.
Prints the loss and the distance of all gradients from the first form's, per batch.

    python benchmarks/graph_numerics_diag.py --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent / "tests"))

from conftest import random_tiny  # noqa: E402
from dsv4.train.graphed import GraphedStep  # noqa: E402
from test_graphed import _loss as loss_fn  # noqa: E402 - the very step that test compares


def run(model, x, y, stream: str):
    model.zero_grad(set_to_none=True)
    side = torch.cuda.Stream() if stream == "side" else torch.cuda.current_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        total, lm = loss_fn(model)(x, y)
        total.backward()
    torch.cuda.current_stream().wait_stream(side)
    return float(total), grads(model)


def grads(model):
    """Every parameter's gradient, flat (zeros where none: GraphedStep gives every parameter one)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
                      for p in model.parameters()])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, graphed = random_tiny().cuda().train(), random_tiny().cuda().train()
    step = GraphedStep(graphed, loss_fn(graphed), warmup=1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        ids = torch.randint(0, model.cfg.vocab_size, (2, 65), generator=g).cuda()
        x, y = ids[:, :-1], ids[:, 1:]
        base = None
        for stream in ("default", "side"):
            for layout in ("strided", "contiguous"):
                for rep in range(2):
                    xx, yy = (x, y) if layout == "strided" else (x.contiguous(), y.contiguous())
                    loss, gr = run(model, xx, yy, stream)
                    base = base or (loss, gr)
                    rows.append(dict(batch=i, form=f"{stream}/{layout}/{rep}", loss=loss,
                                     grad_rel=float((gr - base[1]).norm() / base[1].norm())))
                    print(json.dumps(rows[-1]), flush=True)
        graphed.zero_grad(set_to_none=False)
        total = float(step(x, y)[0])
        gr = grads(graphed)
        rows.append(dict(batch=i, form="GraphedStep" + (" (eager warm-up)" if i == 0 else " (replay)"), loss=total,
                         grad_rel=float((gr - base[1]).norm() / base[1].norm())))
        print(json.dumps(rows[-1]), flush=True)
    (out / "graph_numerics_diag.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
