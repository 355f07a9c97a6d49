"""Backward of the sparse MQA (Triton): what FlexAttention's generic backward cannot exploit in V4.

FlexAttention's backward for head_dim 512 runs 16×16 tiles with separate dK and dV accumulators and computes
whole 128-entry blocks (docs/performance.md: 19 ms per layer at b2×4096, ten times its forward). Here, with p the
softmax weights (sink included in the denominator, LSE saved by the forward) and V = K:

    D_h  = dO_h · o_h                       dS_hi = p_hi · (dO_h · k_i − D_h)
    dq_h = scale · Σ_i dS_hi k_i            dk_i += scale · Σ_h dS_hi q_h + Σ_h p_hi dO_h   (one dKV: K is V)
    dsink_h = −Σ_t p_sink,th · D_th

Two kernels. `_bwd_kernel`: one program per token and group of 16 heads (the heads share every key: MQA; 16
rows × head_dim 512 tiles fit in shared memory at any head count) walks exactly the keys that token sees — its window band, then its CSA picks (gathered one by one) or its visible HCA
entries — for dq, dsink and D; the compressed entries' dk go to an fp32 buffer by atomic adds (a token's picks
are its own). `_dkeys_kernel`: one program per block of keys loops over the rows that attend to them and writes
their dk once, without atomics — for raw keys the tokens whose window holds them (a band; window_dkv='atomic'
instead adds them from the first kernel, the first version: 2.8× slower on window layers); opt-in
(comp_dkv='keys') also for the compressed entries: every token that sees them (HCA) or that picked them (CSA,
from a membership table), the tokens split over several programs whose partial sums are added after.
"""
from __future__ import annotations

import torch

