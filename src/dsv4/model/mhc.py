"""Manifold-constrained Hyper-Connections (mHC): n parallel residual streams mixed by pre / post / comb maps.

Per sublayer, from the flattened streams x = [h_1 … h_n] (fp32):
    mixes = (x @ fnᵀ) · rsqrt(mean(x²) + eps)                       # an unweighted RMSNorm folded in
    pre   = sigmoid(mixes[:n]    · scale0 + base[:n]) + hc_eps       # collapse weights
    post  = 2 · sigmoid(mixes[n:2n] · scale1 + base[n:2n])           # expand weights
    comb  = Sinkhorn(softmax_rows(mixes[2n:] · scale2 + base[2n:]))  # doubly-stochastic stream mixing
and the sublayer output y re-enters as h'_k = post_k · y + Σ_j comb[j, k] · h_j.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..compiling import compile_fn
from . import hc_expand_kernel, hc_mix_kernel, hc_pre_kernel, sinkhorn_kernel


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """[..., n, n] logits -> (approximately) doubly-stochastic matrix, in the official iteration order:
    row softmax (+eps), column normalisation, then (iters-1) × (row, column) normalisations, each
    dividing by (sum + eps)."""
    m = logits.softmax(-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


def hc_mixes(h: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """h [b, s, n, D], fn [m, n·D] -> (x @ fnᵀ) · rsqrt(mean(x²) + eps) [b, s, m] fp32, x the flattened streams
    in fp32 (as the official code mixes). By one Triton kernel where `Fusion.mix_kernel` and Triton runs here."""
    if Fusion.mix_kernel and hc_mix_kernel.available(h):
        return hc_mix_kernel.mixes(h.flatten(2), fn.float(), norm_eps)
    x = h.flatten(2).float()                                                   # [b, s, n·D]
    return F.linear(x, fn.float()) * torch.rsqrt(x.square().mean(-1, keepdim=True) + norm_eps)


def hc_maps(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int,
            hc_eps: float, norm_eps: float, kind: str = "mhc") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h [b, s, n, D] with fn [(2+n)·n, n·D], base [(2+n)·n], scale [3] -> pre [b,s,n], post [b,s,n],
    comb [b,s,n,n] (fp32). kind 'mhc' projects comb with Sinkhorn; 'hc' leaves it unconstrained (ablation)."""
    n = h.shape[2]
    mixes = hc_mixes(h, fn, norm_eps)                                          # [b, s, (2+n)·n]
    scale, base = scale.float(), base.float()
    pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
    if kind == "mhc":
        use_kernel = Fusion.enabled and comb.is_cuda and sinkhorn_kernel.available(comb)
        comb = (sinkhorn_kernel.sinkhorn if use_kernel else sinkhorn)(comb, iters, hc_eps)
    return pre, post, comb


