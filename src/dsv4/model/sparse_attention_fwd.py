"""Forward of the sparse MQA in Triton, at any start position: prefill through the KV cache as well as one pass.

FlexAttention (sparse_attention.py) serves one-pass calls from position 0; it is compiled per shape, so every
new chunk length of a prefill through the cache would compile anew, and it needs a block mask built per call
(for CSA from a [b, L, entries] membership table). This kernel needs neither: one program per token (or block
of `Config.token_block` tokens) and group of 16 heads (MQA: the heads share every key) walks exactly the keys
that token sees, with an online softmax —

  1. its window band of raw KV: positions max(p − W + 1, raw_start) … p, read from `raw` (the cached tail of
     earlier tokens, then this call's tokens: raw[i] holds position raw_start + i);
  2. its compressed entries: the CSA picks sel[t] (−1 = none; gathered one by one) or, for HCA, every entry
     j with (j + 1)·ratio ≤ p + 1;

then widens the softmax denominator by the head's sink: o = Σ softmax · k / (1 + e^(sink − lse)) (V = K), and
returns the log-denominator with the sink (what the Triton backward takes). Same keys and numbers as the
reference path (`Attention._attend`) up to summation order; scores are not rounded to the input dtype
before the softmax (the reference's bf16 einsum rounds them; FlexAttention does not either).
"""
from __future__ import annotations

import torch

from .indexer_kernel import triton
from .sparse_attention_bwd import available, key_layout  # noqa: F401 - available: where this kernel runs too

