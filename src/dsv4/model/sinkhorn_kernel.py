"""Sinkhorn-Knopp for mHC's comb maps in one Triton kernel per direction (CUDA).

Each token's comb is an n×n matrix (n = hc_mult = 4) normalised 2·iters − 1 times (row softmax, then column,
row, column, …). As PyTorch ops every normalisation is its own reduction, so torch.compile emits one kernel per
normalisation: ~40 launches of ~1 µs per sublayer, ~640 per decode step of the bench model, a third of its GPU
time. Here one program holds a block of tokens' matrices in registers for all iterations.

Backward: the gradient of u ↦ y = u / (Σ_a u + eps) is du = (dy − Σ_a dy·y) / (Σ_a u + eps). The backward kernel
needs each normalisation's input; it recomputes them from the logits (for step k, k normalisations from the
start; ~800 normalisations of the block for 20 iterations, negligible next to a memory round trip) instead of
storing 39 intermediate matrices per token.

Both kernels are registered as torch custom ops (`torch.ops.dsv4.sinkhorn`, with autograd), so they trace into
torch.compile graphs and CUDA graphs (the compiled decode step, compiled blocks). Where Triton cannot run
(`available()` False: CPU without TRITON_INTERPRET=1) `mhc.sinkhorn` keeps its PyTorch loop.
"""
from __future__ import annotations

import torch

from .indexer_kernel import available, triton