def hc_collapse(h: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """Σ_j pre_j · h_j : streams [b,s,n,D] -> sublayer input [b,s,D]."""
    return (pre.unsqueeze(-1) * h.float()).sum(2).to(h.dtype)


def hc_expand(y: torch.Tensor, h: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """h'_k = post_k · y + Σ_j comb[j, k] · h_j   (y [b,s,D], h [b,s,n,D]) -> [b, s, n, D]. By one Triton kernel
    per direction under autograd where `Fusion.expand_kernel` and the kernel supports the call
    (`hc_expand_kernel`)."""
    if Fusion.expand_kernel and torch.is_grad_enabled() and hc_expand_kernel.supported(y, h):
        return hc_expand_kernel.hc_expand(y, h, post, comb)
    if torch.compiler.is_compiling():
        # inductor fuses this broadcast product and its sum over j into the pointwise kernel around it; the einsum
        # would become a batched GEMM of [n, n] by [n, D] per token (cuBLAS: ~0.2 ms per call at b2×4096)
        mixed = (comb.unsqueeze(-1) * h.float().unsqueeze(-2)).sum(2)                   # [b, s, n(k), D]
    else:
        mixed = torch.einsum("bsjk,bsjd->bskd", comb, h.float())                      # eager: no [.., n, n, D]
    return (post.unsqueeze(-1) * y.float().unsqueeze(-2) + mixed).to(y.dtype)


def hc_head(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
            hc_eps: float, norm_eps: float) -> torch.Tensor:
    """Final collapse before the output norm: pre weights only, fn [n, n·D], base [n], scale [1]."""
    mixes = hc_mixes(h, fn, norm_eps)                                          # [b, s, n]
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + hc_eps                  # [b, s, n]
    return hc_collapse(h, pre)


def hc_pre(h: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, iters: int, hc_eps: float,
           norm_eps: float, kind: str = "mhc") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_maps then hc_collapse: -> sublayer input [b,s,D], post [b,s,n], comb [b,s,n,n]. By one Triton kernel
    per direction under autograd where `Fusion.pre_kernel` and the kernel supports the call (`hc_pre_kernel`)."""
    if Fusion.pre_kernel and torch.is_grad_enabled() and hc_pre_kernel.supported(h, kind):
        return hc_pre_kernel.hc_pre(h, fn, base, scale, iters, hc_eps, norm_eps)
    pre, post, comb = hc_maps(h, fn, base, scale, iters, hc_eps, norm_eps, kind)
    return hc_collapse(h, pre), post, comb


class Fusion:
    """mHC is a few hundred tiny elementwise/reduction ops per sublayer (Sinkhorn alone: ~6 per iteration); on
    CUDA they are compiled (torch.compile / inductor) into a few fused kernels, forward and backward, and
    Sinkhorn runs as one Triton kernel (`sinkhorn_kernel`; inductor would emit one kernel per normalisation).
    `enabled` False keeps the eager functions everywhere; off CUDA and inside an outer torch.compile they run
    eagerly. `mix_kernel`: the mixing projection + norm by one Triton kernel per direction (`hc_mix_kernel`)
    instead of an fp32 copy and cuBLAS's skinny fp32 GEMM, its own switch (also with `enabled` False). Off: on
    an H100 the op alone was faster (fwd+bwd 1.1 vs 1.5 ms at b2×4096) but the compiled hc_pre around it slower
    (2.1 vs 1.7 ms; inductor fuses the copy and norm into its neighbours) and training within noise.
    `pre_kernel`: the whole of `hc_pre` (mixes, maps, Sinkhorn, collapse) by one Triton kernel per direction
    (`hc_pre_kernel`; tensor-core products at fp32 precision), its own switch too; `expand_kernel`: `hc_expand`
    by one Triton kernel per direction (`hc_expand_kernel`). Both on under autograd where Triton runs (CPU: the
    PyTorch ops): on an H200 the compiled + CUDA-graph training step at b2×4096 went 100.5K → 106.1K tok/s with
    them, b1 86.6K → 90.5K (`benchmarks/mhc_mix_ab.py --switch pre,expand --sections train_graph --no-each`).
    Without autograd (prefill, decode) the PyTorch ops stay: the pre kernel's forward alone took 0.33 ms against
    0.26 ms for the compiled PyTorch forward (b2×4096, H200); the gain is in the backward."""
    enabled = True
    mix_kernel = False
    pre_kernel = True
    expand_kernel = True


def fusion_state() -> dict[str, bool]:
    """Fusion's switches by name, as they are now (benchmarks record them beside their numbers)."""
    return {k: v for k, v in vars(Fusion).items() if not k.startswith("_") and isinstance(v, bool)}


def set_fusion(spec: str) -> dict[str, bool]:
    """'name=0|1,…' (e.g. 'pre_kernel=1,expand_kernel=1') -> sets those Fusion switches and returns them all.
    Anything else is a ValueError naming the item and the switches, never a silent no-op. Set before the first
    step: compiled graphs keep the switches they were traced with."""
    fields = fusion_state()
    wanted = {}
    for item in filter(None, (item.strip() for item in spec.split(","))):
        name, _, value = (part.strip() for part in item.partition("="))
        if name not in fields or value not in ("0", "1"):
            raise ValueError(f"{item!r} is not name=0 or name=1 with name one of: {', '.join(fields)}")
        wanted[name] = value == "1"
    for name, on in wanted.items():                  # all checked first: a bad item sets nothing
        setattr(Fusion, name, on)
    return fusion_state()


def fused(fn: Callable) -> Callable:
    """fn, compiled on CUDA: with static shapes where autograd records (training sees a handful of shapes: each
    sequence length L for the blocks and L−1 for MTP), with dynamic shapes otherwise (prefill at any prompt
    length, decode). Why not dynamic in training too: on an H100 `dsv4 train --cuda-graph` failed at its
    second step inside the backward of a dynamic-shape mHC graph, which asserted a stride of 8·s for a
    [8, s, 4] tensor whose stride was 8192 (s = 1023, MTP's length, in a length-1024 layout) — the same
    assertion at stop 18 (0834e19) and stop 21 (c994e67), each time in some runs and not in others. Static
    graphs have no symbolic strides: a tensor of another layout fails a guard and compiles anew instead."""
    compiled: dict[bool, Callable] = {}

    def run(*args, **kwargs):
        if Fusion.enabled and args[0].is_cuda and not torch.compiler.is_compiling():
            grad = torch.is_grad_enabled()
            if grad not in compiled:
                # one graph per (grad mode, shape family); compile_fn raises dynamo's recompile limit for them
                compiled[grad] = compile_fn(fn, dynamic=False if grad else None)
            return compiled[grad](*args, **kwargs)
        return fn(*args, **kwargs)
    run.__name__ = run.__qualname__ = f"fused_{fn.__name__}"
    run.__doc__ = f"{fn.__name__}, compiled on CUDA (see Fusion and fused)."
    return run


hc_pre_fast = fused(hc_pre)
hc_expand_fast = fused(hc_expand)
hc_head_fast = fused(hc_head)
