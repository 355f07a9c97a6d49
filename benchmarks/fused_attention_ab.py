"""A/B of the fused attention paths on one GPU (bench config, bf16): FlexAttention sparse MQA for one-pass calls
(`Attention.fused`) and the Triton indexer (`Indexer.fused`), each against the reference path, in one process.

    python benchmarks/fused_attention_ab.py --out DIR [--sections check,train,prefill,long] [--budget-s 540]

  check    fp32 on the bench config, 2048 tokens: loss and gradients fused vs reference
  train    forward+backward tok/s at b1x4096 and b2x4096 (LM loss): reference; the default (Triton forward and
           backward, sparse_attention_bwd.py); the default with the CSA picks' dK by atomic adds
  bwd      the Triton backward alone per layer kind (window / CSA / HCA) at b2x4096: ms, the window's dKV by
           atomic adds vs per key block (Config.window_dkv), the CSA picks' dK by atomic adds vs GEMMs
           (Config.pick_dkv) (--bwd-heads 16 64: also at V4's head count)
  fwd      the forward alone per layer kind at b2x4096: FlexAttention (block mask included) vs the Triton
           forward (sparse_attention_fwd.py), ms and how far apart their outputs are (--bwd-heads as above)
  tiles    the Triton forward's and backward's tile sizes and warps, one at a time, per layer kind at
           b2x4096: ms and the distance from the defaults' outputs (TILE_SWEEP; --bwd-heads as above)
  prefill  one-pass prefill tok/s at 4K…32K, reference vs fused
  decode   greedy decode through the reference path (no CUDA graph) after 2048 tokens: indexer reference vs Triton
  long     chunked prefill through the KV cache (64K, 256K): indexer reference vs Triton
  cached   the same chunked prefill (Triton indexer): reference attention vs the Triton forward through the
           cache (Attention.fused_cached)
Writes DIR/fused_ab.json after every record.
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
from bench_gpu import ab_train, build, log, rel_diff, timed, timed_device  # noqa: E402
from dsv4.inference.generate import prefill  # noqa: E402
from dsv4.model import (Transformer, init_weights, sparse_attention, sparse_attention_bwd,  # noqa: E402
                        sparse_attention_fwd)
from dsv4.model.attention import Attention, Indexer  # noqa: E402

def set_fused(attn: bool, indexer: bool) -> None:
    Attention.fused = Attention.fused_training = attn
    Indexer.fused = indexer


def check(cfg) -> None:
    torch.manual_seed(0)
    model = init_weights(Transformer(cfg), seed=0).cuda().float().train()
    ids = torch.randint(0, cfg.vocab_size, (1, 2048), device="cuda")
    res = []
    for fused in (False, True):
        set_fused(fused, fused)
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        res.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        model.zero_grad(set_to_none=True)
    worst = max(rel_diff(res[1][1][n], g) for n, g in res[0][1].items())
    log(what="check_fp32", seq=2048, loss_ref=res[0][0], loss_fused=res[1][0], worst_grad_rel=worst)
    del model
    torch.cuda.empty_cache()


def train(cfg, model, deadline) -> None:
    default_fwd = sparse_attention.Forward.triton
    conf = sparse_attention_bwd.Config

    def variant(fused, triton_bwd, window_dkv, pick_dkv, triton_fwd):
        def switch():
            set_fused(fused, fused)
            sparse_attention.Backward.triton = triton_bwd
            sparse_attention.Forward.triton = triton_fwd
            conf.window_dkv, conf.pick_dkv = window_dkv, pick_dkv
        return switch, dict(fused=fused, forward="triton" if triton_fwd else ("flex" if fused else "reference"),
                            backward=f"triton (window {window_dkv}, picks {pick_dkv})" if triton_bwd else "reference")
    # the reference path, the default (Triton forward and backward, window dKV per key block, CSA picks' dK by
    # GEMMs), and the CSA picks' dK by atomic adds — twice each, interleaved (host-bound rows drift in a process)
    ab_train(cfg, model, deadline, [variant(False, False, "keys", "gemm", False)]
             + [variant(True, True, "keys", "gemm", True), variant(True, True, "keys", "atomic", True)] * 2)
    sparse_attention.Forward.triton = default_fwd
    conf.window_dkv, conf.pick_dkv = "keys", "gemm"


def _layer_inputs(cfg, h: int):
    """Random bf16 attention inputs at b2×4096 with h heads: q, kv, do, o, lse, sink and per layer kind
    (window / CSA / HCA) its compressed entries, CSA picks (random visible entries) and ratio."""
    b, L, d = 2, 4096, cfg.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    q, kv, do = rnd(b, L, h, d), rnd(b, L, d), rnd(b, L, h, d)
    o, lse, sink = rnd(b, L, h, d), torch.full((b, L, h), 8.0, device="cuda"), torch.zeros(h, device="cuda")
    t = torch.arange(L, device="cuda")
    pick = torch.rand(b, L, L // 4, device="cuda", generator=g).argsort(-1)[..., :cfg.index_topk]   # random entries …
    sel = torch.where(pick < ((t + 1) // 4)[None, :, None], pick, -1)                          # … visible ones only
    kinds = {"window": (None, None, 0), "CSA": (rnd(b, L // 4, d), sel, 4), "HCA": (rnd(b, L // 128, d), None, 128)}
    return q, kv, do, o, lse, sink, kinds


def forward_kernels(cfg, h: int) -> None:
    """The forward alone at b2×4096 (h heads, bf16): FlexAttention (its block mask built per call, as in the
    model) vs the Triton forward, ms per layer kind and the relative difference of their outputs."""
    q, kv, _, _, _, sink, kinds = _layer_inputs(cfg, h)
    W = cfg.sliding_window
    for kind, (comp, s_, ratio) in kinds.items():
        flex = lambda: sparse_attention._with_sink(  # noqa: E731
            *sparse_attention._forward(q, kv, comp, s_, W, ratio, None), sink)[0]
        tri = lambda: sparse_attention_fwd.forward(q, kv, 0, 0, comp, s_, sink, W, ratio)[0]  # noqa: E731
        a, c = flex(), tri()
        log(what="fwd_kernel", heads=h, layer=kind, flex_ms=timed(flex, 5) * 1e3, triton_ms=timed(tri, 5) * 1e3,
            rel=float((c - a).float().norm() / a.float().norm()))


def backward_kernels(cfg, h: int) -> None:
    """The Triton backward alone at b2×4096 (bench head_dim, h heads, bf16): per layer kind, ms per call with the
    window's dKV by atomic adds from the per-token kernel vs per key block (`_dkv_window_kernel`, the default),
    and in CSA layers the picked entries' dK by atomic adds vs by GEMMs over the picks' coefficients
    (`pick_dcomp`, the default); how far apart the variants' gradients are from the first."""
    q, kv, do, o, lse, sink, kinds = _layer_inputs(cfg, h)
    W = cfg.sliding_window
    conf = sparse_attention_bwd.Config
    for kind, (comp, s_, ratio) in kinds.items():
        outs = {}
        variants = [("atomic", "atomic"), ("keys", "atomic")] + ([("keys", "gemm")] if kind == "CSA" else [])
        for window_dkv, pick_dkv in variants:
            conf.window_dkv, conf.pick_dkv = window_dkv, pick_dkv
            fn = lambda: sparse_attention_bwd.backward(q, kv, comp, s_, o, do, lse, sink, W, ratio)  # noqa: E731
            label = f"window {window_dkv}, picks {pick_dkv}"
            outs[label] = fn()
            log(what="bwd_kernel", heads=h, layer=kind, dkv=label, ms=timed(fn, 5) * 1e3)
        ref = next(iter(outs.values()))
        for label, got in list(outs.items())[1:]:
            diff = {name: rel_diff(x, y) for name, x, y in zip(("dq", "dkv", "dcomp", "dsink"), got, ref)
                    if x is not None}
            log(what="bwd_kernel_diff", heads=h, layer=kind, dkv=label, rel=diff)
    conf.window_dkv, conf.pick_dkv = "keys", "gemm"