if triton is not None:
    import triton.language as tl

    from .sparse_attention_bwd import _dot, _entry_tile

    @triton.jit
    def _online_softmax_step(q, k, ok, m, l_sum, acc, scale, IEEE: tl.constexpr):
        """One key tile k [N, D] (ok [R, N]: which rows see which keys) into the running max m [R], denominator
        l_sum [R] and numerator acc [R, D] of rows q [R, D]."""
        s = tl.where(ok, _dot(q, tl.trans(k), IEEE) * scale, -1.0e30)     # finite: no inf − inf when all masked
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.where(ok, tl.exp(s - m_new[:, None]), 0.)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(k.dtype), k, IEEE)
        return m_new, l_sum, acc

    @triton.jit
    def _fwd_kernel(Q, RAW, COMP, SEL, SINK, O, LSE, PART, PLSE,
                    L, raw_start, t0, window, ratio, n_sel, n_comp, scale,
                    sq_b, sq_t, sq_h, sr_b, sr_t, sc_b, sc_n, ss_b, ss_t, so_b, so_t, so_h, sl_b, sl_t,
                    H: tl.constexpr, HG: tl.constexpr, TB: tl.constexpr, D: tl.constexpr, BN: tl.constexpr,
                    MODE: tl.constexpr, WINDOW: tl.constexpr, INIT: tl.constexpr, FINAL: tl.constexpr,
                    IEEE: tl.constexpr):
        """Queries i0 … i0+TB−1 of this call (position p = t0 + i), one group of HG heads, as TB·HG rows: the
        window band (WINDOW; the union of the TB bands, read once for all rows), then compressed entries (MODE 0
        none, 1 HCA: the entries the last token sees, each row masked to its own; 2 CSA picks: TB = 1), then the
        sink (FINAL). INIT starts from a partial softmax state written by an earlier launch without FINAL:
        PART [b, L, h, d] fp32 = Σ p·k / Σ p, PLSE [b, L, h] = its log-denominator (no sink)."""
        i0, b = tl.program_id(0) * TB, tl.program_id(1)
        r = tl.arange(0, TB * HG)
        tok = i0 + r // HG                                            # [R] query of each row
        heads = tl.program_id(2) * HG + r % HG
        row_ok = (tok < L) & (heads < H)
        dims = tl.arange(0, D)
        q = tl.load(Q + b * sq_b + tok[:, None] * sq_t + heads[:, None] * sq_h + dims[None, :],
                    mask=row_ok[:, None], other=0.)
        p_row = t0 + tok                                              # [R] absolute position of each row
        p_last = t0 + tl.minimum(i0 + TB, L) - 1
        poff = (b * L + tok) * H + heads                              # row of PART / PLSE (contiguous)
        if INIT:
            m = tl.load(PLSE + poff, mask=row_ok, other=-1.0e30)
            l_sum = tl.where(row_ok, 1., 0.)
            acc = tl.load(PART + poff[:, None] * D + dims[None, :], mask=row_ok[:, None], other=0.)
        else:
            m = tl.full([TB * HG], -1.0e30, dtype=tl.float32)
            l_sum = tl.zeros([TB * HG], dtype=tl.float32)
            acc = tl.zeros([TB * HG, D], dtype=tl.float32)
        if WINDOW:
            w0 = tl.maximum(t0 + i0 - window + 1, raw_start)
            for start in range(0, p_last - w0 + 1, BN):               # union of the bands: positions w0 … p_last
                pos = w0 + start + tl.arange(0, BN)
                kin = pos <= p_last
                k = tl.load(RAW + b * sr_b + (pos - raw_start)[:, None] * sr_t + dims[None, :], mask=kin[:, None],
                            other=0.)
                ok = row_ok[:, None] & (pos[None, :] <= p_row[:, None]) & (pos[None, :] > p_row[:, None] - window)
                m, l_sum, acc = _online_softmax_step(q, k, ok, m, l_sum, acc, scale, IEEE)
        if MODE == 1:                                                 # HCA: entry j seen from (j + 1)·ratio − 1 on
            n_c = tl.minimum((p_last + 1) // ratio, n_comp)
            for start in range(0, n_c, BN):
                j = start + tl.arange(0, BN)
                k = tl.load(COMP + b * sc_b + j[:, None] * sc_n + dims[None, :], mask=(j < n_c)[:, None], other=0.)
                ok = row_ok[:, None] & (j[None, :] < n_c) & ((j[None, :] + 1) * ratio <= p_row[:, None] + 1)
                m, l_sum, acc = _online_softmax_step(q, k, ok, m, l_sum, acc, scale, IEEE)
        if MODE == 2:                                                 # CSA: this token's picks (TB = 1)
            for start in range(0, n_sel, BN):
                jc, ok = _entry_tile(SEL, b * ss_b + i0 * ss_t, start, n_sel, BN, MODE)
                k = tl.load(COMP + b * sc_b + jc[:, None] * sc_n + dims[None, :], mask=ok[:, None], other=0.)
                m, l_sum, acc = _online_softmax_step(q, k, ok[None, :] & row_ok[:, None], m, l_sum, acc, scale,
                                                     IEEE)
        lse = m + tl.log(tl.where(row_ok, l_sum, 1.))                 # log-denominator without the sink
        if FINAL:
            sink = tl.load(SINK + heads, mask=row_ok, other=0.)
            top = tl.maximum(lse, sink)
            lse_all = top + tl.log(tl.exp(lse - top) + tl.exp(sink - top))
            o = acc * tl.exp(m - lse_all)[:, None]                    # = acc / l_sum · e^lse / e^lse_all
            tl.store(O + b * so_b + tok[:, None] * so_t + heads[:, None] * so_h + dims[None, :],
                     o.to(O.dtype.element_ty), mask=row_ok[:, None])
            tl.store(LSE + b * sl_b + tok * sl_t + heads, lse_all, mask=row_ok)
        else:
            tl.store(PART + poff[:, None] * D + dims[None, :], acc / tl.where(row_ok, l_sum, 1.)[:, None],
                     mask=row_ok[:, None])
            tl.store(PLSE + poff, lse, mask=row_ok)


class Config:
    head_group = 16           # heads per program: 16 × head_dim tiles at any head count (≥ 16: a dot's rows)
    key_block = 32            # keys per tile of the walk
    warps = 4                 # num_warps of _fwd_kernel (H100, b2×4096, 16 heads: window / CSA / HCA layer
                              # 0.44 / 1.04 / 0.51 ms against 0.51 / 1.32 / 0.66 with 8; fused_attention_ab tiles)
    token_block = 1           # tokens per program, a power of two (rows = token_block · head_group): consecutive
                              # tokens share most of their window band and their HCA entries, read once for all
                              # of them. > 1 in a CSA layer: two launches, the window band blocked, then per token
                              # its picks from that partial state (the picks differ per token). H200, b2×4096,
                              # device-timed (stop 27): window / CSA / HCA 0.318 / 0.985 / 0.387 ms at 1, 0.302 /
                              # 1.063 / 0.351 at 4 (8 warps): too little to adopt; 8 needs > 227 KB shared memory
    block_warps = 8           # num_warps when token_block > 1
    stages = 0                # num_stages of the walks' pipelining (0: Triton's default; 2: CSA 0.90 vs 0.99 ms,
                              # the other kinds within 1%, stop 27)


def _launch(q, raw, comp_c, sel_c, sink, o, lse, part, plse, raw_start, t0, window, ratio, mode, *, tb, walk_window,
            init, final):
    b, L, h, d = q.shape
    HG = Config.head_group
    extra = {"num_stages": Config.stages} if Config.stages else {}
    _fwd_kernel[(triton.cdiv(L, tb), b, triton.cdiv(h, HG))](
        q, raw, comp_c, sel_c, sink, o, lse, part, plse,
        L, raw_start, t0, window, ratio, sel_c.shape[-1], comp_c.shape[1] if mode else 0, d ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), raw.stride(0), raw.stride(1), comp_c.stride(0), comp_c.stride(1),
        sel_c.stride(0), sel_c.stride(1), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        H=h, HG=HG, TB=tb, D=d, BN=Config.key_block, MODE=mode, WINDOW=walk_window, INIT=init, FINAL=final,
        IEEE=q.dtype == torch.float32, num_warps=Config.warps if tb == 1 else Config.block_warps, **extra)


