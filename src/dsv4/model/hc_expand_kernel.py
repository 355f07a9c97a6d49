"""mHC's expand step in one Triton kernel per direction (CUDA): h'_k = post_k · y + Σ_j comb[j, k] · h_j.

Per token y is the sublayer's output [D], h the n streams [n, D], post [n] and comb [n, n] the maps of the
sublayer's pre step (`mhc.hc_expand`). Forward: one pass over h and y, h' written once, in fp32 arithmetic and
y's dtype, as the PyTorch function. Backward, with g = dL/dh', one pass over g, h and y:
    dy = Σ_k post_k · g_k      dh_j = Σ_k comb[j, k] · g_k      dpost_k = Σ_d g_k · y      dcomb[j, k] = Σ_d h_j · g_k
The bytes are what the step must move (forward h, y in and h' out; backward g, h, y in and dh, dy out: ~45 and
~70 µs at b2×4096 on an H100's ~3 TB/s); inductor's kernels for it were not measured apart from their
neighbours. A block of tokens' streams is a [tokens, NP, D-slice] tile (NP = n rounded up to a power of two).
Registered as torch custom ops (`torch.ops.dsv4.hc_expand`, with autograd). On by default under autograd
(`mhc.Fusion.expand_kernel`): H200, bf16, b2×4096: 1.07 vs 1.15 ms fwd+bwd against the compiled PyTorch ops, and
with `hc_pre_kernel` the training step's +5.6% (stop 24).
"""
from __future__ import annotations

import torch

from .indexer_kernel import available, triton

__all__ = ["available", "supported", "hc_expand"]


class Config:
    rows = 16               # BM: tokens per program
    cols = 64               # BD: stream entries per step
    warps = 4


