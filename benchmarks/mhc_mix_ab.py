"""A/B of mHC's fused paths on one GPU (bench config), in one process: PyTorch ops against the Triton mixing
kernel (`model/hc_mix_kernel.py`, `Fusion.mix_kernel`: projection + norm), the whole pre step in one kernel per
direction (`model/hc_pre_kernel.py`, `Fusion.pre_kernel`: mixes, maps, Sinkhorn, collapse) and/or the expand step
(`model/hc_expand_kernel.py`, `Fusion.expand_kernel`). --switch names the ones the sections turn on together.

    python benchmarks/mhc_mix_ab.py --out DIR [--switch mix | pre | expand | pre,expand] [--sections check,op,sweep,train]
                                    [--budget-s 300]

  check  fp32 bench model, 2048 tokens: loss and every gradient, the switch off vs on
  op     one compiled hc_pre (maps, Sinkhorn, collapse) forward + backward at b2x4096, streams in bf16 (a bf16
         model) and fp32 (`dsv4 train`: fp32 weights under autocast): ms, and how far apart outputs and
         gradients are; the same for one compiled hc_expand
  op_profile  the op section's compiled hc_pre, bf16, off and on, under torch.profiler (OUT/op_profile.txt)
  sweep  --switch mix: the mixing kernels alone at b2x4096 (bf16 streams, 24 maps), forward and backward ms
         per tile size (hc_mix_kernel.Config rows x cols), against the PyTorch ops (fp32 copy, cuBLAS GEMM, norm)
         --switch pre: the pre kernels alone at b2x4096 per hc_pre_kernel.Config (rows x pipelining stages,
         and the forward's first pass split over programs at 4 and 8 warps),
         forward and backward ms, against the compiled PyTorch hc_pre split the same way;
         --switch expand: the expand kernels alone per hc_expand_kernel.Config (rows x cols), likewise
  train  forward+backward tok/s at b1x4096 and b2x4096 (LM loss, bf16 model), the switch off vs on
  train_graph  the README table's headline row, compiled blocks + CUDA graph (fused head loss), in one
         process: all switches off, each alone on (when several), all on (each compiles the blocks anew:
         ~1.5 min apiece)
Writes DIR/mhc_mix_ab.json after every record.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import bench_gpu  # noqa: E402
from bench_gpu import ab_train, build, grads_rel_diff, log, loss_and_grads, rel_diff, timed, timed_device  # noqa: E402
from dsv4.compiling import compile_blocks  # noqa: E402
from dsv4.model import Transformer, init_weights  # noqa: E402
from dsv4.model.mhc import Fusion, hc_expand_fast, hc_pre_fast  # noqa: E402

SWITCHES = ["mix_kernel"]     # the Fusion fields the sections turn on and off together (--switch)


def use_kernel(on: bool, fields=None) -> None:
    """Set the switches (all of SWITCHES, or `fields`), and drop compiled graphs so that the compiled mHC
    functions are traced again with them."""
    for f in SWITCHES:
        setattr(Fusion, f, on and (fields is None or f in fields))
    torch._dynamo.reset()


def check(cfg) -> None:
    """All gradients together, not the worst tensor: a 1e-7 difference can flip one token's experts (seen on a
    CPU stand-in: 1 token of 2048) and move a small, cancelling gradient such as the final collapse's scale."""
    torch.manual_seed(0)
    model = init_weights(Transformer(cfg), seed=0).cuda().float()
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    res = []
    for on in (False, True):
        use_kernel(on)
        res.append(loss_and_grads(model, ids))
    log(what="check_fp32", seq=2048, loss_off=res[0][0], loss_on=res[1][0], grad_rel=grads_rel_diff(res[1][1], res[0][1]))
    del model
    torch.cuda.empty_cache()


def pre_maps(cfg, g: torch.Generator):
    """The op sections' mHC map parameters on CUDA: fn [(2+n)·n, n·D] (with grad), base, scale."""
    n, D = cfg.hc_mult, cfg.hidden_size
    fn = (torch.randn((2 + n) * n, n * D, generator=g) * 0.02).cuda().requires_grad_()
    return fn, torch.randn((2 + n) * n, generator=g).cuda(), torch.rand(3, generator=g).cuda()