def forward(q: torch.Tensor, raw: torch.Tensor, raw_start: int, t0: int, comp: torch.Tensor | None,
            sel: torch.Tensor | None, sink: torch.Tensor, window: int, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [b,L,h,d] at positions t0 … t0+L−1; raw [b,R,d] raw KV of positions raw_start … (it must hold each
    query's window band: raw_start ≤ t0 − window + 1 or raw_start = 0); comp [b,N,d] the compressed entries so
    far or None; sel [b,L,k] CSA picks (−1 = none) or None (HCA); sink [h] -> o [b,L,h,d] in q's dtype,
    lse [b,L,h] fp32 (log of the softmax denominator, sink included)."""
    b, L, h, d = q.shape
    if raw.shape[1] < t0 + L - raw_start:
        raise ValueError(f"sparse attention: raw KV holds positions {raw_start}…{raw_start + raw.shape[1] - 1}, "
                         f"queries reach {t0 + L - 1}")
    q, raw = q.contiguous(), raw.to(q.dtype).contiguous()
    mode, comp_c, sel_c = key_layout(q, raw, comp, sel)
    o = torch.empty_like(q)
    lse = torch.empty(b, L, h, dtype=torch.float32, device=q.device)
    sink = sink.float().contiguous()
    tb = Config.token_block
    if tb < 1 or tb & (tb - 1):
        raise ValueError(f"sparse_attention_fwd.Config.token_block must be a power of two ≥ 1, not {tb}")
    args = (q, raw, comp_c, sel_c, sink, o, lse)
    if mode == 2 and tb > 1:                     # window band blocked, then each token's picks from that state
        part = torch.empty(b, L, h, d, dtype=torch.float32, device=q.device)
        plse = torch.empty(b, L, h, dtype=torch.float32, device=q.device)
        _launch(*args, part, plse, raw_start, t0, window, ratio, 0, tb=tb, walk_window=True, init=False, final=False)
        _launch(*args, part, plse, raw_start, t0, window, ratio, 2, tb=1, walk_window=False, init=True, final=True)
    else:
        _launch(*args, lse, lse, raw_start, t0, window, ratio, mode, tb=tb if mode != 2 else 1, walk_window=True,
                init=False, final=True)            # (lse: placeholder pointers for PART / PLSE, unused)
    return o, lse