BLOCK = 64              # tokens per program

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _den(u, EPS: tl.constexpr, AXIS: tl.constexpr):
        """Σ_AXIS u + eps, broadcast back over AXIS (fp32: EPS is a compile-time fp32 constant)."""
        return tl.expand_dims(tl.sum(u, axis=AXIS), AXIS) + EPS

    @triton.jit
    def _softmax_rows(x, ok, EPS: tl.constexpr):
        """Row softmax + eps of the real entries (pads stay 0): -> (m0, the softmax itself)."""
        x = tl.where(ok, x, float("-inf"))
        mx = tl.max(x, axis=2)
        mx = tl.where(mx == float("-inf"), 0., mx)                     # all-pad rows: exp(−inf) = 0, no NaN
        e = tl.exp(x - tl.expand_dims(mx, 2))
        e = tl.where(ok, e, 0.)
        s = e / tl.maximum(tl.expand_dims(tl.sum(e, axis=2), 2), 1e-30)
        return tl.where(ok, s + EPS, 0.), s

    @triton.jit
    def _tile(pid, M, N: tl.constexpr, NP: tl.constexpr, B: tl.constexpr):
        """Offsets of B tokens' n×n matrices padded to NP×NP, and which entries are real."""
        tok = pid * B + tl.arange(0, B)
        i = tl.arange(0, NP)
        offs = tok[:, None, None] * (N * N) + i[None, :, None] * N + i[None, None, :]
        ok = (tok < M)[:, None, None] & (i < N)[None, :, None] & (i < N)[None, None, :]
        return offs, ok

    @triton.jit
    def sinkhorn_tile(x, ok, ITERS: tl.constexpr, EPS: tl.constexpr):
        """Sinkhorn of a block of [B, NP, NP] logits held in registers (pads: ok False) -> the matrices (pads 0).
        Also called from other kernels (`hc_pre_kernel`)."""
        m, _ = _softmax_rows(x, ok, EPS)
        m = m / _den(m, EPS, 1)                                          # columns
        for _ in tl.static_range(ITERS - 1):
            m = m / _den(m, EPS, 2)                                      # rows
            m = m / _den(m, EPS, 1)                                      # columns
        return tl.where(ok, m, 0.)

    @triton.jit
    def sinkhorn_tile_grad(x, g, ok, ITERS: tl.constexpr, EPS: tl.constexpr):
        """The gradient w.r.t. the logits x [B, NP, NP] of Σ g · sinkhorn_tile(x) (pads: 0)."""
        m0, s = _softmax_rows(x, ok, EPS)
        steps = 2 * ITERS - 1                 # normalisation k: columns for even k, rows for odd k
        for kk in range(steps):
            k = steps - 1 - kk
            u = m0
            for t in range(k // 2):           # recompute the input of normalisation k: (column, row) pairs …
                u = u / _den(u, EPS, 1)
                u = u / _den(u, EPS, 2)
            if k % 2 == 1:                    # … and one more column pass before a row normalisation
                u = u / _den(u, EPS, 1)
                den_r = _den(u, EPS, 2)       # (branch-local names: Triton needs same-shape values across branches)
                g = (g - tl.expand_dims(tl.sum(g * (u / den_r), axis=2), 2)) / den_r
            else:
                den_c = _den(u, EPS, 1)
                g = (g - tl.expand_dims(tl.sum(g * (u / den_c), axis=1), 1)) / den_c
            g = tl.where(ok, g, 0.)           # pads would otherwise pick up −Σ g·y and overflow on eps
        # g is now d(softmax + eps): softmax backward per row
        return tl.where(ok, s * (g - tl.expand_dims(tl.sum(g * s, axis=2), 2)), 0.)

    @triton.jit
    def sinkhorn_tile_grad_stored(x, g, ok, ITERS: tl.constexpr, EPS: tl.constexpr, SCR, offs):
        """`sinkhorn_tile_grad` in O(ITERS) normalisations instead of O(ITERS²): one forward pass writes each
        normalisation's input to scratch memory SCR (2·ITERS − 1 blocks of this program's own, at SCR + step ·
        B·NP·NP + offs, offs [B, NP, NP] within a block), the backward walk reads them back (the same values the
        recomputing form derives, so the same result). Costs a write and a read of 2·ITERS − 1 matrices per token
        (~2.5 KB at n = 4), mostly in L2, instead of ~ITERS² normalisations."""
        STEP: tl.constexpr = x.shape[0] * x.shape[1] * x.shape[2]
        u, s = _softmax_rows(x, ok, EPS)
        steps: tl.constexpr = 2 * ITERS - 1   # normalisation k: columns for even k, rows for odd k
        for k in tl.static_range(steps):
            tl.store(SCR + k * STEP + offs, u)
            u = u / _den(u, EPS, 1 if k % 2 == 0 else 2)
        tl.debug_barrier()                    # the stores above are read below, possibly by other threads
        for kk in tl.static_range(steps):
            j = steps - 1 - kk                # normalisation j, last first (a compile-time number)
            u = tl.load(SCR + j * STEP + offs)
            if j % 2 == 1:
                den_r = _den(u, EPS, 2)
                g = (g - tl.expand_dims(tl.sum(g * (u / den_r), axis=2), 2)) / den_r
            else:
                den_c = _den(u, EPS, 1)
                g = (g - tl.expand_dims(tl.sum(g * (u / den_c), axis=1), 1)) / den_c
            g = tl.where(ok, g, 0.)
        return tl.where(ok, s * (g - tl.expand_dims(tl.sum(g * s, axis=2), 2)), 0.)

    @triton.jit
    def _sinkhorn_fwd(X, Y, M, ITERS: tl.constexpr, EPS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                    B: tl.constexpr):
        offs, ok = _tile(tl.program_id(0), M, N, NP, B)
        x = tl.load(X + offs, mask=ok, other=0.)
        tl.store(Y + offs, sinkhorn_tile(x, ok, ITERS, EPS), mask=ok)

    @triton.jit
    def _sinkhorn_bwd(X, DY, DX, M, ITERS: tl.constexpr, EPS: tl.constexpr, N: tl.constexpr, NP: tl.constexpr,
                    B: tl.constexpr):
        offs, ok = _tile(tl.program_id(0), M, N, NP, B)
        x = tl.load(X + offs, mask=ok, other=0.)
        g = tl.load(DY + offs, mask=ok, other=0.)
        tl.store(DX + offs, sinkhorn_tile_grad(x, g, ok, ITERS, EPS), mask=ok)

    def _launch(kernel, x: torch.Tensor, *tensors: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        out = torch.empty_like(x)
        M = x.numel() // (n * n)
        B = BLOCK if M > 16 else 16                       # decode: one token per sequence
        torch.library.wrap_triton(kernel)[(triton.cdiv(M, B),)](x, *tensors, out, M, ITERS=iters, EPS=eps, N=n,
                                                               NP=triton.next_power_of_2(n), B=B)
        return out

    @torch.library.triton_op("dsv4::sinkhorn", mutates_args=())
    def _sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        return _launch(_sinkhorn_fwd, logits, iters=iters, eps=eps)

    @torch.library.triton_op("dsv4::sinkhorn_backward", mutates_args=())
    def _sinkhorn_backward(logits: torch.Tensor, grad: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        return _launch(_sinkhorn_bwd, logits, grad, iters=iters, eps=eps)

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.iters, ctx.eps = inputs[1], inputs[2]

    def _backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return torch.ops.dsv4.sinkhorn_backward(logits, grad.contiguous(), ctx.iters, ctx.eps), None, None

    _sinkhorn.register_autograd(_backward, setup_context=_setup)


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., n, n] fp32 logits -> the same result as `mhc.sinkhorn`, in one kernel (forward and backward).
    Requires `available(logits)`."""
    return torch.ops.dsv4.sinkhorn(logits.contiguous(), iters, eps)
