"""mHC's mixing projection in one Triton kernel per direction (CUDA): mixes = (x @ fnᵀ) · rsqrt(mean(x²) + eps).

x is the flattened residual streams of every token ([M, K], K = n·D: 4096 on the bench model, 16384 on V4-Flash)
and fn has only (2+n)·n = 24 rows (n for the final collapse). As PyTorch ops that is an fp32 copy of x (the
official code mixes in fp32), a full-precision GEMM with 24 output columns on cuBLAS's SIMT kernels (a b2×4096
training step on an H100 spent ~18 ms of its 226 ms of GPU time in fp32 SIMT GEMMs, 16–18 calls per kernel:
the count of these mixes, and also of the compressors' fp32 GEMMs — which is which was not resolved), and the
norm over the same rows. Here one pass over x, read in its own dtype, gives the mixes and the norm; the products
are exact fp32 (`input_precision="ieee"`).

Backward, with r = rsqrt(mean(x²) + eps) per row and g = dL/dmixes:
    dx  = (g·r) @ fn − (Σ_n g·mixes) · r² · x / K          (the second term: the norm's own gradient)
    dfn = (g·r)ᵀ @ x                                       (partial sums per slice of rows, then summed: no
                                                             atomics, the same result at every run)
Registered as torch custom ops (`torch.ops.dsv4.hc_mixes`, with autograd) so they trace into the compiled mHC
functions and CUDA graphs. Where Triton cannot run (`available()` False) `mhc` keeps its PyTorch ops.
"""
from __future__ import annotations

import torch

from .indexer_kernel import available, triton

__all__ = ["available", "mixes"]