def pre_step(cfg, h, fn, base, scale):
    """One compiled hc_pre forward + backward of a loss over all three outputs, gradients fresh -> outputs."""
    h.grad = fn.grad = None
    x, post, comb = hc_pre_fast(h, fn, base, scale, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
    (x.float().square().mean() + post.square().mean() + comb.square().mean()).backward()
    return x, post, comb


def op(cfg) -> None:
    n, D = cfg.hc_mult, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    fn, base, scale = pre_maps(cfg, g)
    for dtype in (torch.bfloat16, torch.float32):
        if "expand_kernel" in SWITCHES:
            expand_op(cfg, dtype, g)
        if not {"mix_kernel", "pre_kernel"} & set(SWITCHES):
            continue
        h0 = torch.randn(2, 4096, n, D, generator=g).to("cuda", dtype)
        outs = {}
        for on in (False, True):
            use_kernel(on)
            h = h0.clone().requires_grad_()
            for _ in range(2):
                pre_step(cfg, h, fn, base, scale)
            x, post, comb = pre_step(cfg, h, fn, base, scale)
            outs[on] = (x.detach(), post.detach(), comb.detach(), h.grad.clone(), fn.grad.clone())
            log(what="hc_pre", streams=str(dtype).replace("torch.", ""), kernel=on, batch=2, seq=4096,
                ms=timed(lambda: pre_step(cfg, h, fn, base, scale), 5) * 1e3)
        names = ("x", "post", "comb", "d_streams", "d_fn")
        log(what="hc_pre_diff", streams=str(dtype).replace("torch.", ""),
            **{f"{k}_rel": rel_diff(a, b) for k, a, b in zip(names, outs[True], outs[False])})


def op_profile(cfg, out: str) -> None:
    """The op section's compiled hc_pre (bf16 streams, b2x4096) forward + backward with the switches on, under
    torch.profiler: where the time around the kernels goes (the op lost to the PyTorch ops in stop 23 while the
    kernels alone won). Top GPU kernels -> OUT/op_profile.txt."""
    from torch.profiler import ProfilerActivity, profile
    n, D = cfg.hc_mult, cfg.hidden_size
    g = torch.Generator().manual_seed(0)
    fn, base, scale = pre_maps(cfg, g)
    h = torch.randn(2, 4096, n, D, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    lines = []
    for on in (False, True):
        use_kernel(on)
        for _ in range(3):
            pre_step(cfg, h, fn, base, scale)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                pre_step(cfg, h, fn, base, scale)
            torch.cuda.synchronize()
        lines += [f"== kernel {on} (5 steps)", prof.key_averages().table(sort_by="cuda_time_total", row_limit=18,
                                                                        max_name_column_width=70)]
    Path(out, "op_profile.txt").write_text("\n".join(lines))
    print("\n".join(lines))


def expand_op(cfg, dtype, g) -> None:
    """One compiled hc_expand forward + backward at b2x4096: ms per switch state, and the outputs' distance."""
    n, D = cfg.hc_mult, cfg.hidden_size
    ins0 = (torch.randn(2, 4096, D, generator=g).to("cuda", dtype), torch.randn(2, 4096, n, D, generator=g).to("cuda", dtype),
            2 * torch.rand(2, 4096, n, generator=g).cuda(), torch.rand(2, 4096, n, n, generator=g).cuda())
    outs = {}
    for on in (False, True):
        use_kernel(on)
        ins = [t.clone().requires_grad_() for t in ins0]

        def step():
            for t in ins:
                t.grad = None
            out = hc_expand_fast(*ins)
            out.float().square().mean().backward()
            return out
        step()
        step()
        outs[on] = [step().detach()] + [t.grad.clone() for t in ins]
        log(what="hc_expand", streams=str(dtype).replace("torch.", ""), kernel=on, batch=2, seq=4096,
            ms=timed(step, 5) * 1e3)
    log(what="hc_expand_diff", streams=str(dtype).replace("torch.", ""),
        **{f"{k}_rel": rel_diff(a, b) for k, a, b in zip(("out", "d_y", "d_streams", "d_post", "d_comb"),
                                                          outs[True], outs[False])})


def sweep(cfg) -> None:
    from dsv4.model import hc_mix_kernel
    n, D = cfg.hc_mult, cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * 4096, n * D, generator=g).to("cuda", torch.bfloat16)
    fn = (torch.randn((2 + n) * n, n * D, generator=g) * 0.02).cuda()
    grad = torch.randn(x.shape[0], fn.shape[0], generator=g).cuda()

    def reference():
        xf = x.float().requires_grad_()
        fr = fn.clone().requires_grad_()
        y = F.linear(xf, fr) * torch.rsqrt(xf.square().mean(-1, keepdim=True) + cfg.rms_norm_eps)
        y.backward(grad)
    log(what="mix_kernel", impl="pytorch (fp32 copy + cuBLAS)", fwd_bwd_ms=timed(reference, 5) * 1e3)
    default = (hc_mix_kernel.Config.rows, hc_mix_kernel.Config.cols)
    for rows in (16, 32, 64):
        for cols in (64, 128):
            hc_mix_kernel.Config.rows, hc_mix_kernel.Config.cols = rows, cols
            mix, rstd = torch.ops.dsv4.hc_mixes(x, fn, cfg.rms_norm_eps)
            fwd = timed(lambda: torch.ops.dsv4.hc_mixes(x, fn, cfg.rms_norm_eps), 5)
            bwd = timed(lambda: torch.ops.dsv4.hc_mixes_backward(x, fn, mix, rstd, grad), 5)
            log(what="mix_kernel", impl="triton", rows=rows, cols=cols, fwd_ms=fwd * 1e3, bwd_ms=bwd * 1e3)
    hc_mix_kernel.Config.rows, hc_mix_kernel.Config.cols = default


def sweep_pre(cfg) -> None:
    """The pre kernels alone (forward op, backward op) per Config, and the compiled PyTorch hc_pre: its forward,
    and its forward + backward minus that."""
    from dsv4.model import hc_pre_kernel
    n, D = cfg.hc_mult, cfg.hidden_size
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 4096, n, D, generator=g).to("cuda", torch.bfloat16)
    fn = (torch.randn((2 + n) * n, n * D, generator=g) * 0.02).cuda()
    base, scale = torch.randn((2 + n) * n, generator=g).cuda(), torch.rand(3, generator=g).cuda()
    it, eps, neps = cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
    ups = (torch.randn(2, 4096, D, generator=g).to("cuda", torch.bfloat16), torch.randn(2, 4096, n, generator=g).cuda(),
           torch.randn(2, 4096, n, n, generator=g).cuda())
    use_kernel(False)
    hr = h.clone().requires_grad_()
    fwd = timed_device(lambda: hc_pre_fast(h, fn, base, scale, it, eps, neps))

    def both():
        out = hc_pre_fast(hr, fn, base, scale, it, eps, neps)
        torch.autograd.backward(out, ups)
    log(what="pre_kernel", impl="compiled pytorch", fwd_ms=fwd * 1e3, bwd_ms=(timed_device(both) - fwd) * 1e3)
    h2 = h.flatten(2).flatten(0, 1)
    w, bp, sp = hc_pre_kernel._padded(fn, base, scale, n)
    dy, dpost, dcomb = (u.flatten(0, 1) for u in ups)
    conf = hc_pre_kernel.Config
    fields = ("rows", "cols", "precision", "warps", "stages", "split")
    default = {f: getattr(conf, f) for f in fields}
    # the defaults, then (stop 27) rows x pipelining stages, then the forward's pass 1 split over programs
    # (stop 23 swept rows x cols x precision: 32 x 128, tf32x3)
    variants = [{}] + [dict(rows=r, stages=st) for r in (16, 32) for st in (0, 2, 3) if (r, st) != (32, 0)]
    variants += [dict(rows=r, split=sp, warps=w) for r in (32, 64) for sp in (2, 4, 8) for w in (4, 8)]
    ref = torch.ops.dsv4.hc_pre(h2, w, bp, sp, n, it, eps, neps)
    for variant in variants:
        for f in fields:
            setattr(conf, f, variant.get(f, default[f]))
        try:
            out = torch.ops.dsv4.hc_pre(h2, w, bp, sp, n, it, eps, neps)
            rel = max(rel_diff(a, b) for a, b in zip(out[:3], ref[:3]))      # y, post, comb vs the defaults'
            fwd = timed_device(lambda: torch.ops.dsv4.hc_pre(h2, w, bp, sp, n, it, eps, neps))
            bwd = timed_device(lambda: torch.ops.dsv4.hc_pre_backward(h2, w, bp, sp, out[3], out[4], dy, dpost,
                                                                        dcomb, n, it, eps))
            log(what="pre_kernel", impl="triton", **{f: getattr(conf, f) for f in fields}, fwd_ms=fwd * 1e3,
                bwd_ms=bwd * 1e3, rel=rel)
        except Exception as e:                          # e.g. out of shared memory at a tile size: the next one
            log(what="pre_kernel", impl="triton", **{f: getattr(conf, f) for f in fields}, error=repr(e)[:300])
    for f in fields:
        setattr(conf, f, default[f])


