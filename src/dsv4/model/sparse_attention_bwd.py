"""Backward of the sparse MQA (Triton): what FlexAttention's generic backward cannot exploit in V4.

FlexAttention's backward for head_dim 512 runs 16×16 tiles with separate dK and dV accumulators and computes
whole 128-entry blocks (docs/performance.md: 19 ms per layer at b2×4096, ten times its forward). Here, with p the
softmax weights (sink included in the denominator, LSE saved by the forward) and V = K:

    D_h  = dO_h · o_h                       dS_hi = p_hi · (dO_h · k_i − D_h)
    dq_h = scale · Σ_i dS_hi k_i            dk_i += scale · Σ_h dS_hi q_h + Σ_h p_hi dO_h   (one dKV: K is V)
    dsink_h = −Σ_t p_sink,th · D_th

Two kernels. `_bwd_kernel`: one program per token and group of 16 heads (the heads share every key: MQA; 16
rows × head_dim 512 tiles fit in shared memory at any head count) walks exactly the keys that token sees — its
window band, then its CSA picks (gathered one by one) or its visible HCA entries — for dq, dsink and D. The
compressed entries' dk are written as coefficients (scale·dS and p per head) and summed by GEMMs: the CSA
picks' per pick (`pick_dcomp`; the atomic adds of the first version remain as Config.pick_dkv = 'atomic';
H100, b2×4096: a CSA layer's backward 6.1 → 3.3 ms at 16 heads, 22.3 → 11.5 ms at 64), the HCA entries' per
entry (`hca_dcomp`; Config.hca_dkv = 'atomic' for the atomic adds: as fast at the bench shape, but not the
same sum twice). `_dkv_window_kernel`: one program per block of raw keys loops over the tokens whose window
holds them (a band) and writes their dk once, without atomics (window_dkv='atomic' instead adds them from the
first kernel, the first version: 2.8× slower on window layers). So at the bench shape no atomic add is left
and two runs give the same gradients bit for bit (H100, stop 30). The forward is sparse_attention_fwd.py's.
The same walk per block of compressed entries (every token that sees them, or a membership table of the CSA
picks) was measured on the H100 and removed: a CSA layer's backward took 74 ms against 8.5 ms with the atomic
adds (b2×4096, 16 heads), an HCA layer's 2.5 against 2.1 ms.
"""
from __future__ import annotations

import torch