# kernel -> variants {Config field: value}, each against the defaults ({}): one field at a time, then pairs
TILE_SWEEP = {
    # (stop 27 also swept token blocks in _bwd_kernel, 2-8 tokens per program: slower in every layer kind on an
    # H200 — window 1.09 -> 1.37 ms, CSA 3.15 -> 3.59, HCA 1.65 -> 2.08 at best — and removed)
    "bwd": [{}, {"walk_block": 64}, {"key_block": 64}, {"warps": 8}, {"warps": 2}, {"window_warps": 8},
            {"token_block": 1}],
    # stop 27's first H200 sweep (host-timed): token blocks 2 (4 warps) and 4 (8 warps), and 2 or 4 pipelining
    # stages, were the candidates; 8-token blocks and 64-key tiles at 4 tokens need more shared memory
    "fwd": [{}, {"warps": 2}, {"stages": 2}, {"stages": 3}, {"stages": 4}, {"token_block": 2, "block_warps": 4},
            {"token_block": 2, "block_warps": 4, "stages": 2}, {"token_block": 2, "block_warps": 4, "stages": 3},
            {"token_block": 4}, {"token_block": 4, "stages": 2}, {"token_block": 4, "stages": 3},
            {"token_block": 2, "block_warps": 2}],
}
TILE_CONFIG = {"bwd": sparse_attention_bwd.Config, "fwd": sparse_attention_fwd.Config}