def sweep_expand(cfg) -> None:
    """The expand kernels alone (forward op, backward op) per Config at b2x4096, bf16 streams."""
    from dsv4.model import hc_expand_kernel
    n, D, M = cfg.hc_mult, cfg.hidden_size, 2 * 4096
    g = torch.Generator().manual_seed(2)
    y, h = torch.randn(M, D, generator=g).to("cuda", torch.bfloat16), torch.randn(M, n, D, generator=g).to("cuda", torch.bfloat16)
    post, comb = 2 * torch.rand(M, n, generator=g).cuda(), torch.rand(M, n, n, generator=g).cuda()
    up = torch.randn(M, n, D, generator=g).to("cuda", torch.bfloat16)
    default = (hc_expand_kernel.Config.rows, hc_expand_kernel.Config.cols)
    for rows in (8, 16, 32):
        for cols in (32, 64, 128):
            hc_expand_kernel.Config.rows, hc_expand_kernel.Config.cols = rows, cols
            try:
                fwd = timed(lambda: torch.ops.dsv4.hc_expand(y, h, post, comb), 5)
                bwd = timed(lambda: torch.ops.dsv4.hc_expand_backward(up, y, h, post, comb), 5)
                log(what="expand_kernel", rows=rows, cols=cols, fwd_ms=fwd * 1e3, bwd_ms=bwd * 1e3)
            except Exception as e:
                log(what="expand_kernel", rows=rows, cols=cols, error=repr(e)[:300])
    hc_expand_kernel.Config.rows, hc_expand_kernel.Config.cols = default


