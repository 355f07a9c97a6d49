"""A/B of three training-step rewrites on one GPU (bench config, bf16), each against the form it replaced:

  output   the attention's output step under autograd: grouped_output.py's ops (Attention.fused_output "cuda")
           against the plain form (inverse RoPE into a new tensor, einsum over the groups; "")
  scatter  the CSA backward's scatter of each pick's coefficients into pick_dcomp's dense matrix: the Triton
           kernel (sparse_attention_bwd.Config.pick_scatter "triton") against ATen's index_put ("index")
  scale    the head loss's backward g · dW [V, D] into the weight's dtype: one Triton pass
           (head_loss.Config.scale_kernel) against ATen's mul with a bf16 out=

    python benchmarks/output_step_ab.py --out DIR [--sections op,train] [--budget-s 400]

  op     each part alone at the bench config's b2x4096 shapes, ms per call (CUDA events over 20 calls back to
         back, bench_gpu.timed_device), and how far apart the two forms' results are
  train  the README's headline row (compiled blocks + CUDA graph, LM loss through the fused head loss, b2x4096)
         with all three rewrites on ("now", first), without the output step's, then with none ("before"); the
         blocks recompile for each
  attnop the attention's training call as the custom op dsv4::sparse_mqa (sparse_attention.AsOp, opt-in: each
         compiled block one graph) against the autograd Function between two graphs: the headline row, then
         compiled blocks without a CUDA graph (host-bound rows), each off / on (not among the default sections)
Writes DIR/output_step_ab.json after every record.
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
from bench_gpu import log, rel_diff, timed_device  # noqa: E402
from dsv4.model import ce_kernel, head_loss, sparse_attention_bwd  # noqa: E402
from dsv4.model.attention import Attention  # noqa: E402
from dsv4.model.grouped_output import grouped_output, plain_output  # noqa: E402
from dsv4.model.layers import Rotary  # noqa: E402


def use(now: bool) -> None:
    """All three rewrites on (now) or off."""
    Attention.fused_output = "cuda" if now else ""
    sparse_attention_bwd.Config.pick_scatter = "triton" if now else "index"
    head_loss.Config.scale_kernel = now


def graph_timed(fn, reps: int = 20) -> float:
    """Seconds per call of fn's kernels alone: fn captured once in a CUDA graph, the graph replayed `reps` times
    between two CUDA events (no host work: pick_dcomp's Python loop over chunks otherwise sets the pace)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timed_device(graph.replay, reps)


def output_pieces(o, w, cos, sin, dy) -> None:
    """Where grouped_output's time goes: each op alone, then its GEMMs and rope passes one by one."""
    from dsv4.model import grouped_output as go
    b, L, h, d = o.shape
    g, n_out, i = w.shape
    T, r = b * L, 2 * cos.shape[-1]
    y, delta = torch.ops.dsv4.grouped_output(o, w, cos, sin)
    plain = torch.compile(plain_output)
    do_c = torch.empty(g, T, i, dtype=o.dtype, device=o.device)
    do_s = torch.empty(T, g, i, dtype=o.dtype, device=o.device)
    dy_g = dy.reshape(T, g, n_out).transpose(0, 1)
    pieces = {
        "plain forward (compiled, no grad)": lambda: plain(o, w, cos, sin),
        "op forward": lambda: torch.ops.dsv4.grouped_output(o, w, cos, sin),
        "op backward": lambda: torch.ops.dsv4.grouped_output_backward(dy, o, delta, w, cos, sin),
        "rope delta kernel": lambda: go._rope(o, cos, sin, r, -1.0, delta=True),
        "rope in-place kernel": lambda: go._rope(do_s.view(b, L, h, d), cos, sin, r, 1.0, delta=False),
        "bmm y = o_g W_g^T (o strided)": lambda: torch.bmm(o.view(T, g, i).transpose(0, 1), w.transpose(1, 2)),
        "bmm y, o copied group-major first": lambda: torch.bmm(o.view(T, g, i).transpose(0, 1).contiguous(),
                                                               w.transpose(1, 2)),
        "bmm do into o's layout (out=)": lambda: torch.bmm(dy_g, w, out=do_s.transpose(0, 1)),
        "bmm do group-major (out=)": lambda: torch.bmm(dy_g, w, out=do_c),
        "bmm dw = dy^T o_g": lambda: torch.bmm(dy_g.transpose(1, 2), o.view(T, g, i).transpose(0, 1)),
        "mm per group, do into o's layout": lambda: [torch.mm(dy_g[k], w[k], out=do_s[:, k]) for k in range(g)],
    }
    for name, fn in pieces.items():
        log(what="op", part="output pieces", piece=name, ms=timed_device(fn) * 1e3)


def op(cfg, s: int = 4096) -> None:
    b, h, d, g, r = 2, cfg.num_attention_heads, cfg.head_dim, cfg.o_groups, cfg.o_lora_rank
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    cos, sin = Rotary(cfg.qk_rope_head_dim, cfg.compress_rope_theta).to(dev).angles(torch.arange(s, device=dev))
    o = torch.randn(b, s, h, d, device=dev, dtype=bf, requires_grad=True)
    w = (torch.randn(g, r, h // g * d, device=dev, dtype=bf) * 0.02).requires_grad_()
    dy = torch.randn(b, s, g * r, device=dev, dtype=bf)
    res = {}
    for name, fn in (("plain", plain_output), ("grouped_output", grouped_output)):
        f = torch.compile(fn)                                   # as inside a compiled block

        def step():
            y = f(o, w, cos, sin)
            return y, torch.autograd.grad(y, (o, w), dy)
        step()
        res[name] = step()
        # host-timed: with autograd.grad each call costs more host time than the GPU spends (1.5 ms against
        # 0.30 for the two ops alone, stop 28), and its CUDA-graph capture failed and broke the process's RNG
        log(what="op", part="output", form=name, ms=timed_device(step) * 1e3)
    (y0, g0), (y1, g1) = res["plain"], res["grouped_output"]
    log(what="op_diff", part="output", out_rel=rel_diff(y1, y0), grad_rel=[rel_diff(a, e) for a, e in zip(g1, g0)])
    output_pieces(o.detach(), w.detach(), cos, sin, dy)

    # pick_dcomp at a CSA layer's shapes: b2 x 4096 tokens, 256 picks of 1024 entries, 16 heads
    n, k = s // 4, cfg.index_topk
    vis = (torch.arange(s, device=dev) + 1) // 4                 # entries token t sees
    seen = torch.arange(n, device=dev)[None, None] < vis[None, :, None]
    sel = torch.rand(b, s, n, device=dev).masked_fill(~seen, -1).topk(k, -1)      # k distinct picks per token
    sel = torch.where(sel.values >= 0, sel.indices, -1).int()
    coef = torch.randn(b, s, k, 2 * h, device=dev, dtype=bf)
    q, do = (torch.randn(b, s, h, d, device=dev, dtype=bf) for _ in range(2))
    def pick():
        return sparse_attention_bwd.pick_dcomp(coef, sel, q, do, n, 4)
    for form in ("index", "triton"):
        sparse_attention_bwd.Config.pick_scatter = form
        res[form] = pick()
        log(what="op", part="pick_dcomp", form=form, ms=timed_device(pick) * 1e3, graph_ms=graph_timed(pick) * 1e3)
    log(what="op_diff", part="pick_dcomp", equal=bool(torch.equal(res["index"], res["triton"])),
        rel=rel_diff(res["triton"], res["index"]))

    dw = torch.randn(cfg.vocab_size, cfg.hidden_size, device=dev)
    gs = torch.tensor(0.3, device=dev)
    forms = {"mul out=": lambda: torch.mul(dw, gs, out=torch.empty(dw.shape, dtype=bf, device=dev)),
             "scaled": lambda: ce_kernel.scaled(dw, gs, bf)}
    for name, fn in forms.items():
        res[name] = fn()
        log(what="op", part="head dW scale", form=name, ms=timed_device(fn) * 1e3)
    log(what="op_diff", part="head dW scale", equal=bool(torch.equal(res["mul out="], res["scaled"])))
    use(True)


def train(cfg, deadline: float) -> None:
    model, peak = bench_gpu.compiled_model(cfg)
    for label, now, output in (("now", True, "cuda"), ("now without grouped_output", True, ""),
                               ("before", False, "")):
        if time.time() > deadline:
            return
        use(now)
        Attention.fused_output = output
        torch._dynamo.reset()          # the blocks recompile: dynamo does not guard on these class attributes
        t = time.time()
        bench_gpu.bench_train(cfg, model, peak, "compiled blocks, CUDA graph, " + label, mtp=False,
                              chunked_loss=True, graph=True)
        log(what="row_s", variant=label, s=time.time() - t)
    use(True)


def attnop(cfg, deadline: float) -> None:
    from dsv4.model import sparse_attention
    model, peak = bench_gpu.compiled_model(cfg)
    for graph in (True, False):
        for on in (False, True):
            if time.time() > deadline:
                return
            sparse_attention.AsOp.enabled = on
            torch._dynamo.reset()
            t = time.time()
            label = f"compiled blocks{', CUDA graph' if graph else ''}, attention {'op' if on else 'Function'}"
            bench_gpu.bench_train(cfg, model, peak, label, mtp=False, chunked_loss=True, graph=graph)
            breaks = torch._dynamo.utils.counters["graph_break"]
            log(what="row_s", variant=label, s=time.time() - t, graph_breaks=sum(breaks.values()),
                graph_break_reasons=sorted(breaks)[:3])
            breaks.clear()
    sparse_attention.AsOp.enabled = False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--sections", default="op,train")
    ap.add_argument("--budget-s", type=float, default=400, help="start no 'train' row after this")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    cfg = bench_gpu.start_results(args.out, "output_step_ab.json", args.config)
    sections = args.sections.split(",")
    if "op" in sections:
        op(cfg)
    if "train" in sections:
        train(cfg, deadline)
    if "attnop" in sections:
        attnop(cfg, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