def tile_sweep(cfg, h: int, kernels=("bwd", "fwd")) -> None:
    """The Triton kernels' tile sizes and warps (TILE_SWEEP), per layer kind at b2×4096: ms per call and how
    far each variant's outputs are from the defaults' (a tile that does not compile is logged with its error).
    H100, 16 heads (results/2026-11-24_h100_stop18): warps 4 and 32-key steps in the backward's walk won."""
    q, kv, do, o, lse, sink, kinds = _layer_inputs(cfg, h)
    W = cfg.sliding_window
    for kind, (comp, s_, ratio) in kinds.items():
        fns = {"bwd": lambda: sparse_attention_bwd.backward(q, kv, comp, s_, o, do, lse, sink, W, ratio),
               "fwd": lambda: sparse_attention_fwd.forward(q, kv, 0, 0, comp, s_, sink, W, ratio)}
        for which in kernels:
            variants = TILE_SWEEP[which]
            conf, ref = TILE_CONFIG[which], fns[which]()
            for variant in variants:
                defaults = {f: getattr(conf, f) for f in variant}
                for f, v in variant.items():
                    setattr(conf, f, v)
                try:
                    got = fns[which]()
                    rel = max(rel_diff(x, y) for x, y in zip(got, ref) if x is not None)
                    log(what="tile", heads=h, layer=kind, kernel=which, variant=variant,
                        ms=timed_device(fns[which]) * 1e3, rel=rel)
                except Exception as e:                                      # noqa: BLE001 - logged, next one
                    log(what="tile", heads=h, layer=kind, kernel=which, variant=variant,
                        error=f"{type(e).__name__}: {str(e)[:200]}")
                finally:
                    for f, v in defaults.items():
                        setattr(conf, f, v)
                torch.cuda.empty_cache()


def _prefill_ab(cfg, model, deadline, seqs, mode: str, flag: str, set_paths, run, warm_up, reps: int) -> None:
    """Per length, the reference then the fused path (`set_paths(fused)` switches them): `run(ids)` timed
    `reps` times (after one untimed run where `warm_up(seq)`), peak memory, one record per path."""
    model.eval()
    for seq in seqs:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), device="cuda")
        for fused in (False, True):
            if time.time() > deadline:
                return
            set_paths(fused)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn = lambda: run(ids)  # noqa: E731
            if warm_up(seq):
                fn()
            t = timed(fn, reps)
            log(what="prefill", mode=mode, **{flag: fused}, seq=seq, s=t, tok_s=seq / t,
                peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30)