class Config:
    rows = 64           # BM: tokens per program
    cols = 64           # BK: entries of x per step along K
    row_slices = 64     # dfn: the rows are split into this many slices, one partial sum each


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _mix_fwd(X, W, MIX, RSTD, M, K, N, eps, BM: tl.constexpr, BK: tl.constexpr, NP: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, NP)
        r_ok, c_ok = rows < M, cols < N
        acc = tl.zeros([BM, NP], dtype=tl.float32)
        ss = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            x = tl.load(X + rows[:, None] * K + ks[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.)
            x = x.to(tl.float32)
            w = tl.load(W + cols[None, :] * K + ks[:, None], mask=c_ok[None, :] & k_ok[:, None], other=0.)
            ss += tl.sum(x * x, axis=1)
            acc += tl.dot(x, w, input_precision="ieee")                          # [BM, NP]
        r = 1.0 / tl.sqrt(ss / K + eps)
        tl.store(MIX + rows[:, None] * N + cols[None, :], acc * r[:, None], mask=r_ok[:, None] & c_ok[None, :])
        tl.store(RSTD + rows, r, mask=r_ok)

    @triton.jit
    def _mix_bwd_x(X, W, MIX, RSTD, G, DX, M, K, N, BM: tl.constexpr, BK: tl.constexpr, NP: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.arange(0, NP)
        r_ok, c_ok = rows < M, cols < N
        rc_ok = r_ok[:, None] & c_ok[None, :]
        g = tl.load(G + rows[:, None] * N + cols[None, :], mask=rc_ok, other=0.)
        mix = tl.load(MIX + rows[:, None] * N + cols[None, :], mask=rc_ok, other=0.)
        r = tl.load(RSTD + rows, mask=r_ok, other=0.)
        gr = g * r[:, None]                                                          # [BM, NP]
        c = tl.sum(g * mix, axis=1) * r * r / K                                      # [BM]
        for k0 in range(0, K, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < K
            x_ok = r_ok[:, None] & k_ok[None, :]
            x = tl.load(X + rows[:, None] * K + ks[None, :], mask=x_ok, other=0.).to(tl.float32)
            w = tl.load(W + cols[:, None] * K + ks[None, :], mask=c_ok[:, None] & k_ok[None, :], other=0.)
            dx = tl.dot(gr, w, input_precision="ieee") - c[:, None] * x             # [BM, BK]
            tl.store(DX + rows[:, None] * K + ks[None, :], dx.to(DX.dtype.element_ty), mask=x_ok)

    @triton.jit
    def _mix_bwd_w(X, RSTD, G, PART, M, K, N, rows_per_slice, BM: tl.constexpr, BK: tl.constexpr,
                   NP: tl.constexpr):
        """PART[slice] = Σ over the slice's rows of (g·r)ᵀ x, for one block of BK columns of fn."""
        ks = tl.program_id(0) * BK + tl.arange(0, BK)
        sl = tl.program_id(1)
        cols = tl.arange(0, NP)
        k_ok, c_ok = ks < K, cols < N
        acc = tl.zeros([NP, BK], dtype=tl.float32)
        lo = sl * rows_per_slice
        for m0 in range(lo, lo + rows_per_slice, BM):
            rows = m0 + tl.arange(0, BM)
            r_ok = (rows < M) & (rows < lo + rows_per_slice)
            g = tl.load(G + rows[:, None] * N + cols[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.)
            r = tl.load(RSTD + rows, mask=r_ok, other=0.)
            x = tl.load(X + rows[:, None] * K + ks[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.)
            acc += tl.dot(tl.trans(g * r[:, None]), x.to(tl.float32), input_precision="ieee")   # [NP, BK]
        tl.store(PART + sl * N * K + cols[:, None] * K + ks[None, :], acc, mask=c_ok[:, None] & k_ok[None, :])

    def _np(n: int) -> int:
        return max(16, triton.next_power_of_2(n))           # a dot's inner / outer size is at least 16

    @torch.library.triton_op("dsv4::hc_mixes", mutates_args=())
    def _hc_mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        M, K = x.shape
        N = fn.shape[0]
        mix = torch.empty(M, N, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        BM, BK = Config.rows, Config.cols
        torch.library.wrap_triton(_mix_fwd)[(triton.cdiv(M, BM),)](x, fn, mix, rstd, M, K, N, eps, BM=BM, BK=BK,
                                                                    NP=_np(N), num_warps=4)
        return mix, rstd

    @torch.library.triton_op("dsv4::hc_mixes_backward", mutates_args=())
    def _hc_mixes_backward(x: torch.Tensor, fn: torch.Tensor, mix: torch.Tensor, rstd: torch.Tensor,
                           grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        M, K = x.shape
        N = fn.shape[0]
        BM, BK = Config.rows, Config.cols
        dx = torch.empty_like(x)
        torch.library.wrap_triton(_mix_bwd_x)[(triton.cdiv(M, BM),)](x, fn, mix, rstd, grad, dx, M, K, N, BM=BM,
                                                                      BK=BK, NP=_np(N), num_warps=4)
        slices = max(1, min(Config.row_slices, triton.cdiv(M, BM)))
        per = triton.cdiv(triton.cdiv(M, slices), BM) * BM                 # whole blocks of rows per slice
        slices = triton.cdiv(M, per)
        part = torch.empty(slices, N, K, dtype=torch.float32, device=x.device)
        torch.library.wrap_triton(_mix_bwd_w)[(triton.cdiv(K, BK), slices)](x, rstd, grad, part, M, K, N, per,
                                                                             BM=BM, BK=BK, NP=_np(N), num_warps=4)
        return dx, part.sum(0)

    def _setup(ctx, inputs, output):
        x, fn, _ = inputs
        ctx.save_for_backward(x, fn, output[0], output[1])

    def _backward(ctx, grad_mix, grad_rstd):
        x, fn, mix, rstd = ctx.saved_tensors     # grad_rstd: none flows (`mixes` never hands rstd out)
        dx, dfn = torch.ops.dsv4.hc_mixes_backward(x, fn, mix, rstd, grad_mix.contiguous())
        return dx, dfn, None

    _hc_mixes.register_autograd(_backward, setup_context=_setup)


def mixes(x: torch.Tensor, fn: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., K] (any float dtype), fn [N, K] fp32 -> (x·fnᵀ)·rsqrt(mean(x²) + eps) [..., N] fp32, the same as
    mHC's PyTorch ops up to summation order. Requires `available(x)`."""
    lead = x.shape[:-1]
    mix, _ = torch.ops.dsv4.hc_mixes(x.reshape(-1, x.shape[-1]).contiguous(), fn.contiguous(), eps)
    return mix.view(*lead, fn.shape[0])