def supported(y: torch.Tensor, h: torch.Tensor) -> bool:
    """The kernel computes this call: y [b, s, D] and h [b, s, n, D] in fp32 or bf16, where Triton runs."""
    return (h.dim() == 4 and y.dim() == 3 and y.dtype in (torch.float32, torch.bfloat16)
            and h.dtype in (torch.float32, torch.bfloat16) and available(h))


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _tiles(M, N: tl.constexpr, NP: tl.constexpr, BM: tl.constexpr):
        """This program's tokens, which exist, the stream ids (padded to NP) and which are real."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        ks = tl.arange(0, NP)
        return rows, rows < M, ks, ks < N

    @triton.jit
    def _expand_fwd(Y, H, POST, COMB, OUT, M, D: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                    BM: tl.constexpr, BD: tl.constexpr):
        rows, r_ok, ks, k_ok = _tiles(M, N, NP, BM)
        rk_ok = r_ok[:, None] & k_ok[None, :]
        post = tl.load(POST + rows[:, None] * N + ks[None, :], mask=rk_ok, other=0.)            # [BM, NP]
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            ok = r_ok[:, None] & (ds < D)[None, :]
            y = tl.load(Y + rows[:, None] * D + ds[None, :], mask=ok, other=0.).to(tl.float32)
            acc = post[:, :, None] * y[:, None, :]                                             # [BM, NP, BD]
            for j in tl.static_range(N):
                c_j = tl.load(COMB + rows[:, None] * (N * N) + j * N + ks[None, :], mask=rk_ok, other=0.)
                h_j = tl.load(H + rows[:, None] * (N * D) + j * D + ds[None, :], mask=ok, other=0.).to(tl.float32)
                acc += c_j[:, :, None] * h_j[:, None, :]
            offs = rows[:, None, None] * (N * D) + ks[None, :, None] * D + ds[None, None, :]
            tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=rk_ok[:, :, None] & ok[:, None, :])

    @triton.jit
    def _expand_bwd(G, Y, H, POST, COMB, DY, DH, DPOST, DCOMB, M, D: tl.constexpr, N: tl.constexpr,
                    NP: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
        rows, r_ok, ks, k_ok = _tiles(M, N, NP, BM)
        rk_ok = r_ok[:, None] & k_ok[None, :]
        post = tl.load(POST + rows[:, None] * N + ks[None, :], mask=rk_ok, other=0.)
        dpost = tl.zeros([BM, NP], dtype=tl.float32)
        dcomb = tl.zeros([BM, NP, NP], dtype=tl.float32)                                      # [token, j, k]
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            ok = r_ok[:, None] & (ds < D)[None, :]
            offs = rows[:, None, None] * (N * D) + ks[None, :, None] * D + ds[None, None, :]
            g = tl.load(G + offs, mask=rk_ok[:, :, None] & ok[:, None, :], other=0.).to(tl.float32)   # [BM, NP, BD]
            y = tl.load(Y + rows[:, None] * D + ds[None, :], mask=ok, other=0.).to(tl.float32)
            dy = tl.sum(post[:, :, None] * g, axis=1)                                          # [BM, BD]
            tl.store(DY + rows[:, None] * D + ds[None, :], dy.to(DY.dtype.element_ty), mask=ok)
            dpost += tl.sum(g * y[:, None, :], axis=2)
            for j in tl.static_range(N):
                c_j = tl.load(COMB + rows[:, None] * (N * N) + j * N + ks[None, :], mask=rk_ok, other=0.)
                h_j = tl.load(H + rows[:, None] * (N * D) + j * D + ds[None, :], mask=ok, other=0.).to(tl.float32)
                tl.store(DH + rows[:, None] * (N * D) + j * D + ds[None, :],
                         tl.sum(c_j[:, :, None] * g, axis=1).to(DH.dtype.element_ty), mask=ok)
                dcomb += tl.where(ks[None, :, None] == j, tl.sum(h_j[:, None, :] * g, axis=2)[:, None, :], 0.)
        tl.store(DPOST + rows[:, None] * N + ks[None, :], dpost, mask=rk_ok)
        tl.store(DCOMB + rows[:, None, None] * (N * N) + ks[None, :, None] * N + ks[None, None, :], dcomb,
                 mask=rk_ok[:, :, None] & k_ok[None, None, :])

    def _meta(D: int, n: int) -> dict:
        return dict(D=D, N=n, NP=triton.next_power_of_2(n), BM=Config.rows, BD=Config.cols, num_warps=Config.warps)

    @torch.library.triton_op("dsv4::hc_expand", mutates_args=())
    def _hc_expand(y: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """y [M, D], h [M, n, D], post [M, n], comb [M, n, n] (fp32) -> h' [M, n, D] in y's dtype."""
        M, n, D = h.shape
        out = torch.empty(M, n, D, dtype=y.dtype, device=y.device)
        torch.library.wrap_triton(_expand_fwd)[(triton.cdiv(M, Config.rows),)](y, h, post, comb, out, M,
                                                                                 **_meta(D, n))
        return out

    @torch.library.triton_op("dsv4::hc_expand_backward", mutates_args=())
    def _hc_expand_backward(g: torch.Tensor, y: torch.Tensor, h: torch.Tensor, post: torch.Tensor,
                            comb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        M, n, D = h.shape
        dy, dh = torch.empty_like(y), torch.empty_like(h)
        dpost, dcomb = torch.empty_like(post), torch.empty_like(comb)
        torch.library.wrap_triton(_expand_bwd)[(triton.cdiv(M, Config.rows),)](
            g, y, h, post, comb, dy, dh, dpost, dcomb, M, **_meta(D, n))
        return dy, dh, dpost, dcomb

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, g):
        return torch.ops.dsv4.hc_expand_backward(g.contiguous(), *ctx.saved_tensors)

    _hc_expand.register_autograd(_backward, setup_context=_setup)


def hc_expand(y: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """`mhc.hc_expand` in one kernel per direction: y [b, s, D], h [b, s, n, D], post [b, s, n], comb [b, s, n, n]
    -> [b, s, n, D] in y's dtype. Requires `supported(y, h)`."""
    b, s, n, D = h.shape
    out = torch.ops.dsv4.hc_expand(y.reshape(b * s, D).contiguous(), h.reshape(b * s, n, D).contiguous(),
                                   post.reshape(b * s, n).float().contiguous(),
                                   comb.reshape(b * s, n, n).float().contiguous())
    return out.view(b, s, n, D)
