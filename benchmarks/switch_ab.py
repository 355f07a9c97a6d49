"""A/B of code-path switches on the README's headline row, in one process on one GPU (bench config, bf16).

Each variant is a set of class-attribute switches (`Class.attr=value` with the classes below); the first
variant is the baseline and runs again last, so the spread of one form over the run is beside the differences:

    python benchmarks/switch_ab.py --out DIR [--sections check,train] [--budget-s 400]
        [--variants "default:;hca_atomic:AttnBwd.hca_dkv=atomic;fwd_stages2:AttnFwd.stages=2"]

  check  per variant, the LM loss and all gradients of one eager b2x4096 step against the baseline variant's,
         next to the baseline against itself (the run-to-run floor: 0.0 since stop 30's defaults left no atomic
         add in the step at this shape; a variant that brings atomics back differs by them); with train, each
         variant's compiled blocks are held against the same eager step
  train  per variant, the headline row: compiled blocks + CUDA graph, LM loss through the fused head loss,
         b2x4096 (`bench_gpu.bench_train`); dynamo is reset before each, so the blocks recompile with the
         variant's switches (dynamo does not guard on class attributes)
Writes DIR/switch_ab.json after every record.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import bench_gpu  # noqa: E402
from bench_gpu import build, grads_rel_diff, log, loss_and_grads  # noqa: E402
from dsv4.model import Transformer, hc_pre_kernel, sparse_attention  # noqa: E402
from dsv4.model import sparse_attention_bwd, sparse_attention_fwd  # noqa: E402
from dsv4.model.attention import Attention  # noqa: E402
from dsv4.model.mhc import Fusion  # noqa: E402
from dsv4.model.moe import MoE  # noqa: E402

CLASSES = {"MoE": MoE, "AsOp": sparse_attention.AsOp, "Attention": Attention, "Fusion": Fusion,
           "HcPre": hc_pre_kernel.Config, "AttnFwd": sparse_attention_fwd.Config,
           "AttnBwd": sparse_attention_bwd.Config}
# stop 30's defaults against their old forms: the HCA entries' dk by atomic adds, 16-entry HCA steps; and the
# forward's walks pipelined in 2 stages (not adopted: no gain on top of 32-entry HCA steps)
DEFAULT_VARIANTS = ("default:;hca_atomic:AttnBwd.hca_dkv=atomic;hca_bn16:AttnBwd.walk_block_hca=16;"
                    "fwd_stages2:AttnFwd.stages=2")


def parse_variants(spec: str) -> list[tuple[str, dict[tuple[str, str], object]]]:
    """'label:Class.attr=value,...;label2:...' -> [(label, {(class, attr): value})]; values are Python literals
    where they parse (1, 0, True, 'x'), else strings. Unknown classes or attributes are errors, never ignored."""
    import ast
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        label, _, body = part.partition(":")
        sets = {}
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, _, raw = item.partition("=")
            cls, _, attr = key.partition(".")
            if cls not in CLASSES or not hasattr(CLASSES[cls], attr):
                raise SystemExit(f"--variants: {key!r} is not one of {sorted(CLASSES)}'s attributes")
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
            if isinstance(getattr(CLASSES[cls], attr), bool):
                value = bool(value)
            sets[(cls, attr)] = value
        out.append((label.strip(), sets))
    return out


def apply(sets: dict, defaults: dict) -> None:
    """Every switch any variant touches back to its default, then this variant's."""
    for (cls, attr), value in defaults.items():
        setattr(CLASSES[cls], attr, value)
    for (cls, attr), value in sets.items():
        setattr(CLASSES[cls], attr, value)


CHECK_SHAPE = (2, 4096)


def check_ids(cfg) -> torch.Tensor:
    """The same token ids for every check (a fixed seed): the eager rows and the compiled ones compare on them."""
    return torch.randint(0, cfg.vocab_size, CHECK_SHAPE, device="cuda",
                         generator=torch.Generator(device="cuda").manual_seed(123))


def check(cfg, variants, defaults) -> tuple[float, dict[str, torch.Tensor]]:
    """Eager steps of a fresh bench model: each variant against the baseline, and the baseline twice (the floor).
    -> the baseline's (loss, gradients), which the compiled rows of `train` are held against."""
    model, ids = build(cfg), check_ids(cfg)
    apply({}, defaults)
    ref_loss, ref = loss_and_grads(model, ids)
    floor_loss, floor = loss_and_grads(model, ids)
    log(what="check", variant=variants[0][0] + " (again)", compiled=False, loss=floor_loss, ref_loss=ref_loss,
        grads_rel=grads_rel_diff(floor, ref))
    del floor
    for label, sets in variants[1:]:
        apply(sets, defaults)
        loss, grads = loss_and_grads(model, ids)
        log(what="check", variant=label, compiled=False, loss=loss, ref_loss=ref_loss,
            grads_rel=grads_rel_diff(grads, ref))
    apply({}, defaults)
    del model
    torch.cuda.empty_cache()
    return ref_loss, ref


def train(cfg, variants, defaults, deadline: float, ref) -> None:
    """The headline row per variant; with `ref` (from `check`) each variant's compiled blocks first take one step
    without a graph at the check's shape, held against the eager baseline (the same blocks then run the row)."""
    model, peak = bench_gpu.compiled_model(cfg)   # the same weights as check's (build seeds them), b2x4096
    for label, sets in variants + variants[:1]:    # the baseline again at the end: the run's own spread
        if time.time() > deadline:
            return
        apply(sets, defaults)
        torch._dynamo.reset()
        t = time.time()
        if ref is not None:
            Transformer.head_fp32 = True           # as check's eager steps
            loss, grads = loss_and_grads(model, check_ids(cfg))
            Transformer.head_fp32 = False
            log(what="check", variant=label, compiled=True, loss=loss, ref_loss=ref[0],
                grads_rel=grads_rel_diff(grads, ref[1]), s=time.time() - t)
            del grads
        bench_gpu.bench_train(cfg, model, peak, f"compiled blocks, CUDA graph, {label}", mtp=False,
                              chunked_loss=True, graph=True)
        log(what="row_s", variant=label, s=time.time() - t)
    apply({}, defaults)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--sections", default="check,train")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--budget-s", type=float, default=400, help="start no 'train' row after this")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    variants = parse_variants(args.variants)
    defaults = {key: getattr(CLASSES[key[0]], key[1]) for _, sets in variants for key in sets}
    cfg = bench_gpu.start_results(args.out, "switch_ab.json", args.config)
    log(what="variants", variants={label: {f"{c}.{a}": v for (c, a), v in sets.items()} for label, sets in variants})
    sections = args.sections.split(",")
    ref = check(cfg, variants, defaults) if "check" in sections else None
    if "train" in sections:
        train(cfg, variants, defaults, deadline, ref)
    return 0


if __name__ == "__main__":
    sys.exit(main())
