"""fp32 projections on bf16 tensor cores: the compressor's `x.float() @ w.float()ᵀ` without fp32 GEMMs.

V4 computes the compressors' projections (wkv, wgate) in fp32. Their inputs are bf16 activations and, in the
official checkpoints, bf16 weights; the product of two bf16 numbers is exact in fp32, so a bf16 GEMM that
accumulates and returns fp32 (`torch.mm(..., out_dtype=torch.float32)`) gives the fp32 GEMM's result up to
summation order, at tensor-core speed (an H100 runs fp32 GEMMs on its CUDA cores, ~15× slower; at b2×4096 the
step's fp32 GEMMs took 14.6 ms). The fp32 operand of the backward (the incoming gradient) is first split
into three bf16 pieces, hi + mid + lo, which hold its 24 mantissa bits: each piece's product is again exact
and the three GEMMs' fp32 sum is the fp32 product to within fp32 rounding.

Forward: y = x · wᵀ. Backward: dW = gᵀ · x, dx = g · w (g split). Used on CUDA for bf16 activations and bf16
weights (bf16 models, the official checkpoints) where torch has the fp32-output bf16 GEMM; elsewhere, and for
fp32 master weights (`dsv4 train`), the plain fp32 product. (fp32 weights split the same way ran in `dsv4 train
--cuda-graph` on the H100 together with GraphedStep(accumulate=False), and a compiled mHC backward then got a
strided gradient at the second step; either change alone ran 40 steps. fp32 weights stay on the fp32 GEMMs.
The same assertion came back at stop 21 without them, both times in a dynamic-shape mHC graph, which training
no longer compiles: see `mhc.fused`.)
"""
from __future__ import annotations

import torch


class Config:
    enabled = True       # False: the plain fp32 GEMMs (x.float() @ w.float().t()) everywhere


def bf16_pieces(a: torch.Tensor) -> list[torch.Tensor]:
    """a (bf16: itself; fp32: hi, mid, lo in bf16 with hi + mid + lo = a exactly, for normal fp32 values).

    Each piece is the rest with its low 16 bits cleared (truncation by a bit mask, not a rounding cast): the
    piece is a bf16 value by construction and rest - piece is exact, so 8 + 8 + 8 significant bits hold all
    24. (A rounding split, rest.bfloat16() then rest - piece.float(), is undone inside torch.compile: Inductor
    drops the bf16 -> fp32 round trip within a fused kernel, mid and lo come out 0 and g is one bf16 piece,
    2.6e-3 off; the H200 test of the compiled projection saw that.)"""
    if a.dtype == torch.bfloat16:
        return [a]
    out, rest = [], a.float()
    for i in range(3):
        top = (rest.view(torch.int32) & -65536).view(torch.float32)              # the top 16 bits: bf16-exact
        out.append(top.bfloat16())
        if i < 2:
            rest = rest - top
    return out


def _fp32_out_gemm(a: torch.Tensor, b: torch.Tensor, op) -> bool:
    """bf16 a and b on CUDA, and a torch whose `op` has the fp32-output form of the bf16 GEMM (aten::mm.dtype,
    aten::addmm.dtype: torch ≥ 2.8)."""
    return a.is_cuda and a.dtype == b.dtype == torch.bfloat16 and hasattr(op, "dtype")


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> fp32 [M, N], accumulated in fp32: bf16 operands on CUDA by the fp32-output bf16
    GEMM (exact products), anything else as an fp32 GEMM (CPU and tests: the same exact products)."""
    if _fp32_out_gemm(a, b, torch.ops.aten.mm):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def addmm32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """acc (fp32) ← beta · acc + a @ b, accumulated in fp32 in acc's own memory: a bf16 GEMM with an fp32 C on
    CUDA (no [M, N] temporary and no separate addition), an fp32 GEMM for anything else. beta 0 ignores acc's
    contents (torch.empty is fine)."""
    if _fp32_out_gemm(a, b, torch.ops.aten.addmm):
        if torch.compiler.is_compiling():
            # traced: the GEMM, then the addition. torch 2.11's tracing of the fp32-output addmm passes out_dtype
            # where beta goes (`addmm() got multiple values for argument 'beta'`: a graph break at every fp32
            # projection of the compiled blocks), and Inductor splits an addmm into these two anyway
            prod = torch.mm(a, b, out_dtype=torch.float32)
            return acc.copy_(prod) if beta == 0 else (acc.add_(prod) if beta == 1 else acc.mul_(beta).add_(prod))
        return torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
    return acc.addmm_(a.float(), b.float(), beta=beta)


def _split_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 precision, a fp32 (split into bf16 pieces) or bf16, b bf16."""
    total = None
    for piece in bf16_pieces(a):
        total = _mm32(piece, b) if total is None else addmm32_(total, piece, b)
    return total


def mm_few_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [m, k] fp32 with few rows @ b [k, n] -> [m, n] in fp32 precision. bf16 b on CUDA: a's three bf16
    pieces stacked as the rows of one fp32-output bf16 GEMM (b, the large operand, is read once, not once per
    piece), then summed; anything else: the fp32 GEMM."""
    if not _fp32_out_gemm(b, b, torch.ops.aten.mm):
        return a.float() @ b.float()
    return _mm32(torch.cat(bf16_pieces(a)), b).unflatten(0, (-1, a.shape[0])).sum(0)


class _Fp32Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _split_mm(x.flatten(0, -2), w.t()).unflatten(0, x.shape[:-1])

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g2 = g.flatten(0, -2).float()                                          # [M, N]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _split_mm(g2, w).unflatten(0, x.shape[:-1]).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = _split_mm(g2.t(), x.flatten(0, -2)).to(w.dtype)               # [N, K]
        return dx, dw


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """The tensor-core form applies: CUDA, bf16 activations and weights, and a torch with the fp32-output bf16
    GEMM (aten::mm.dtype, torch ≥ 2.8)."""
    return Config.enabled and _fp32_out_gemm(x, w, torch.ops.aten.mm)


def fp32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K]ᵀ in fp32 -> [..., N] fp32: the same values as x.float() @ w.float().t() up to
    summation order (module docstring), on tensor cores where `usable`."""
    if usable(x, w):
        return _Fp32Linear.apply(x, w)
    return x.float() @ w.float().t()