def train(cfg, model, deadline) -> None:
    # twice each, interleaved: the host-bound rows drift within a process
    ab_train(cfg, model, deadline, [((lambda on=on: use_kernel(on)), dict(kernel=on)) for on in (False, True) * 2])


def train_graph(cfg, model, each: bool = True) -> None:
    peak = bench_gpu.matmul_peak()
    compile_blocks(model)                                      # as `dsv4 train --compile` does
    variants = [()] + ([(f,) for f in SWITCHES] if each and len(SWITCHES) > 1 else []) + [tuple(SWITCHES)]
    for fields in variants:
        use_kernel(bool(fields), fields)                       # dynamo reset: the blocks are traced anew
        bench_gpu.bench_train(cfg, model, peak, f"compiled blocks, CUDA graph, on: {'+'.join(fields) or 'none'}",
                              mtp=False, chunked_loss=True, graph=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--sections", default="check,op,sweep,train")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--no-each", action="store_true",
                    help="train_graph: only all switches off and all on (each alone is skipped: ~2 min per row)")
    ap.add_argument("--batches", default="1,2",
                    help="train sections: the batch sizes of the rows, comma-separated (4096 tokens each)")
    ap.add_argument("--switch", default="mix",
                    help="the fused paths the sections turn on and off together, comma-separated: mix, pre, "
                         "expand (Fusion.<name>_kernel)")
    args = ap.parse_args()
    SWITCHES[:] = [f"{name}_kernel" for name in args.switch.split(",")]
    for f in SWITCHES:
        if not isinstance(getattr(Fusion, f, None), bool):
            ap.error(f"--switch: no Fusion.{f}")
    bench_gpu.TRAIN_SHAPES[:] = [(int(b), 4096) for b in args.batches.split(",")]
    if "mix_kernel" in SWITCHES and "pre_kernel" not in SWITCHES:
        Fusion.pre_kernel = False                 # the mixing kernel serves hc_pre only without the whole-pre kernel
    deadline = time.time() + args.budget_s
    cfg = bench_gpu.start_results(args.out, "mhc_mix_ab.json", args.config)
    sections = args.sections.split(",")
    default = {f: getattr(Fusion, f) for f in SWITCHES}
    bench_gpu.log(what="switch", fields=SWITCHES)
    if "check" in sections:
        check(cfg)
    if "op" in sections:
        op(cfg)
    if "op_profile" in sections:
        op_profile(cfg, args.out)
    if "sweep" in sections:
        if "mix_kernel" in SWITCHES:
            sweep(cfg)
        if "pre_kernel" in SWITCHES:
            sweep_pre(cfg)
        if "expand_kernel" in SWITCHES:
            sweep_expand(cfg)
    if "train" in sections:
        model = build(cfg)
        Transformer.head_fp32 = False            # bf16 head, as bench_gpu.py and the transformers baseline
        train(cfg, model, deadline)
    if "train_graph" in sections:
        model = build(cfg)
        Transformer.head_fp32 = False
        train_graph(cfg, model, each=not args.no_each)
    for f, v in default.items():
        setattr(Fusion, f, v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
