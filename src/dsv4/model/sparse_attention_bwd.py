"""Backward of the sparse MQA (Triton): what FlexAttention's generic backward cannot exploit in V4.

FlexAttention's backward for head_dim 512 runs 16×16 tiles with separate dK and dV accumulators and computes
whole 128-entry blocks (docs/performance.md: 19 ms per layer at b2×4096, ten times its forward). Here one program
takes one token and all its heads (the heads share every key: MQA) and walks exactly the keys that token sees:
its window band of raw KV, then its CSA picks (gathered one by one) or its visible HCA entries. With p the
softmax weights (sink included in the denominator, LSE saved by the forward) and V = K:

    D_h  = dO_h · o_h                       dS_hi = p_hi · (dO_h · k_i − D_h)
    dq_h = scale · Σ_i dS_hi k_i            dk_i += scale · Σ_h dS_hi q_h + Σ_h p_hi dO_h   (one dKV: K is V)
    dsink_h = −Σ_t p_sink,th · D_th

dk goes to fp32 buffers with atomic adds (keys are shared between tokens). The forward stays FlexAttention's.
"""
from __future__ import annotations

import torch

from . import indexer_kernel
from .indexer_kernel import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _bwd_kernel(Q, KV, COMP, SEL, O, DO, LSE, SINK, DQ, DKV, DCOMP, DSINK,
                    L, window, ratio, n_sel, scale,
                    sq_b, sq_t, sq_h, skv_b, skv_t, sc_b, sc_n, ss_b, ss_t, sl_b, sl_t,
                    H: tl.constexpr, HP: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr,
                    IEEE: tl.constexpr):
        t, b = tl.program_id(0), tl.program_id(1)
        heads = tl.arange(0, HP)
        hm = heads < H
        dims = tl.arange(0, D)
        qoff = b * sq_b + t * sq_t + heads[:, None] * sq_h + dims[None, :]
        q = tl.load(Q + qoff, mask=hm[:, None], other=0.)                                # [HP, D]
        do = tl.load(DO + qoff, mask=hm[:, None], other=0.)
        lse = tl.load(LSE + b * sl_b + t * sl_t + heads, mask=hm, other=float("inf"))     # [HP] (sink included)
        o = tl.load(O + qoff, mask=hm[:, None], other=0.)
        dacc = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)                           # D_h = dO_h · o_h
        dq = tl.zeros([HP, D], dtype=tl.float32)
        w0 = tl.maximum(t - window + 1, 0)
        n_w = t - w0 + 1
        if MODE == 1:
            n_c = (t + 1) // ratio
        elif MODE == 2:
            n_c = n_sel
        else:
            n_c = 0
        for start in range(0, n_w + n_c, BN):
            i = start + tl.arange(0, BN)
            in_w = i < n_w
            j = i - n_w
            if MODE == 2:
                sel = tl.load(SEL + b * ss_b + t * ss_t + j, mask=(~in_w) & (j < n_c), other=-1)
                ok_c = (~in_w) & (sel >= 0)
                jc = tl.where(ok_c, sel, 0)
            else:
                ok_c = (~in_w) & (j < n_c)
                jc = tl.where(ok_c, j, 0)
            ok = in_w | ok_c
            pos = tl.where(in_w, w0 + i, 0)
            kw = tl.load(KV + b * skv_b + pos[:, None] * skv_t + dims[None, :], mask=in_w[:, None], other=0.)
            k = kw
            if MODE != 0:
                kc = tl.load(COMP + b * sc_b + jc[:, None] * sc_n + dims[None, :], mask=ok_c[:, None], other=0.)
                k = tl.where(in_w[:, None], kw, kc)                                     # [BN, D]
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
                dp = tl.dot(do, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
                dp = tl.dot(do, tl.trans(k))
            p = tl.exp(s * scale - lse[:, None])
            p = tl.where(ok[None, :] & hm[:, None], p, 0.)                             # [HP, BN]
            ds = p * (dp - dacc[:, None])
            if IEEE:
                dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision="ieee") * scale \
                    + tl.dot(tl.trans(p.to(do.dtype)), do, input_precision="ieee")
            else:
                dq += tl.dot(ds.to(k.dtype), k)
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q) * scale + tl.dot(tl.trans(p.to(do.dtype)), do)
            tl.atomic_add(DKV + b * skv_b + pos[:, None] * skv_t + dims[None, :], dk, mask=in_w[:, None])
            if MODE != 0:
                tl.atomic_add(DCOMP + b * sc_b + jc[:, None] * sc_n + dims[None, :], dk, mask=ok_c[:, None])
        tl.store(DQ + qoff, (dq * scale).to(DQ.dtype.element_ty), mask=hm[:, None])
        sink = tl.load(SINK + heads, mask=hm, other=0.)
        p_sink = tl.exp(sink - lse)
        tl.store(DSINK + (b * L + t) * H + heads, -p_sink * dacc, mask=hm)


def available(q: torch.Tensor) -> bool:
    """Triton runs where q lives (indexer_kernel.available) and the head size suits tl.dot (a power of two ≥ 16)."""
    d = q.shape[-1]
    return indexer_kernel.available(q) and d >= 16 and not d & (d - 1)


def backward(q, kv, comp, sel, o, do, lse, sink, window: int, ratio: int):
    """Gradients of the sparse MQA: q/o/do [b,L,h,d] (o: the forward's output), kv [b,L,d], comp [b,N,d] or None, sel [b,L,k] or None,
    lse [b,L,h] fp32 (sink in the denominator), sink [h] -> dq (q's dtype), dkv, dcomp (fp32), dsink [h]."""
    b, L, h, d = q.shape
    q, kv, lse = q.contiguous(), kv.to(q.dtype).contiguous(), lse.float().contiguous()
    o, do = o.to(q.dtype).contiguous(), do.to(q.dtype).contiguous()
    mode = 0 if comp is None or comp.shape[1] == 0 else (2 if sel is not None else 1)
    comp_c = comp.to(q.dtype).contiguous() if mode else kv
    sel_c = sel.to(torch.int32).contiguous() if mode == 2 else torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
    dq = torch.empty_like(q)
    dkv = torch.zeros(b, L, d, dtype=torch.float32, device=q.device)
    dcomp = torch.zeros(comp_c.shape, dtype=torch.float32, device=q.device) if mode else dkv
    dsink = torch.empty(b, L, h, dtype=torch.float32, device=q.device)
    _bwd_kernel[(L, b)](q, kv, comp_c, sel_c, o, do, lse, sink.float().contiguous(), dq, dkv, dcomp, dsink,
                        L, window, ratio, sel_c.shape[-1], d ** -0.5,
                        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
                        comp_c.stride(0), comp_c.stride(1), sel_c.stride(0), sel_c.stride(1), lse.stride(0), lse.stride(1),
                        H=h, HP=max(16, triton.next_power_of_2(h)), D=d, BN=16, MODE=mode,
                        IEEE=q.dtype == torch.float32, num_warps=8)
    return dq, dkv, (dcomp if mode else None), dsink.sum((0, 1))
