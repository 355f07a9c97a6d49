"""A/B of two training-step rewrites on one GPU (bench config, bf16), each against the form it replaced, in one
process:

  expand   mHC's expand h'_k = post_k·y + Σ_j comb[j,k]·h_j under torch.compile: as a broadcast product summed
           over j (now: inductor fuses it) against the einsum (before: a cuBLAS batched GEMM of 4×4 by 4×D per
           token, fp32)
  experts  the routed experts' weights stacked for the grouped GEMMs: three stacks and a cat (now) against one
           cat per expert and a stack (before)

    python benchmarks/step_parts_ab.py --out DIR [--sections op,train] [--budget-s 240]

  op     each part alone at b2x4096 (--seq), forward + backward, ms (median of 5), and how far apart the two forms are
  train  forward+backward tok/s at b1x4096 and b2x4096 (LM loss), old forms vs new, twice each, interleaved
  head_loss  the fused head loss alone at 8192 tokens, fwd+bwd: PyTorch ops vs the Triton cross-entropy kernel
         (head_loss.Config.kernel, default since the H100 A/B; not among the default sections)
  tf32   training tok/s (as train) with the fp32 matrix products (compressors, mHC mixes) in fp32 against TF32
         (torch.backends.cuda.matmul.allow_tf32); then one step's gradients in TF32 against fp32 (not among the
         default sections; H100 2026-11-23: within noise, 34.8K/32.4K vs 34.9K/33.2K tok/s — not adopted)
  fp32_linear  the same for the compressors' fp32 projections on bf16 tensor cores (model/fp32_linear.py: exact
         products, three bf16 pieces per fp32 operand) against fp32 GEMMs (not among the default sections)
Writes DIR/step_parts_ab.json after every record.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import bench_gpu  # noqa: E402
from bench_gpu import ab_train, build, log, rel_diff, timed  # noqa: E402
from dsv4.model import Transformer, fp32_linear, mhc, transformer  # noqa: E402
from dsv4.model.moe import MoE  # noqa: E402


def expand_einsum(y, h, post, comb):
    """hc_expand as it was before the broadcast form (einsum also under torch.compile)."""
    out = post.unsqueeze(-1) * y.float().unsqueeze(-2) + torch.einsum("bsjk,bsjd->bskd", comb, h.float())
    return out.to(y.dtype)


def experts_per_expert_cat(self, dtype):
    """MoE._expert_weights as it was: one cat per expert, then a stack."""
    w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in self.experts]).to(dtype)
    return w13, torch.stack([e.w2.weight for e in self.experts]).to(dtype)


NEW = {"expand": transformer.hc_expand_fast, "experts": MoE._expert_weights}
OLD = {"expand": mhc.fused(expand_einsum), "experts": experts_per_expert_cat}


def use(form: dict) -> None:
    transformer.hc_expand_fast = form["expand"]
    MoE._expert_weights = form["experts"]
    torch._dynamo.reset()


def op(cfg, s: int = 4096) -> None:
    b, n, D = 2, cfg.hc_mult, cfg.hidden_size
    torch.manual_seed(0)
    h = torch.randn(b, s, n, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randn(b, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    post = torch.rand(b, s, n, device="cuda").requires_grad_()
    comb = torch.rand(b, s, n, n, device="cuda").requires_grad_()
    res = {}
    for name, fn in (("einsum", OLD["expand"]), ("broadcast", NEW["expand"])):
        def step():
            out = fn(y, h, post, comb)
            return out, torch.autograd.grad(out.float().square().sum(), (y, h, post, comb))
        for _ in range(2):
            step()
        res[name] = step()
        log(what="op", part="expand", form=name, ms=timed(step, 5) * 1e3)
    (o0, g0), (o1, g1) = res["einsum"], res["broadcast"]
    log(what="op_diff", part="expand", out_rel=rel_diff(o1, o0), grad_rel=[rel_diff(a, r) for a, r in zip(g1, g0)])

    moe = build(cfg).layers[2].ffn                      # one MoE layer's 64 experts, bf16
    for name, fn in (("per-expert cat", OLD["experts"]), ("stacks", NEW["experts"])):
        def step():
            w13, w2 = fn(moe, torch.bfloat16)
            torch.autograd.backward((w13, w2), (torch.ones_like(w13), torch.ones_like(w2)))
            moe.zero_grad(set_to_none=True)
            return w13, w2
        step()
        res[name] = step()
        log(what="op", part="experts", form=name, ms=timed(step, 5) * 1e3)
    log(what="op_diff", part="experts", equal=all(torch.equal(a, r) for a, r in zip(res["stacks"], res["per-expert cat"])))


def head_loss_op(cfg, T: int = 8192) -> None:
    """The fused head loss alone (T tokens, bf16 activations and head, chunks of 2048), forward + backward:
    PyTorch ops for each chunk's loss and dz against the Triton kernel (head_loss.Config.kernel), twice each."""
    from dsv4.model import head_loss
    torch.manual_seed(0)
    x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(cfg.vocab_size, cfg.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, cfg.vocab_size, (T,), device="cuda")
    proj = lambda a, b: torch.nn.functional.linear(a, b)      # noqa: E731 - the bf16 head, logits as they come
    res, default = {}, head_loss.Config.kernel
    for on in (False, True, False, True):
        head_loss.Config.kernel = on

        def step():
            loss = head_loss.head_cross_entropy(x, w, t, proj, 2048)
            return loss, torch.autograd.grad(loss, (x, w))
        step()
        torch.cuda.reset_peak_memory_stats()
        res[on] = step()
        log(what="op", part="head loss", kernel=on, ms=timed(step, 5) * 1e3,
            peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)
    (l0, g0), (l1, g1) = res[False], res[True]
    log(what="op_diff", part="head loss", loss_rel=rel_diff(l1, l0), grad_rel=[rel_diff(a, r) for a, r in zip(g1, g0)])
    head_loss.Config.kernel = default


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on