from . import indexer_kernel
from .fp32_linear import addmm32_
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
    def _bwd_kernel(Q, KV, COMP, SEL, O, DO, LSE, SINK, DQ, DKV, DCOMP, DSINK, DELTA, COEF,
                    L, window, ratio, n_sel, n_comp, scale,
                    sq_b, sq_t, sq_h, skv_b, skv_t, sc_b, sc_n, ss_b, ss_t, sl_b, sl_t,
                    H: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr,
                    WINDOW_DKV: tl.constexpr, PICK_COEF: tl.constexpr, IEEE: tl.constexpr):
        """One token, one group of HG heads: dq over its window band then its compressed entries; dcomp by
        atomic adds, or with PICK_COEF each entry's coefficients scale·dS and p written to COEF for GEMMs: CSA
        (MODE 2) per pick as [b, L, k, 2H] (pick_dcomp), HCA (MODE 1) per entry as [b, 2, n_comp, L, H]
        (hca_dcomp; entries the token does not see stay as the caller zeroed them); the window's dkv by atomic
        adds only if WINDOW_DKV (otherwise _dkv_window_kernel)."""
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
                if PICK_COEF:                                         # [HG, BN] scale·dS, then p, to COEF:
                    if MODE == 2:                                     # [b, t, start+j, (0|H)+h]
                        cf = COEF + ((b * L + t) * n_sel + start + tl.arange(0, BN))[None, :] * (2 * H) \
                            + heads[:, None]
                        p_off = H
                    else:                                             # [b, (0|1), jc, t, h]
                        cf = COEF + ((2 * b * n_comp + jc[None, :]) * L + t) * H + heads[:, None]
                        p_off = n_comp * L * H
                    cm = ok[None, :] & hm[:, None]
                    tl.store(cf, (ds * scale).to(COEF.dtype.element_ty), mask=cm)
                    tl.store(cf + p_off, p.to(COEF.dtype.element_ty), mask=cm)
                else:
                    tl.atomic_add(DCOMP + b * sc_b + jc[:, None] * sc_n + dims[None, :],
                                  _dk(q, do, p, ds, scale, IEEE), mask=ok[:, None])
        tl.store(DQ + qoff, (dq * scale).to(DQ.dtype.element_ty), mask=hm[:, None])
        sink = tl.load(SINK + heads, mask=hm, other=0.)
        p_sink = tl.exp(sink - lse)
        tl.store(DSINK + (b * L + t) * H + heads, -p_sink * dacc, mask=hm)

    @triton.jit
    def _scatter_picks(COEF, SEL, DENSE, t0, L, k, n_c, tc, H: tl.constexpr, CB: tl.constexpr, KB: tl.constexpr):
        """pick_dcomp's scatter, one program per token t0 + ti of a chunk of tc tokens and sequence b: the token's
        picks' coefficients COEF [b, L, k, 2H] go to DENSE [b, n_c + 1, 2, tc, H] at row sel (n_c, the spare
        row, for −1 picks and entries the chunk does not hold). A token's picks are distinct, so no two
        programs write one place but the spare row, which is dropped."""
        ti, b = tl.program_id(0), tl.program_id(1)
        row = (b * L + t0 + ti).to(tl.int64)
        c = tl.arange(0, CB)                                          # (dS | p, head) columns of COEF
        c_ok = c < 2 * H
        col = (c // H) * tc * H + c % H                               # their place in a DENSE row [2, tc, H]
        for start in range(0, k, KB):
            j = start + tl.arange(0, KB)
            j_ok = j < k
            s = tl.load(SEL + row * k + j, mask=j_ok, other=-1)
            r = tl.where((s >= 0) & (s < n_c), s, n_c).to(tl.int64)
            ok = j_ok[:, None] & c_ok[None, :]
            v = tl.load(COEF + (row * k + j)[:, None] * (2 * H) + c[None, :], mask=ok)
            dst = ((b * (n_c + 1) + r) * 2 * tc + ti) * H
            tl.store(DENSE + dst[:, None] + col[None, :], v, mask=ok)

    @triton.jit
    def _dkv_window_kernel(Q, KV, DO, LSE, DELTA, DKV, L, window, scale,
                           sq_b, sq_t, sq_h, skv_b, skv_t, sl_b, sl_t,
                           H: tl.constexpr, HG: tl.constexpr, D: tl.constexpr, BK: tl.constexpr,
                           TB: tl.constexpr, IEEE: tl.constexpr):
        """BK raw keys against every (token, head) row whose window band holds one of them (tokens k0 …
        k0+BK+W−2; per step TB tokens × HG heads, head groups looped): their dkv accumulates in registers and is
        written once (no atomics)."""
        kb, b = tl.program_id(0), tl.program_id(1)
        k0 = kb * BK
        keys = k0 + tl.arange(0, BK)
        kin = keys < L
        dims = tl.arange(0, D)
        k = tl.load(KV + b * skv_b + keys[:, None] * skv_t + dims[None, :], mask=kin[:, None], other=0.)  # [BK, D]
        r = tl.arange(0, TB * HG)
        acc = tl.zeros([BK, D], dtype=tl.float32)
        t_end = tl.minimum(k0 + BK - 1 + window - 1, L - 1)
        for step in range(0, tl.cdiv(t_end + 1 - k0, TB) * tl.cdiv(H, HG)):
            t0 = k0 + (step // tl.cdiv(H, HG)) * TB
            head = (step % tl.cdiv(H, HG)) * HG + r % HG
            tok = t0 + r // HG
            row_ok = (tok <= t_end) & (head < H)
            qoff = b * sq_b + tok[:, None] * sq_t + head[:, None] * sq_h + dims[None, :]
            q = tl.load(Q + qoff, mask=row_ok[:, None], other=0.)                          # [TB·HG, D]
            do = tl.load(DO + qoff, mask=row_ok[:, None], other=0.)
            lse = tl.load(LSE + b * sl_b + tok * sl_t + head, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + (b * L + tok) * H + head, mask=row_ok, other=0.)
            seen = row_ok[:, None] & kin[None, :] & (keys[None, :] <= tok[:, None]) \
                & (keys[None, :] > tok[:, None] - window)
            p, ds = _probs_and_ds(q, do, k, lse, delta, seen, scale, IEEE)                # [TB·HG, BK]
            acc += _dk(q, do, p, ds, scale, IEEE)
        tl.store(DKV + b * skv_b + keys[:, None] * skv_t + dims[None, :], acc, mask=kin[:, None])


class Config:
    """window_dkv: 'keys' = the window band's dkv by _dkv_window_kernel (per key block, no atomics); 'atomic' =
    by atomic adds from the per-token kernel (the first version; kept for A/B runs). pick_dkv: the CSA entries'
    dk by 'gemm' (pick_dcomp, up to gemm_max_entries entries) or 'atomic' (the per-token kernel's atomic adds,
    the first version, and the form past that length: its cost is linear in the length, the GEMMs' quadratic)."""
    window_dkv = "keys"
    pick_dkv = "gemm"
    pick_scatter = "triton"   # pick_dcomp's scatter of the coefficients: 'triton' (_scatter_picks, where Triton runs)
                              # or 'index' (ATen's index_put). H200, compiled + graph b2×4096 step with the head
                              # loss's g·dW kernel: 75.2 -> 72.8 ms (stop 28, output_step_ab.py)
    gemm_max_entries = 4096   # compressed entries (CSA: 16K tokens) up to which pick_dkv='gemm' applies
    hca_dkv = "gemm"          # the HCA entries' dk: 'gemm' (each token's coefficients per entry, summed by
                              # `hca_dcomp`'s GEMMs) or 'atomic' (the per-token kernel's fp32 atomic adds into the
                              # same L/128 entries from every token). H100, compiled + CUDA-graph step at b2×4096
                              # (stop 30): 73.90 vs 73.86 ms, equal; but with 'gemm' no atomic add is left in the
                              # attention backward, so two runs give the same gradients bit for bit
    hca_gemm_max_elems = 1 << 27  # coefficient elements (b · 2 · entries · L · heads; 256 MB in bf16) up to
                              # which hca_dkv='gemm' applies: they grow as L²/128
    gemm_chunk_elems = 1 << 27  # elements of one chunk's dense pick matrix (256 MB in bf16)
    key_block = 32            # keys per _dkv_window_kernel program
    token_block = 2           # tokens per step of its loop (× head_group = rows of its dots)
    walk_block = 32           # keys per step of _bwd_kernel's walk (window band, then entries) …
    walk_block_hca = 32       # … in HCA layers (≤ L/128 visible entries). 16 while their dk went by atomic
                              # adds (32 was slower then); with hca_dkv='gemm', H100, compiled + CUDA-graph step
                              # at b2×4096: 73.9 -> 73.2 ms at 32 (stop 30, benchmarks/switch_ab.py)
    warps = 4                 # num_warps of _bwd_kernel
    window_warps = 4          # num_warps of _dkv_window_kernel
    # H100, b2×4096, 16 heads (fused_attention_ab.py --sections tiles; benchmarks/results/2026-11-24_h100_stop18):
    # 32-key steps and 4 warps took the window / CSA / HCA layer's backward from 1.83 / 8.25 / 2.02 ms (16 keys,
    # 8 warps) to 1.13 / 5.75 / 1.78 ms (HCA: 4 warps, 16-key steps); at 64 heads from 6.40 / 31.7 / 7.40 to
    # 3.72 / 22.6 / 6.66 ms.
    # 64-key steps and 4-token steps of the window kernel need more than the H100's shared memory.
    head_group = 16           # heads per program / step: tiles of 16 × head_dim fit in shared memory at any
                              # head count (V4: 64 / 128 heads; all heads at once would need ~290 KB at 64);
                              # at least 16, the fewest rows a Triton dot takes on a GPU


def walk_block(mode: int) -> int:
    """Keys per step of _bwd_kernel's walk for a layer of key_layout's MODE."""
    return Config.walk_block_hca if mode == 1 else Config.walk_block


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


def pick_dcomp(coef: torch.Tensor, sel: torch.Tensor, q: torch.Tensor, do: torch.Tensor, n_entries: int,
               ratio: int) -> torch.Tensor:
    """The CSA entries' dk from each pick's coefficients, by GEMMs instead of atomic adds:

        dcomp[c] = Σ over tokens t that picked c (pick i) of Σ_h coef[t,i,h] · q[t,h] + coef[t,i,H+h] · dO[t,h]

    coef [b,L,k,2H] (scale·dS, then p, per head; written by _bwd_kernel with PICK_COEF), sel [b,L,k] (−1 = none;
    the indexer picks only entries a token sees, j < (t+1)//ratio), q/do [b,L,H,d] -> dcomp [b, n_entries, d]
    fp32. Per chunk of tokens the coefficients are scattered into a dense matrix [entries the chunk sees,
    (token, head)] — zero where a token did not pick the entry; 'no pick' goes to a spare row, dropped — and
    multiplied by the chunk's q and dO on tensor cores (bf16 in, fp32 out). The dense product does n_c / k
    times the useful multiply-adds (n_c the entries the chunk sees, k the picks per token: 1–4× on the bench
    config, k = 256 at 4096 tokens), cheap on tensor cores next to the atomic adds it replaces (2 KB per pick,
    ~1G fp32 adds per CSA layer at b2×4096); the excess grows with the length, hence Config.gemm_max_entries."""
    b, L, k, h2 = coef.shape
    h, d = h2 // 2, q.shape[-1]
    dcomp = torch.zeros(b, n_entries, d, dtype=torch.float32, device=q.device)
    step = Config.gemm_chunk_elems // max(1, b * (n_entries + 1) * h2)
    step = 1 << max(0, step.bit_length() - 1)                   # a power of two: equal chunks at 2^n tokens
    bi = torch.arange(b, device=q.device)[:, None, None]
    scatter = Config.pick_scatter == "triton" and indexer_kernel.available(coef)
    if scatter:
        coef, sel = coef.contiguous(), sel.contiguous()
    for t0 in range(0, L, step):
        t1 = min(L, t0 + step)
        n_c = min(n_entries, t1 // ratio)                       # entries the chunk's last token sees
        if n_c == 0:
            continue
        dense = coef.new_zeros(b, n_c + 1, 2, t1 - t0, h)                        # [b, entry, (dS|p), t, h]
        if scatter:                         # (ATen's index_put below: 12 × 155 µs per step on an H200, stop 26)
            _scatter_picks[(t1 - t0, b)](coef, sel, dense, t0, L, k, n_c, t1 - t0,
                                         H=h, CB=triton.next_power_of_2(2 * h), KB=64)
        else:
            s = sel[:, t0:t1]                                                     # [b, tc, k]
            rows = torch.where((s >= 0) & (s < n_c), s, n_c).long()              # n_c: the spare row
            ti = torch.arange(t1 - t0, device=q.device)[None, :, None]
            dense[bi, rows, :, ti] = coef[:, t0:t1].unflatten(-1, (2, h))        # [b, tc, k] + [2, h]
        for i in range(b):
            for part, x in enumerate((q, do)):
                addmm32_(dcomp[i, :n_c], dense[i, :n_c, part].flatten(1), x[i, t0:t1].flatten(0, 1))
    return dcomp


def hca_dcomp(coef: torch.Tensor, q: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """The HCA entries' dk from each token's coefficients, by GEMMs instead of atomic adds:

        dcomp[j] = Σ_t Σ_h coef[0, j, t, h] · q[t, h] + coef[1, j, t, h] · dO[t, h]

    coef [b, 2, n_entries, L, H] (scale·dS, then p; zero where token t does not see entry j), q/do [b, L, H, d]
    -> dcomp [b, n_entries, d] fp32: per sequence two GEMMs [n_entries, L·H] @ [L·H, d] on tensor cores (bf16
    in, fp32 accumulated), reading q and dO once."""
    b, _, n, L, h = coef.shape
    dcomp = torch.empty(b, n, q.shape[-1], dtype=torch.float32, device=q.device)
    for i in range(b):
        addmm32_(dcomp[i], coef[i, 0].flatten(1), q[i].flatten(0, 1), beta=0.0)
        addmm32_(dcomp[i], coef[i, 1].flatten(1), do[i].flatten(0, 1))
    return dcomp


def backward(q, kv, comp, sel, o, do, lse, sink, window: int, ratio: int):
    """Gradients of the sparse MQA: q/o/do [b,L,h,d] (o: the forward's output), kv [b,L,d], comp [b,N,d] or None, sel [b,L,k] or None,
    lse [b,L,h] fp32 (sink in the denominator), sink [h] -> dq (q's dtype), dkv, dcomp (fp32), dsink [h]."""
    b, L, h, d = q.shape
    q, kv, lse = q.contiguous(), kv.to(q.dtype).contiguous(), lse.float().contiguous()
    o, do = o.to(q.dtype).contiguous(), do.to(q.dtype).contiguous()
    mode, comp_c, sel_c = key_layout(q, kv, comp, sel)
    dq = torch.empty_like(q)
    by_keys = Config.window_dkv == "keys"
    dkv = (torch.empty if by_keys else torch.zeros)(b, L, d, dtype=torch.float32, device=q.device)
    n_comp = comp_c.shape[1] if mode else 0
    pick_gemm = mode == 2 and Config.pick_dkv == "gemm" and n_comp <= Config.gemm_max_entries
    hca_gemm = mode == 1 and Config.hca_dkv == "gemm" and b * 2 * n_comp * L * h <= Config.hca_gemm_max_elems
    dcomp = torch.zeros(comp_c.shape, dtype=torch.float32, device=q.device) if mode and not (pick_gemm or hca_gemm) \
        else dkv                                                                # (dkv: a placeholder pointer)
    if pick_gemm:
        coef = q.new_empty(b, L, sel_c.shape[-1], 2 * h)
    elif hca_gemm:
        coef = q.new_zeros(b, 2, n_comp, L, h)                                  # zero: entries a token does not see
    else:
        coef = dkv                                                              # a placeholder pointer
    dsink = torch.empty(b, L, h, dtype=torch.float32, device=q.device)
    delta = torch.empty(b, L, h, dtype=torch.float32, device=q.device)          # D_h per token, for both kernels
    HG, ieee = Config.head_group, q.dtype == torch.float32
    _bwd_kernel[(L, b, triton.cdiv(h, HG))](
        q, kv, comp_c, sel_c, o, do, lse, sink.float().contiguous(), dq, dkv, dcomp, dsink, delta, coef,
        L, window, ratio, sel_c.shape[-1], n_comp, d ** -0.5,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
        comp_c.stride(0), comp_c.stride(1), sel_c.stride(0), sel_c.stride(1), lse.stride(0), lse.stride(1),
        H=h, HG=HG, D=d, BN=walk_block(mode), MODE=mode, WINDOW_DKV=not by_keys, PICK_COEF=pick_gemm or hca_gemm,
        IEEE=ieee,
        num_warps=Config.warps)
    if by_keys:
        BK = Config.key_block
        _dkv_window_kernel[(triton.cdiv(L, BK), b)](q, kv, do, lse, delta, dkv, L, window, d ** -0.5,
                                                    q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1),
                                                    lse.stride(0), lse.stride(1), H=h, HG=HG, D=d, BK=BK,
                                                    TB=Config.token_block, IEEE=ieee,
                                                    num_warps=Config.window_warps)
    if pick_gemm:
        dcomp = pick_dcomp(coef, sel_c, q, do, n_comp, ratio)
    elif hca_gemm:
        dcomp = hca_dcomp(coef, q, do)
    return dq, dkv, (dcomp if mode else None), dsink.sum((0, 1))
