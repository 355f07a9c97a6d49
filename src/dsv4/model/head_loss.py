"""The output head and its cross-entropy as one step, chunk by chunk (training's LM and MTP losses).

At V4's 129K vocabulary the logits are a step's largest activation: fp32 [tokens, vocab], 4 GiB per 8K tokens,
and as much again for their gradient and for each elementwise pass of the softmax. Here a chunk's logits live
only while its loss and gradients are taken. Since the loss is what gets differentiated, the forward computes
per chunk loss = logsumexp(z) − z[target] and, at once, dz = softmax(z) − onehot(target), then dx and dW
through the projection's own backward; the backward only scales them by the incoming gradient. No logits are
kept for the backward and none recomputed (activation checkpointing ran the head's GEMM twice). What is kept
instead, from the forward to the backward: dx (the size of x) and dW in fp32 ([V, D]: 0.5 GiB on the bench
config, 3.7 GiB at V4-Flash's width), once per loss (LM and MTP). Where the projection is a plain x @ wᵀ
(`linear=True`, as the model's head), each chunk's dW = dzᵀ x is accumulated by one GEMM into that fp32 buffer
in place (bf16 operands, fp32 C) instead of a bf16 [V, D] result added to it (8 × 0.5 ms per b2×4096 step on
the H100 with MTP).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from . import ce_kernel
from .fp32_linear import addmm32_

Project = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]      # (x [c, D], w [V, D]) -> logits [c, V]


class Config:
    kernel = True      # CUDA: each chunk's loss and dz by one Triton kernel (ce_kernel.py) instead of PyTorch ops
                       # (H100, 8192 tokens × 129K vocab, fwd+bwd: 13.9 vs 32.5 ms; same values, tests/test_head_loss.py)
    scale_kernel = True  # CUDA: the backward's g · dW into w's dtype by one Triton pass (ce_kernel.scaled)


def _loss(z: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z [c, V] logits, t [c] targets -> (Σ cross-entropy, logsumexp [c]), in fp32 whatever z's dtype (under
    autocast the projection returns bf16 logits)."""
    z = z.float()
    lse = torch.logsumexp(z, -1)
    return (lse - z.gather(1, t[:, None]).squeeze(1)).sum(), lse


def head_cross_entropy(x: torch.Tensor, w: torch.Tensor, t: torch.Tensor, project: Project, chunk: int,
                       linear: bool = False) -> torch.Tensor:
    """Σ over tokens of cross_entropy(project(x, w), t): x [T, D], w [V, D], t [T] ids in [0, V) -> fp32 scalar.
    Differentiable in x and w; without gradients it only sums the chunks' losses. linear: project(x, w) is
    x @ wᵀ with both cast to the logits' dtype (F.linear, autocast too), so dW can be taken by one GEMM."""
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
        return HeadCrossEntropy.apply(x, w, t, project, chunk, linear)
    return sum(_loss(project(x[i:i + chunk], w), t[i:i + chunk])[0] for i in range(0, x.shape[0], chunk))


class HeadCrossEntropy(torch.autograd.Function):
    """See the module docstring. The projection (with autocast, if on) and its backward are the ones an
    unchunked `cross_entropy(project(x, w), t)` would run, so the numerics match it up to summation order."""

    @staticmethod
    def forward(ctx, x, w, t, project: Project, chunk: int, linear: bool = False):
        want_x, want_w = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        dx = torch.empty_like(x) if want_x else None
        gemm_dw = want_w and linear               # dW by addmm32_ into dw (else autograd's dW, added to it)
        dw = (torch.empty if gemm_dw else torch.zeros)(w.shape, dtype=torch.float32, device=w.device) \
            if want_w else None
        wl = w.detach().requires_grad_(want_w and not gemm_dw)
        for i in range(0, x.shape[0], chunk):
            xc, tc = x[i:i + chunk].detach().requires_grad_(want_x), t[i:i + chunk]
            with torch.enable_grad():
                z = project(xc, wl)                                                # [c, V]
            if Config.kernel and ce_kernel.available(z):
                rows, dz = ce_kernel.loss_and_grad(z.detach(), tc)                 # dz in z's dtype
                total += rows.sum()
            else:
                zf = z.detach().float()                                           # (bf16 logits: upcast here)
                loss, lse = _loss(zf, tc)
                total += loss
                dz = (zf - lse[:, None]).exp_()                                    # softmax, one new buffer
                dz.scatter_add_(1, tc[:, None], torch.full_like(tc[:, None], -1, dtype=dz.dtype))
                del zf
            grads = torch.autograd.grad(z, [a for a in (xc, wl) if a.requires_grad], dz) if want_x or not gemm_dw \
                else ()
            if want_x:
                dx[i:i + chunk] = grads[0]
            if gemm_dw:                                                            # dw (+)= dzᵀ x   [V, D]
                addmm32_(dw, dz.to(z.dtype).t(), xc.detach().to(z.dtype), beta=float(i > 0))
            elif want_w:
                dw += grads[-1]
            del z, dz, grads
        ctx.save_for_backward(dx, dw)
        ctx.w_dtype = w.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        if dw is not None:                                  # g · dw in w's dtype, one pass
            dw = (ce_kernel.scaled(dw, g, ctx.w_dtype) if Config.scale_kernel and ce_kernel.available(dw) else
                  torch.mul(dw, g, out=torch.empty(dw.shape, dtype=ctx.w_dtype, device=dw.device)))
        return (None if dx is None else dx * g.to(dx.dtype), dw, None, None, None, None)
