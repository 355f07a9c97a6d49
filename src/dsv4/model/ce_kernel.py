"""Cross-entropy of a chunk's logits and their gradient in one Triton kernel (the fused head loss, CUDA).

As PyTorch ops, a [2048, 129K] chunk of logits goes through memory about ten times per loss (the fp32 copy of
bf16 logits, logsumexp, the subtraction, exp, the cast of dz back to bf16), ~10 GB per chunk. Here one program
per row reads the logits twice in their own dtype — an online max / sum of exponentials for the log-sum-exp, then
dz = softmax − onehot(target) written in the logits' dtype — and writes the row's loss. The values are those of
the PyTorch ops in fp32 (dz is rounded to the logits' dtype at the store, where the PyTorch path rounds it for the
projection's bf16 backward). Where Triton cannot run (`available()` False) head_loss keeps the PyTorch ops.
"""
from __future__ import annotations

import torch

from .indexer_kernel import available, triton

__all__ = ["available", "loss_and_grad", "scaled"]

BLOCK = 4096            # logits per step of a row's walk
SCALE_BLOCK = 4096      # values per program of `scaled`

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _ce_kernel(Z, T, LOSS, DZ, V, sz, sdz, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        target = tl.load(T + row)
        zr = Z + row * sz
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], dtype=tl.float32)
        for start in range(0, V, BLOCK):                          # log-sum-exp, online
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(zr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        tl.store(LOSS + row, lse - tl.load(zr + target).to(tl.float32))
        for start in range(0, V, BLOCK):                          # dz = softmax − onehot
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(zr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == target, p - 1.0, p)
            tl.store(DZ + row * sdz + cols, p.to(DZ.dtype.element_ty), mask=cols < V)

    @triton.jit
    def _scale_kernel(X, G, OUT, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        g = tl.load(G).to(tl.float32)
        x = tl.load(X + i, mask=i < n)
        tl.store(OUT + i, (x * g).to(OUT.dtype.element_ty), mask=i < n)


def scaled(x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x · g (g a 0-dim tensor) as a new tensor in `dtype`, in one pass: the head loss's backward scales its fp32
    dW [V, D] into the weight's dtype. ATen's mul with a bf16 out= takes its unvectorised casting path there:
    0.52 ms for the bench config's [129K, 1024] on an H200 (stop 26 profile), ~3× what its bytes need."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    _scale_kernel[(triton.cdiv(n, SCALE_BLOCK),)](x, g.reshape(1), out, n, BLOCK=SCALE_BLOCK, num_warps=8)
    return out


def loss_and_grad(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [c, V] logits (any float dtype, rows contiguous), t [c] target ids -> (cross-entropy per row [c] fp32,
    dz = softmax(z) − onehot(t) [c, V] in z's dtype)."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    c, V = z.shape
    loss = torch.empty(c, dtype=torch.float32, device=z.device)
    dz = torch.empty_like(z)
    _ce_kernel[(c,)](z, t.contiguous(), loss, dz, V, z.stride(0), dz.stride(0), BLOCK=BLOCK, num_warps=8)
    return loss, dz
