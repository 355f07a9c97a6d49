"""Does `dsv4 train --compile` (every block under torch.compile, in place) compute the same training step as eager?

    python benchmarks/compile_check.py [--config benchmarks/bench_small.json] [--seq 1024] --out DIR

On the GPU, one LM-loss step on the same random weights and tokens: loss and all gradients of the eager fp32 model
against the compiled fp32 model (should agree to fp32 rounding), and, as the scale against which bf16 numbers are
read, eager bf16 against eager fp32; then the compiled bf16 model against eager bf16. Per comparison the six
parameters whose gradients differ most. Writes DIR/compile_check.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
from dsv4.compiling import compile_blocks  # noqa: E402
from dsv4.config import load_config  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402


def step(model, ids) -> tuple[float, torch.Tensor]:
    logits = model(ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    # every parameter (zeros where no gradient, e.g. experts no token was routed to)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten()
             for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def worst(a: dict, b: dict, n: int = 6) -> dict:
    """The n parameters whose gradients are furthest apart (relative to their own norm)."""
    rels = {k: float((a[k] - b[k]).norm() / (b[k].norm() + 1e-30)) for k in b}
    return dict(sorted(rels.items(), key=lambda kv: -kv[1])[:n])


def rel(a: dict, b: dict) -> float:
    """All gradients together."""
    a, b = torch.cat([a[k] for k in b]), torch.cat(list(b.values()))
    return float((a - b).norm() / b.norm())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = init_weights(Transformer(load_config(args.config)), seed=0).to("cuda").train()
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.seq), device="cuda")
    model.bfloat16()
    loss16, g16 = step(model, ids)
    model.float()                          # exact: the fp32 runs use the same bf16-rounded weights
    loss32, g32 = step(model, ids)
    compile_blocks(model)
    t = time.time()
    lossc, gc = step(model, ids)
    compile_s = time.time() - t
    model.bfloat16()                       # the compiled blocks again in bf16 (recompiled for the dtype)
    lossc16, gc16 = step(model, ids)
    res = {"config": Path(args.config).name, "seq": args.seq, "compile_s": compile_s,
           "bf16_compiled_vs_bf16_eager": {"loss_rel": abs(lossc16 - loss16) / abs(loss16), "grad_rel": rel(gc16, g16),
                                           "worst": worst(gc16, g16)},
           "fp32_compiled_vs_eager": {"loss_rel": abs(lossc - loss32) / abs(loss32), "grad_rel": rel(gc, g32),
                                      "worst": worst(gc, g32)},
           "bf16_eager_vs_fp32_eager (weights rounded to bf16 in both)":
               {"loss_rel": abs(loss16 - loss32) / abs(loss32), "grad_rel": rel(g16, g32), "worst": worst(g16, g32)}}
    print(json.dumps(res, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "compile_check.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