from . import indexer_kernel
from .indexer_kernel import triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _entry_tile(SEL, sel_row, start, n_c, BN: tl.constexpr, MODE: tl.constexpr):
        """Entries start … start+BN−1 of a token's walk over compressed entries: its CSA picks, read from its row
        of SEL (MODE 2; −1 = none), or the entries themselves (HCA) -> (entry ids, 0 where absent; present)."""
        j = start + tl.arange(0, BN)
        if MODE == 2:
            jc = tl.load(SEL + sel_row + j, mask=j < n_c, other=-1)
        else:
            jc = tl.where(j < n_c, j, -1)
        ok = jc >= 0
        return tl.where(ok, jc, 0), ok

    @triton.jit
    def _probs_and_ds(q, do, k, lse, delta, seen, scale, IEEE: tl.constexpr):
        """rows q/do [R, D] against keys k [N, D] (seen [R, N]): softmax weights p (0 where unseen) and
        dS = p · (dO·k − D), both [R, N] fp32."""
        p = tl.where(seen, tl.exp(_dot(q, tl.trans(k), IEEE) * scale - lse[:, None]), 0.)
        return p, p * (_dot(do, tl.trans(k), IEEE) - delta[:, None])

    @triton.jit
    def _dk(q, do, p, ds, scale, IEEE: tl.constexpr):
        """The keys' gradient from these rows, [N, D] fp32: scale · dSᵀ q + pᵀ dO (K is V)."""
        return _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * scale + _dot(tl.trans(p.to(do.dtype)), do, IEEE)

    @triton.jit
    def _bwd_kernel(Q, KV, COMP, SEL, O, DO, LSE, SINK, DQ, DKV, DCOMP, DSINK, DELTA,
                    L, window, ratio, n_sel, scale,
                    sq_b, sq_t, sq_h, skv_b, skv_t, sc_b, sc_n, ss_b, ss_t, sl_b, sl_t,
                    H: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr,
                    WINDOW_DKV: tl.constexpr, COMP_DKV: tl.constexpr, IEEE: tl.constexpr):
        """One token, one group of HG heads: dq over its window band then its compressed entries; the window's
        dkv and the entries' dcomp by atomic adds only if WINDOW_DKV / COMP_DKV (otherwise _dkeys_kernel)."""
        t, b = tl.program_id(0), tl.program_id(1)
        heads = tl.program_id(2) * HG + tl.arange(0, HG)
        hm = heads < H
        dims = tl.arange(0, D)
        qoff = b * sq_b + t * sq_t + heads[:, None] * sq_h + dims[None, :]
        q = tl.load(Q + qoff, mask=hm[:, None], other=0.)                                # [HG, D]
        do = tl.load(DO + qoff, mask=hm[:, None], other=0.)
        lse = tl.load(LSE + b * sl_b + t * sl_t + heads, mask=hm, other=float("inf"))     # [HG] (sink included)
        o = tl.load(O + qoff, mask=hm[:, None], other=0.)
        dacc = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)                           # D_h = dO_h · o_h
        tl.store(DELTA + (b * L + t) * H + heads, dacc, mask=hm)
        dq = tl.zeros([HG, D], dtype=tl.float32)
        w0 = tl.maximum(t - window + 1, 0)
        for start in range(0, t - w0 + 1, BN):                        # window band: keys w0 … t
            pos = w0 + start + tl.arange(0, BN)
            ok = pos <= t
            k = tl.load(KV + b * skv_b + pos[:, None] * skv_t + dims[None, :], mask=ok[:, None], other=0.)
            p, ds = _probs_and_ds(q, do, k, lse, dacc, ok[None, :] & hm[:, None], scale, IEEE)   # [HG, BN]
            dq += _dot(ds.to(k.dtype), k, IEEE)
            if WINDOW_DKV:
                tl.atomic_add(DKV + b * skv_b + pos[:, None] * skv_t + dims[None, :], _dk(q, do, p, ds, scale, IEEE),
                              mask=ok[:, None])
        if MODE != 0:                                                 # compressed entries: HCA visible / CSA picks
            if MODE == 1:
                n_c = (t + 1) // ratio
            else:
                n_c = n_sel
            for start in range(0, n_c, BN):
                jc, ok = _entry_tile(SEL, b * ss_b + t * ss_t, start, n_c, BN, MODE)
                k = tl.load(COMP + b * sc_b + jc[:, None] * sc_n + dims[None, :], mask=ok[:, None], other=0.)
                p, ds = _probs_and_ds(q, do, k, lse, dacc, ok[None, :] & hm[:, None], scale, IEEE)
                dq += _dot(ds.to(k.dtype), k, IEEE)
                if COMP_DKV:
                    tl.atomic_add(DCOMP + b * sc_b + jc[:, None] * sc_n + dims[None, :],
                                  _dk(q, do, p, ds, scale, IEEE), mask=ok[:, None])
        tl.store(DQ + qoff, (dq * scale).to(DQ.dtype.element_ty), mask=hm[:, None])
        sink = tl.load(SINK + heads, mask=hm, other=0.)
        p_sink = tl.exp(sink - lse)
        tl.store(DSINK + (b * L + t) * H + heads, -p_sink * dacc, mask=hm)

    @triton.jit
    def _dkeys_kernel(Q, K, DO, LSE, DELTA, MEMBER, DK, L, n_keys, window, ratio, t_split, scale,
                      sq_b, sq_t, sq_h, sk_b, sk_n, sl_b, sl_t, sm_b, sm_t, so_s, so_b, so_n,
                      H: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
                      TB: tl.constexpr, KIND: tl.constexpr, IEEE: tl.constexpr):
        """BK keys against every (token, head) row that attends to one of them, within this program's range of
        tokens (per step TB tokens × HG heads, head groups looped): their dk accumulates in registers and is
        written once (no atomics). KIND 0: raw keys, rows = the tokens whose window band holds them (k0 …
        k0+BK+W−2); 1: HCA entries, every token that sees them; 2: CSA entries, the tokens that picked them
        (MEMBER [b, L, N] int8). Entries split the tokens over program_id(1) (t_split each; DK then holds one
        partial sum per split)."""
        kb, split, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        k0 = kb * BK
        keys = k0 + tl.arange(0, BK)
        kin = keys < n_keys
        dims = tl.arange(0, D)
        k = tl.load(K + b * sk_b + keys[:, None] * sk_n + dims[None, :], mask=kin[:, None], other=0.)   # [BK, D]
        if KIND == 0:
            t_lo = k0
            t_hi = tl.minimum(k0 + BK - 1 + window - 1, L - 1)
        else:                                                   # from the first token that sees entry k0
            t_lo = tl.maximum((k0 + 1) * ratio - 1, split * t_split)
            t_hi = tl.minimum((split + 1) * t_split - 1, L - 1)
        r = tl.arange(0, TB * HG)
        acc = tl.zeros([BK, D], dtype=tl.float32)
        for step in range(0, tl.maximum(tl.cdiv(t_hi + 1 - t_lo, TB), 0) * tl.cdiv(H, HG)):
            t0 = t_lo + (step // tl.cdiv(H, HG)) * TB
            head = (step % tl.cdiv(H, HG)) * HG + r % HG
            tok = t0 + r // HG
            row_ok = (tok <= t_hi) & (head < H)
            qoff = b * sq_b + tok[:, None] * sq_t + head[:, None] * sq_h + dims[None, :]
            q = tl.load(Q + qoff, mask=row_ok[:, None], other=0.)                          # [TB·HG, D]
            do = tl.load(DO + qoff, mask=row_ok[:, None], other=0.)
            lse = tl.load(LSE + b * sl_b + tok * sl_t + head, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + (b * L + tok) * H + head, mask=row_ok, other=0.)
            seen = row_ok[:, None] & kin[None, :]
            if KIND == 0:
                seen = seen & (keys[None, :] <= tok[:, None]) & (keys[None, :] > tok[:, None] - window)
            elif KIND == 1:
                seen = seen & ((keys[None, :] + 1) * ratio <= tok[:, None] + 1)
            else:
                picked = tl.load(MEMBER + b * sm_b + tok[:, None] * sm_t + keys[None, :], mask=seen, other=0)
                seen = seen & (picked != 0)
            p, ds = _probs_and_ds(q, do, k, lse, delta, seen, scale, IEEE)                # [TB·HG, BK]
            acc += _dk(q, do, p, ds, scale, IEEE)
        tl.store(DK + split * so_s + b * so_b + keys[:, None] * so_n + dims[None, :], acc, mask=kin[:, None])


class Config:
    """window_dkv: 'keys' = the window band's dkv by _dkeys_kernel (per key block, no atomics); 'atomic' =
    by atomic adds from the per-token kernel (the first version; kept for A/B runs). comp_dkv: the same choice for
    the compressed entries' dcomp — 'keys' walks, per block of entries, every token that sees them (HCA) or a
    [b, L, N] membership table of the picks (CSA; only while N ≤ csa_keys_factor · top-k, where the walk over
    all visible tokens costs a few times the picked pairs), with the tokens split over several programs;
    'atomic' (default: 'keys' is not yet measured on a GPU) adds them from the per-token kernel. The membership
    table counts a pick once: the picks of a token are distinct (top-k), as both forms assume."""
    window_dkv = "keys"
    comp_dkv = "atomic"
    csa_keys_factor = 4
    key_block = 32            # keys per _dkeys_kernel program
    token_block = 2           # tokens per step of its loop (× head_group = rows of its dots)
    programs = 264            # _dkeys_kernel programs to aim for over the entries (2 per SM of an H100)
    head_group = 16           # heads per program / step: tiles of 16 × head_dim fit in shared memory at any
                              # head count (V4: 64 / 128 heads; all heads at once would need ~290 KB at 64);
                              # at least 16, the fewest rows a Triton dot takes on a GPU


def available(q: torch.Tensor) -> bool:
    """Triton runs where q lives (indexer_kernel.available) and the head size suits tl.dot (a power of two ≥ 16)."""
    d = q.shape[-1]
    return indexer_kernel.available(q) and d >= 16 and not d & (d - 1)


def key_layout(q: torch.Tensor, raw: torch.Tensor, comp: torch.Tensor | None, sel: torch.Tensor | None):
    """What the kernels walk after the window band -> (MODE: 0 nothing, 1 every visible entry (HCA), 2 the CSA
    picks; the entries in q's dtype, contiguous (raw as a placeholder pointer when none); the picks as int32, or
    a placeholder)."""
    mode = 0 if comp is None or comp.shape[1] == 0 else (2 if sel is not None else 1)
    comp_c = comp.to(q.dtype).contiguous() if mode else raw
    sel_c = sel.to(torch.int32).contiguous() if mode == 2 else torch.zeros(1, 1, 1, dtype=torch.int32, device=q.device)
    return mode, comp_c, sel_c


def backward(q, kv, comp, sel, o, do, lse, sink, window: int, ratio: int):
    """Gradients of the sparse MQA: q/o/do [b,L,h,d] (o: the forward's output), kv [b,L,d], comp [b,N,d] or None, sel [b,L,k] or None,
    lse [b,L,h] fp32 (sink in the denominator), sink [h] -> dq (q's dtype), dkv, dcomp (fp32), dsink [h]."""
    b, L, h, d = q.shape
    q, kv, lse = q.contiguous(), kv.to(q.dtype).contiguous(), lse.float().contiguous()
    o, do = o.to(q.dtype).contiguous(), do.to(q.dtype).contiguous()
    mode, comp_c, sel_c = key_layout(q, kv, comp, sel)
    dq = torch.empty_like(q)
    by_keys = Config.window_dkv == "keys"
    comp_by_keys = mode != 0 and Config.comp_dkv == "keys" and (
        mode == 1 or comp_c.shape[1] <= Config.csa_keys_factor * sel_c.shape[-1])
    dkv = (torch.empty if by_keys else torch.zeros)(b, L, d, dtype=torch.float32, device=q.device)
    dcomp = torch.zeros(comp_c.shape, dtype=torch.float32, device=q.device) if mode and not comp_by_keys else dkv
    dsink = torch.empty(b, L, h, dtype=torch.float32, device=q.device)
    delta = torch.empty(b, L, h, dtype=torch.float32, device=q.device)          # D_h per token, for both kernels
    HG, ieee = Config.head_group, q.dtype == torch.float32
    _bwd_kernel[(L, b, triton.cdiv(h, HG))](
        q, kv, comp_c, sel_c, o, do, lse, sink.float().contiguous(), dq, dkv, dcomp, dsink, delta,
        L, window, ratio, sel_c.shape[-1], d ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
        comp_c.stride(0), comp_c.stride(1), sel_c.stride(0), sel_c.stride(1), lse.stride(0), lse.stride(1),
        H=h, HG=HG, D=d, BN=16, MODE=mode, WINDOW_DKV=not by_keys, COMP_DKV=not comp_by_keys, IEEE=ieee,
        num_warps=8)
    BK = Config.key_block
    if by_keys:
        _dkeys(q, kv, do, lse, delta, None, dkv[None], L, window, ratio, 0, 1, BK, ieee)
    if comp_by_keys:
        # which entries each token picked: [b, L, N] int8 (CSA)
        member = indexer_kernel.pick_table(sel_c, comp_c.shape[1], torch.int8) if mode == 2 else None
        n_blocks = triton.cdiv(comp_c.shape[1], BK)
        splits = max(1, min(16, -(-Config.programs // (n_blocks * b)), L))   # enough programs to fill the GPU
        dcomp = torch.empty(splits, *comp_c.shape, dtype=torch.float32, device=q.device)
        _dkeys(q, comp_c, do, lse, delta, member, dcomp, L, window, ratio, mode, splits, BK, ieee)
        dcomp = dcomp.sum(0)
    return dq, dkv, (dcomp if mode else None), dsink.sum((0, 1))


def _dkeys(q, keys, do, lse, delta, member, out, L, window, ratio, kind, splits, BK, ieee) -> None:
    """Launch _dkeys_kernel over blocks of `keys` [b, N, d] (kind 0: the raw KV) -> out [splits, b, N, d] fp32."""
    b, n, d = keys.shape
    h = q.shape[2]
    m = member if member is not None else keys                     # (a placeholder pointer where unused)
    ms = (member.stride(0), member.stride(1)) if member is not None else (0, 0)
    _dkeys_kernel[(triton.cdiv(n, BK), splits, b)](
        q, keys, do, lse, delta, m, out, L, n, window, ratio, -(-L // splits), d ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), lse.stride(0), lse.stride(1),
        *ms, out.stride(0), out.stride(1), out.stride(2),
        H=h, HG=Config.head_group, D=d, BK=BK, TB=Config.token_block, KIND=kind, IEEE=ieee, num_warps=8)