@torch.no_grad()
def prefill_one_pass(cfg, model, deadline) -> None:
    _prefill_ab(cfg, model, deadline, (4096, 8192, 16384, 32768), "one pass", "fused",
                lambda fused: set_fused(fused, fused), lambda ids: model(ids, last_only=True),
                warm_up=lambda seq: True, reps=2)


@torch.no_grad()
def prefill_long(cfg, model, deadline) -> None:
    _prefill_ab(cfg, model, deadline, (65536, 262144), "chunked 8192 via KV cache", "indexer_fused",
                lambda fused: set_fused(False, fused),
                lambda ids: prefill(model, ids, model.new_caches(1, ids.shape[1], mtp=False), chunk=8192),
                warm_up=lambda seq: seq <= 65536, reps=1)


@torch.no_grad()
def prefill_cached(cfg, model, deadline) -> None:
    default_cached = Attention.fused_cached

    def paths(fused):
        set_fused(False, True)
        Attention.fused = True                 # (fused_cached acts through the cache only; fused_training off)
        Attention.fused_cached = fused
    _prefill_ab(cfg, model, deadline, (65536, 262144), "chunked 8192 via KV cache", "attention_fused_cached", paths,
                lambda ids: prefill(model, ids, model.new_caches(1, ids.shape[1], mtp=False), chunk=8192),
                warm_up=lambda seq: seq <= 65536, reps=1)
    Attention.fused_cached = default_cached


@torch.no_grad()
def decode_eager(cfg, model, deadline) -> None:
    from dsv4.inference.generate import generate_stream
    model.eval()
    prompts = torch.randint(0, cfg.vocab_size, (1, 2048)).tolist()
    for fused in (False, True, False, True):
        if time.time() > deadline:
            return
        set_fused(False, fused)
        stamps = [time.perf_counter() for _ in generate_stream(model, prompts, 24, cuda_graph=False)]
        log(what="decode", cuda_graph=False, indexer_fused=fused, tok_s=(len(stamps) - 1) / (stamps[-1] - stamps[0]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--config", default=str(HERE / "bench_small.json"))
    ap.add_argument("--sections", default="check,bwd,fwd,train,prefill,decode,long,cached")
    ap.add_argument("--budget-s", type=float, default=540)
    ap.add_argument("--bwd-heads", type=int, nargs="+", default=[16],
                    help="head counts for the bwd and fwd sections (the bench config has 16; V4 has 64 / 128)")
    ap.add_argument("--tile-kernels", default="bwd,fwd", help="tiles section: which kernels' variants (bwd, fwd)")
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    cfg = bench_gpu.start_results(args.out, "fused_ab.json", args.config)
    sections = args.sections.split(",")
    if "check" in sections:
        check(cfg)
    model = build(cfg)
    Transformer.head_fp32 = False            # bf16 head, as bench_gpu.py and the transformers baseline
    if "bwd" in sections:
        for h in args.bwd_heads:
            backward_kernels(cfg, h)
    if "fwd" in sections:
        for h in args.bwd_heads:
            forward_kernels(cfg, h)
    if "tiles" in sections:
        for h in args.bwd_heads:
            tile_sweep(cfg, h, args.tile_kernels.split(","))
    if "train" in sections:
        train(cfg, model, deadline)
    if "prefill" in sections:
        prefill_one_pass(cfg, model, deadline)
    if "decode" in sections:
        decode_eager(cfg, model, deadline)
    if "long" in sections:
        prefill_long(cfg, model, deadline)
    if "cached" in sections:
        prefill_cached(cfg, model, deadline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
