"""mHC's whole pre step in one Triton kernel per direction (CUDA): mixes, the three maps, Sinkhorn and the
collapse, for a block of tokens per program, with the streams read twice (forward) or three times (backward)
and nothing of size [tokens, n·D] written but the result.

Forward, per token (h its n streams, x = h flattened to K = n·D values in fp32, as `mhc.hc_pre`):
    mixes = (x @ fnᵀ) · rsqrt(mean(x²) + eps)            one pass over x: products and Σx² together
    a     = mixes · scale[group] + base
    pre   = sigmoid(a_pre) + hc_eps,  post = 2 · sigmoid(a_post),  comb = Sinkhorn(a_comb)   (in registers)
    y     = Σ_i pre_i · h_i                                a second pass over the streams
As PyTorch ops compiled by inductor this step took 1.66 ms forward + backward at b2×4096 on an H100 (bf16
streams; `benchmarks/mhc_mix_ab.py --sections op`), ~18 of them per training step; the bytes it must move
(the streams once or twice per direction, the result, the gradient) take ~0.1 ms.

Backward, with g = dL/da (sigmoid and Sinkhorn backward in registers, the Sinkhorn iterates kept in a scratch
buffer for the walk back: `sinkhorn_kernel.sinkhorn_tile_grad_stored`),
r = rsqrt(mean(x²) + eps) and dz = g · scale · r:
    dpre_i = Σ_d dy_d · h_{i,d}                            pass 1 over the streams and dy
    dh     = pre_i · dy + dz @ fn − (Σ_j g_j·scale_j·mixes_j) · r² · x / K     pass 2, written once
    dfn    = dzᵀ @ x                                       one GEMM over the tokens (`fp32_linear.mm_few_rows`)
    dbase  = Σ_tokens g,  dscale = Σ_tokens Σ_group g · mixes
The products run on tensor cores at fp32 precision (`Config.precision` "tf32x3": three TF32 products per
fp32 one, ~fp32 accuracy; "ieee" is exact fp32 on the CUDA cores, the choice of `hc_mix_kernel`).

The maps live in padded columns: comb at column i·NP4 + j (NP4 = n rounded up to a power of two, so the block
reshapes to [tokens, NP4, NP4] for Sinkhorn), then pre at NC + i and post at NC + n + i. Registered as torch
custom ops (`torch.ops.dsv4.hc_pre`, with autograd), so they trace into compiled graphs and CUDA graphs.
On by default under autograd (`mhc.Fusion.pre_kernel`): on an H200 equal to the PyTorch ops, and with
`hc_expand_kernel` the compiled + CUDA-graph training step at b2×4096 went 100.5K → 106.1K tok/s (stop 24).
Without autograd the PyTorch ops stay (this forward alone: 0.33 vs 0.26 ms).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .fp32_linear import bf16_pieces, mm_few_rows
from .indexer_kernel import available, triton

__all__ = ["available", "supported", "hc_pre"]


class Config:
    rows = 32               # BM: tokens per program (≥ 16, a dot's smallest side)
    cols = 128              # BD: stream entries per step (H200 sweep, stop 23: bwd 0.58 -> 0.39 ms vs 64)
    precision = "tf32x3"    # the dots' input_precision ("ieee": exact fp32 products on the CUDA cores)
    warps = 4
    stages = 0              # num_stages of the loops' pipelining (0: Triton's default)
    bf16_split = True       # bf16 streams: the forward's products as bf16 dots against fn split into three bf16
                            # pieces (`_pieces`: hi + mid + lo carry fp32's 24 bits; each product exact, sums in
                            # fp32) instead of tf32x3 on x converted to fp32. Stop 29, H100, compiled + CUDA-graph
                            # step at b2×4096: 75.6 -> 74.4 ms (`benchmarks/switch_ab.py`)
    split = 1               # forward: pass 1 (the mixes' products) split over this many programs per row block
                            # (`_pre_part`), the rest reading their partial sums; 1: one kernel. H200, b2×4096
                            # (stop 27, device-timed): 0.195-0.206 ms at split 2-8 vs 0.201 — pass 1 is not
                            # what holds the forward back


def supported(h: torch.Tensor, kind: str) -> bool:
    """The kernel computes this call: Sinkhorn-projected comb ('mhc'), n ≥ 3 streams (the comb block must give a
    dot of ≥ 16 columns), fp32 or bf16 streams, and Triton runs where h lives."""
    return (kind == "mhc" and h.dim() == 4 and h.shape[2] >= 3 and h.dtype in (torch.float32, torch.bfloat16)
            and available(h))


def _sizes(n: int) -> tuple[int, int]:
    """n streams -> (NP4, NPP): the comb block is NP4 × NP4 columns, the pre/post block NPP columns."""
    np4 = 1 << (n - 1).bit_length()
    return np4, max(16, 1 << (2 * n - 1).bit_length())


def _pieces(w: torch.Tensor) -> torch.Tensor:
    """w fp32 [NW, K] -> [3, NW, K] bf16 pieces hi, mid, lo with hi + mid + lo = w exactly
    (`fp32_linear.bf16_pieces`: each piece the next 8 significant bits, cut by a bit mask, so the split stays
    exact inside a compiled graph, where this op's body is traced): a bf16 value times each piece is exact in
    fp32, so three bf16 dots give x·w as exactly as fp32 products do, the sums rounded in fp32."""
    return torch.stack(bf16_pieces(w))


def _padded(fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int):
    """fn [n_maps, K], base [n_maps], scale [3] -> W [NW, K], BASE [NW], SCALE [NW] in the padded columns, by
    differentiable slicing and padding (autograd takes the op's gradients of these back to fn, base, scale)."""
    np4, npp = _sizes(n)

    def cols(t: torch.Tensor) -> torch.Tensor:                    # [n_maps, ...] -> [NW, ...]
        rest = t.shape[1:]
        comb = F.pad(t[2 * n:].reshape(n, n, -1), (0, 0, 0, np4 - n, 0, np4 - n)).reshape(np4 * np4, *rest)
        pp = F.pad(t[:2 * n].reshape(2 * n, -1), (0, 0, 0, npp - 2 * n)).reshape(npp, *rest)
        return torch.cat([comb, pp])

    s = scale.float()
    scalep = torch.cat([s[2:3].expand(np4 * np4), s[0:1].expand(n), s[1:2].expand(n), s.new_zeros(npp - 2 * n)])
    return cols(fn.float()).contiguous(), cols(base.float()).contiguous(), scalep.contiguous()


if triton is not None:
    import triton.language as tl

    from .sinkhorn_kernel import sinkhorn_tile, sinkhorn_tile_grad_stored

    @triton.jit
    def _maps(mix_p, mix_c, SCALE, BASE, NC: tl.constexpr, NPP: tl.constexpr, NP4: tl.constexpr, BM: tl.constexpr):
        """a = mixes · scale + base of the pre/post block mix_p [BM, NPP] and the comb block mix_c [BM, NC] ->
        (a_p [BM, NPP], a_c [BM, NP4, NP4])."""
        cc, cp = tl.arange(0, NC), NC + tl.arange(0, NPP)
        a_c = mix_c * tl.load(SCALE + cc)[None, :] + tl.load(BASE + cc)[None, :]
        a_p = mix_p * tl.load(SCALE + cp)[None, :] + tl.load(BASE + cp)[None, :]
        return a_p, tl.reshape(a_c, (BM, NP4, NP4))

    @triton.jit
    def _block(M, N: tl.constexpr, NP4: tl.constexpr, NPP: tl.constexpr, BM: tl.constexpr):
        """This program's BM tokens: rows, which exist, the column ids of the comb and pre/post blocks, and the
        comb matrices' [BM, NP4, NP4] offsets into a [M, N, N] tensor with which entries are real."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        r_ok = rows < M
        ii = tl.arange(0, NP4)
        ok3 = r_ok[:, None, None] & (ii < N)[None, :, None] & (ii < N)[None, None, :]
        offs3 = rows[:, None, None] * (N * N) + ii[None, :, None] * N + ii[None, None, :]
        return rows, r_ok, tl.arange(0, NP4 * NP4), tl.arange(0, NPP), ok3, offs3

    INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

    @triton.jit
    def _dot_bf16(x, w, acc, UPCAST: tl.constexpr):
        """acc + x @ w for bf16 x and w. UPCAST (under Triton's interpreter, whose bf16 dots multiply wrong values:
        Triton 3.6, off by ~1e10 on a 16×16 product): the same exact products in fp32."""
        if UPCAST:
            return acc + tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        return tl.dot(x, w, acc)

    @triton.jit
    def _products(H, W, rows, r_ok, cc, cp, k_lo, k_hi, K: tl.constexpr, NC: tl.constexpr, NPP: tl.constexpr,
                  BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, PIECES: tl.constexpr):
        """Over the flattened streams' entries k_lo … k_hi−1 of rows: the mixes' products with the comb block
        [BM, NC] and the pre/post block [BM, NPP], and Σx² [BM]. PIECES 3: W is [3, NW, K] bf16 (`_pieces`) and
        the streams bf16, each piece one bf16 dot; PIECES 0: W [NW, K] fp32, dots at PREC on x in fp32."""
        NW: tl.constexpr = NC + NPP
        acc_c = tl.zeros([BM, NC], dtype=tl.float32)
        acc_p = tl.zeros([BM, NPP], dtype=tl.float32)
        ss = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BD):             # over the flattened streams: one loop to pipeline
            ks = k0 + tl.arange(0, BD)
            k_ok = ks < k_hi
            x = tl.load(H + rows[:, None] * K + ks[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.)
            xf = x.to(tl.float32)
            if PIECES:
                for p in tl.static_range(PIECES):
                    wc = tl.load(W + p * NW * K + cc[None, :] * K + ks[:, None], mask=k_ok[:, None], other=0.)
                    wp = tl.load(W + p * NW * K + (NC + cp)[None, :] * K + ks[:, None], mask=k_ok[:, None], other=0.)
                    acc_c = _dot_bf16(x, wc, acc_c, INTERPRETED)
                    acc_p = _dot_bf16(x, wp, acc_p, INTERPRETED)
            else:
                wc = tl.load(W + cc[None, :] * K + ks[:, None], mask=k_ok[:, None], other=0.)          # [BD, NC]
                wp = tl.load(W + (NC + cp)[None, :] * K + ks[:, None], mask=k_ok[:, None], other=0.)   # [BD, NPP]
                acc_c += tl.dot(xf, wc, input_precision=PREC)
                acc_p += tl.dot(xf, wp, input_precision=PREC)
            ss += tl.sum(xf * xf, axis=1)
        return acc_c, acc_p, ss

    @triton.jit
    def _pre_part(H, W, PART, SSP, M, D: tl.constexpr, N: tl.constexpr, NP4: tl.constexpr, NPP: tl.constexpr,
                  SPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr, PIECES: tl.constexpr):
        """Pass 1 of _pre_fwd split over SPLIT programs per block of rows (program (i, s): the s-th of SPLIT
        equal slices of the flattened streams): partial products PART [SPLIT, M, NW] and Σx² SSP [SPLIT, M].
        More programs in flight than one per 32 tokens (256 at b2×4096) for a pass that is bound by latency."""
        NC: tl.constexpr = NP4 * NP4
        NW: tl.constexpr = NC + NPP
        K: tl.constexpr = N * D
        KS: tl.constexpr = K // SPLIT
        rows, r_ok, cc, cp, _, _ = _block(M, N, NP4, NPP, BM)
        part = tl.program_id(1)
        acc_c, acc_p, ss = _products(H, W, rows, r_ok, cc, cp, part * KS, part * KS + KS, K, NC, NPP, BM, BD, PREC,
                                     PIECES)
        prow = (part * M + rows)[:, None] * NW
        tl.store(PART + prow + cc[None, :], acc_c, mask=r_ok[:, None])
        tl.store(PART + prow + (NC + cp)[None, :], acc_p, mask=r_ok[:, None])
        tl.store(SSP + part * M + rows, ss, mask=r_ok)

    @triton.jit
    def _pre_fwd(H, W, SCALE, BASE, Y, POST, COMB, MIX, RSTD, PART, SSP, M, EPS: tl.constexpr,
                 HC_EPS: tl.constexpr, D: tl.constexpr, N: tl.constexpr, NP4: tl.constexpr, NPP: tl.constexpr,
                 ITERS: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr,
                 PIECES: tl.constexpr):
        NC: tl.constexpr = NP4 * NP4
        NW: tl.constexpr = NC + NPP
        K: tl.constexpr = N * D
        rows, r_ok, cc, cp, ok3, offs3 = _block(M, N, NP4, NPP, BM)
        # pass 1: the mixes' products and Σx², one read of the streams (or the SPLIT partial sums of _pre_part)
        if SPLIT == 1:
            acc_c, acc_p, ss = _products(H, W, rows, r_ok, cc, cp, 0, K, K, NC, NPP, BM, BD, PREC, PIECES)
        else:
            acc_c = tl.zeros([BM, NC], dtype=tl.float32)
            acc_p = tl.zeros([BM, NPP], dtype=tl.float32)
            ss = tl.zeros([BM], dtype=tl.float32)
            for part in tl.static_range(SPLIT):
                prow = (part * M + rows)[:, None] * NW
                acc_c += tl.load(PART + prow + cc[None, :], mask=r_ok[:, None], other=0.)
                acc_p += tl.load(PART + prow + (NC + cp)[None, :], mask=r_ok[:, None], other=0.)
                ss += tl.load(SSP + part * M + rows, mask=r_ok, other=0.)
        r = 1.0 / tl.sqrt(ss / K + EPS)
        mix_c, mix_p = acc_c * r[:, None], acc_p * r[:, None]
        tl.store(MIX + rows[:, None] * NW + cc[None, :], mix_c, mask=r_ok[:, None])
        tl.store(MIX + rows[:, None] * NW + (NC + cp)[None, :], mix_p, mask=r_ok[:, None])
        tl.store(RSTD + rows, r, mask=r_ok)
        a_p, a_c = _maps(mix_p, mix_c, SCALE, BASE, NC, NPP, NP4, BM)
        sig = tl.sigmoid(a_p)
        pre = sig + HC_EPS                                                              # columns < N
        post_ok = r_ok[:, None] & (cp[None, :] >= N) & (cp[None, :] < 2 * N)
        tl.store(POST + rows[:, None] * N + (cp - N)[None, :], 2. * sig, mask=post_ok)
        tl.store(COMB + offs3, sinkhorn_tile(a_c, ok3, ITERS, HC_EPS), mask=ok3)
        # pass 2: the collapse y = Σ_i pre_i · h_i
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            ok = r_ok[:, None] & (ds < D)[None, :]
            y = tl.zeros([BM, BD], dtype=tl.float32)
            for i in tl.static_range(N):
                p_i = tl.sum(tl.where(cp[None, :] == i, pre, 0.), axis=1)
                x = tl.load(H + rows[:, None] * K + (i * D + ds)[None, :], mask=ok, other=0.).to(tl.float32)
                y += p_i[:, None] * x
            tl.store(Y + rows[:, None] * D + ds[None, :], y.to(Y.dtype.element_ty), mask=ok)

    @triton.jit
    def _pre_bwd(H, W, SCALE, BASE, MIX, RSTD, DY, DPOST, DCOMB, DH, DZ, DA, SCR, M, HC_EPS: tl.constexpr,
                 D: tl.constexpr, N: tl.constexpr, NP4: tl.constexpr, NPP: tl.constexpr, ITERS: tl.constexpr,
                 BM: tl.constexpr, BD: tl.constexpr, PREC: tl.constexpr):
        NC: tl.constexpr = NP4 * NP4
        NW: tl.constexpr = NC + NPP
        K: tl.constexpr = N * D
        rows, r_ok, cc, cp, ok3, offs3 = _block(M, N, NP4, NPP, BM)
        # pass 1: dpre_i = Σ_d dy_d · h_{i,d}
        dpre = tl.zeros([BM, NPP], dtype=tl.float32)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            ok = r_ok[:, None] & (ds < D)[None, :]
            dy = tl.load(DY + rows[:, None] * D + ds[None, :], mask=ok, other=0.).to(tl.float32)
            for i in tl.static_range(N):
                x = tl.load(H + rows[:, None] * K + (i * D + ds)[None, :], mask=ok, other=0.).to(tl.float32)
                dpre += tl.where(cp[None, :] == i, tl.sum(dy * x, axis=1)[:, None], 0.)
        # the maps' backward, in registers
        mix_c = tl.load(MIX + rows[:, None] * NW + cc[None, :], mask=r_ok[:, None], other=0.)
        mix_p = tl.load(MIX + rows[:, None] * NW + (NC + cp)[None, :], mask=r_ok[:, None], other=0.)
        a_p, a_c = _maps(mix_p, mix_c, SCALE, BASE, NC, NPP, NP4, BM)
        sig = tl.sigmoid(a_p)
        post_ok = r_ok[:, None] & (cp[None, :] >= N) & (cp[None, :] < 2 * N)
        dpost = tl.load(DPOST + rows[:, None] * N + (cp - N)[None, :], mask=post_ok, other=0.)
        g_p = tl.where(cp[None, :] < N, dpre, 2. * dpost) * sig * (1. - sig)           # 0 beyond 2N
        scr = SCR + tl.program_id(0) * ((2 * ITERS - 1) * BM * NC)              # this program's scratch
        loc = (tl.arange(0, BM)[:, None, None] * NP4 + tl.arange(0, NP4)[None, :, None]) * NP4 \
            + tl.arange(0, NP4)[None, None, :]
        g_c3 = sinkhorn_tile_grad_stored(a_c, tl.load(DCOMB + offs3, mask=ok3, other=0.), ok3, ITERS, HC_EPS,
                                         scr, loc)
        g_c = tl.reshape(g_c3, (BM, NC))
        tl.store(DA + rows[:, None] * NW + cc[None, :], g_c, mask=r_ok[:, None])
        tl.store(DA + rows[:, None] * NW + (NC + cp)[None, :], g_p, mask=r_ok[:, None])
        dmix_c = g_c * tl.load(SCALE + cc)[None, :]
        dmix_p = g_p * tl.load(SCALE + NC + cp)[None, :]
        r = tl.load(RSTD + rows, mask=r_ok, other=0.)
        c = (tl.sum(dmix_c * mix_c, axis=1) + tl.sum(dmix_p * mix_p, axis=1)) * r * r / K
        dz_c, dz_p = dmix_c * r[:, None], dmix_p * r[:, None]
        tl.store(DZ + rows[:, None] * NW + cc[None, :], dz_c, mask=r_ok[:, None])
        tl.store(DZ + rows[:, None] * NW + (NC + cp)[None, :], dz_p, mask=r_ok[:, None])
        pre = sig + HC_EPS
        # pass 2: dh = pre_i · dy + dz @ fn − c · x, written once
        for i in tl.static_range(N):
            p_i = tl.sum(tl.where(cp[None, :] == i, pre, 0.), axis=1)
            for d0 in range(0, D, BD):
                ds = d0 + tl.arange(0, BD)
                d_ok = ds < D
                ok = r_ok[:, None] & d_ok[None, :]
                ks = i * D + ds
                x = tl.load(H + rows[:, None] * K + ks[None, :], mask=ok, other=0.).to(tl.float32)
                dy = tl.load(DY + rows[:, None] * D + ds[None, :], mask=ok, other=0.).to(tl.float32)
                wc = tl.load(W + cc[:, None] * K + ks[None, :], mask=d_ok[None, :], other=0.)          # [NC, BD]
                wp = tl.load(W + (NC + cp)[:, None] * K + ks[None, :], mask=d_ok[None, :], other=0.)   # [NPP, BD]
                dx = tl.dot(dz_c, wc, input_precision=PREC) + tl.dot(dz_p, wp, input_precision=PREC)
                dx += p_i[:, None] * dy - c[:, None] * x
                tl.store(DH + rows[:, None] * K + ks[None, :], dx.to(DH.dtype.element_ty), mask=ok)

    def _split(K: int) -> int:
        """Config.split where it cuts K into equal slices of whole column steps, else 1."""
        s = Config.split
        return s if s > 1 and K % (s * Config.cols) == 0 else 1

    def _meta(h2: torch.Tensor, n: int, iters: int) -> dict:
        np4, npp = _sizes(n)
        extra = {"num_stages": Config.stages} if Config.stages else {}
        return dict(D=h2.shape[1] // n, N=n, NP4=np4, NPP=npp, ITERS=iters, BM=Config.rows, BD=Config.cols,
                    PREC=Config.precision, num_warps=Config.warps, **extra)

    @torch.library.triton_op("dsv4::hc_pre", mutates_args=())
    def _hc_pre(h2: torch.Tensor, w: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, n: int, iters: int,
                hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
        """h2 [M, n·D]; w [NW, n·D], base [NW], scale [NW] in the padded columns (`_padded`) -> y [M, D],
        post [M, n], comb [M, n, n], and for the backward mixes [M, NW] and rstd [M]."""
        M, K = h2.shape
        y = torch.empty(M, K // n, dtype=h2.dtype, device=h2.device)
        post = torch.empty(M, n, dtype=torch.float32, device=h2.device)
        comb = torch.empty(M, n, n, dtype=torch.float32, device=h2.device)
        mix = torch.empty(M, w.shape[0], dtype=torch.float32, device=h2.device)
        rstd = torch.empty(M, dtype=torch.float32, device=h2.device)
        grid, split, meta = triton.cdiv(M, Config.rows), _split(K), _meta(h2, n, iters)
        pieces = 3 if Config.bf16_split and h2.dtype == torch.bfloat16 else 0
        wk = _pieces(w) if pieces else w            # the products' W: three bf16 pieces, or fp32 as it is
        if split > 1:                               # pass 1 over split × more programs, then the rest
            part = torch.empty(split, M, w.shape[0], dtype=torch.float32, device=h2.device)
            ssp = torch.empty(split, M, dtype=torch.float32, device=h2.device)
            torch.library.wrap_triton(_pre_part)[(grid, split)](
                h2, wk, part, ssp, M, SPLIT=split, PIECES=pieces, **{k: v for k, v in meta.items() if k != "ITERS"})
        else:
            part = ssp = rstd                       # placeholder pointers, unused
        torch.library.wrap_triton(_pre_fwd)[(grid,)](
            h2, wk, scale, base, y, post, comb, mix, rstd, part, ssp, M, EPS=norm_eps, HC_EPS=hc_eps, SPLIT=split,
            PIECES=pieces, **meta)
        return y, post, comb, mix, rstd

    @torch.library.triton_op("dsv4::hc_pre_backward", mutates_args=())
    def _hc_pre_backward(h2: torch.Tensor, w: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                         mix: torch.Tensor, rstd: torch.Tensor, dy: torch.Tensor, dpost: torch.Tensor,
                         dcomb: torch.Tensor, n: int, iters: int, hc_eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> dh2 [M, n·D] (h2's dtype), and the gradients of w, base, scale (fp32, padded columns)."""
        M = h2.shape[0]
        dh = torch.empty_like(h2)
        dz = torch.empty(M, w.shape[0], dtype=torch.float32, device=h2.device)
        da = torch.empty_like(dz)
        grid, np4 = triton.cdiv(M, Config.rows), _sizes(n)[0]
        scratch = torch.empty(grid * (2 * iters - 1) * Config.rows * np4 * np4, dtype=torch.float32, device=h2.device)
        torch.library.wrap_triton(_pre_bwd)[(grid,)](
            h2, w, scale, base, mix, rstd, dy, dpost, dcomb, dh, dz, da, scratch, M, HC_EPS=hc_eps,
            **_meta(h2, n, iters))
        return dh, mm_few_rows(dz.t(), h2), da.sum(0), (da * mix).sum(0)

    def _setup(ctx, inputs, output):
        h2, w, base, scale, n, iters, hc_eps, _ = inputs
        ctx.save_for_backward(h2, w, base, scale, output[3], output[4])
        ctx.n, ctx.iters, ctx.hc_eps = n, iters, hc_eps

    def _backward(ctx, dy, dpost, dcomb, _dmix, _drstd):
        h2, w, base, scale, mix, rstd = ctx.saved_tensors     # mix, rstd: no gradient flows (never handed out)
        M, n = h2.shape[0], ctx.n
        dy = h2.new_zeros(M, h2.shape[1] // n) if dy is None else dy.contiguous()
        dpost = mix.new_zeros(M, n) if dpost is None else dpost.contiguous().float()
        dcomb = mix.new_zeros(M, n, n) if dcomb is None else dcomb.contiguous().float()
        dh, dw, dbase, dscale = torch.ops.dsv4.hc_pre_backward(h2, w, base, scale, mix, rstd, dy, dpost, dcomb,
                                                                n, ctx.iters, ctx.hc_eps)
        return dh, dw, dbase, dscale, None, None, None, None

    _hc_pre.register_autograd(_backward, setup_context=_setup)


def hc_pre(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int, hc_eps: float,
           norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`mhc.hc_pre` (kind 'mhc') in one kernel per direction: h [b, s, n, D] -> sublayer input [b, s, D] (h's
    dtype), post [b, s, n], comb [b, s, n, n] (fp32). Requires `supported(h, 'mhc')`."""
    b, s, n, D = h.shape
    w, basep, scalep = _padded(fn, base, scale, n)
    y, post, comb, _, _ = torch.ops.dsv4.hc_pre(h.reshape(b * s, n * D).contiguous(), w, basep, scalep, n, iters,
                                                hc_eps, norm_eps)
    return y.view(b, s, D), post.view(b, s, n), comb.view(b, s, n, n)