def set_fp32_linear(on: bool) -> None:
    fp32_linear.Config.enabled = on


def precision_ab(cfg, deadline: float, switch, key: str, default: bool) -> None:
    """A form of the step's fp32 GEMMs off/on (switch(bool)), twice interleaved, then how far one step's
    gradients move with it on, against the run-to-run floor of two steps with it off (atomic adds); then
    switch(default)."""
    model = build(cfg)
    Transformer.head_fp32 = False
    ab_train(cfg, model, deadline, [(lambda on=on: switch(on), {key: on}) for on in (False, True) * 2],
             shapes=((2, 4096),))
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    grads = []
    for on in (False, True, False):
        switch(on)
        loss, g = bench_gpu.loss_and_grads(model, ids)
        grads.append(g)
        log(what=f"{key}_loss", on=on, loss=loss)
    log(what=f"{key}_grad_diff", on_vs_off=bench_gpu.grads_rel_diff(grads[1], grads[0]),
        off_vs_off=bench_gpu.grads_rel_diff(grads[2], grads[0]))
    switch(default)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--sections", default="op,train")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence of the op section (batch 2)")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    cfg = bench_gpu.start_results(args.out, "step_parts_ab.json", args.config)
    sections = args.sections.split(",")
    if "op" in sections:
        op(cfg, args.seq)
    if "head_loss" in sections:
        head_loss_op(cfg, args.seq * 2)
    if "tf32" in sections:
        precision_ab(cfg, deadline, set_tf32, "tf32", default=False)
    if "fp32_linear" in sections:
        precision_ab(cfg, deadline, set_fp32_linear, "fp32_linear", default=True)
    if "train" in sections:
        model = build(cfg)
        Transformer.head_fp32 = False            # bf16 head, as bench_gpu.py and the transformers baseline
        forms = [(lambda f=f: use(f), dict(forms=label)) for label, f in (("before", OLD), ("now", NEW)) * 2]
        ab_train(cfg, model, deadline, forms)
    use(NEW)
    return 0


if __name__ == "__main__":
    sys.exit(main())
