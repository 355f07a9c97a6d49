"""Fused lightning-indexer scores (Triton, CUDA): score(t, j) = Σ_h w_{t,h} · ReLU(q_{t,h} · K_j), with the
entries query t cannot see yet set to −inf, without the [queries, heads, entries] tensor the reference path
(`Indexer.select`) builds. All heads of a query share the key tile, so one program loads a block of keys once
and loops over the heads. Forward only: the indexer's top-k is not differentiable.

Numerics follow the reference path: each head's dot product accumulates in fp32 and is rounded to the input
dtype (the reference einsum's output dtype) before ReLU and the fp32 weighting. On a machine without Triton
(or without CUDA) `available()` is False and the reference path runs.
"""
from __future__ import annotations

import os

import torch

try:                                      # Triton ships with CUDA builds of torch; CPU builds lack it
    import triton
    import triton.language as tl
except ImportError:                       # pragma: no cover - depends on the installation
    triton = None


def available(t: torch.Tensor) -> bool:
    """Whether the fused kernel can score tensors living where t lives."""
    if triton is None:
        return False
    return t.is_cuda or (os.environ.get("TRITON_INTERPRET") == "1" and t.device.type == "cpu")


def pick_table(sel: torch.Tensor, n_entries: int) -> torch.Tensor:
    """CSA picks sel [..., k] (entry ids, −1 = none) -> [..., n_entries] bool, True at the picked entries (the −1
    slots land in an extra first column, dropped). The attention's mask form and FlexAttention's block mask both
    read the picks this way."""
    table = torch.zeros(*sel.shape[:-1], n_entries + 1, dtype=torch.bool, device=sel.device)
    return table.scatter_(-1, sel.long() + 1, 1)[..., 1:]


if triton is not None:
    @triton.jit
    def _scores_kernel(Q, W, K, T, OUT, n_keys, ratio,
                       sq_b, sq_c, sq_h, sw_b, sw_c, sk_b, sk_n, so_b, so_c, C,
                       H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       ROUND_BF16: tl.constexpr, IEEE: tl.constexpr):
        pid_m, pid_n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                    # query rows of this program
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # entries
        dims = tl.arange(0, D)
        row_ok = rows < C
        t = tl.load(T + rows, mask=row_ok, other=0)
        n_vis = (t + 1) // ratio                                          # entries query t can see
        out_ptr = OUT + b * so_b + rows[:, None] * so_c + cols[None, :]
        out_ok = row_ok[:, None] & (cols[None, :] < n_keys)
        if pid_n * BLOCK_N >= tl.max(tl.where(row_ok, n_vis, 0)):         # no row sees any of these entries
            acc = tl.full([BLOCK_M, BLOCK_N], float("-inf"), tl.float32)
        else:
            k = tl.load(K + b * sk_b + cols[:, None] * sk_n + dims[None, :], mask=(cols < n_keys)[:, None], other=0.)
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for h in range(H):
                q = tl.load(Q + b * sq_b + rows[:, None] * sq_c + h * sq_h + dims[None, :], mask=row_ok[:, None],
                            other=0.)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                if ROUND_BF16:
                    s = s.to(tl.bfloat16).to(tl.float32)
                w = tl.load(W + b * sw_b + rows * sw_c + h, mask=row_ok, other=0.)
                acc += tl.maximum(s, 0.) * w[:, None]
            acc = tl.where(cols[None, :] < n_vis[:, None], acc, float("-inf"))
        tl.store(out_ptr, acc, mask=out_ok)


@torch.compiler.disable       # called from compiled blocks (train --compile): runs between graphs
def visible_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, ratio: int) -> torch.Tensor:
    """q [b,C,H,c] (bf16 or fp32), w [b,C,H] fp32, keys [b,N,c], t [C] positions -> [b, C, N] fp32 scores,
    −inf where entry j is not yet visible to query t (j ≥ (t+1)//ratio)."""
    b, C, H, c = q.shape
    N = keys.shape[1]
    if q.dtype not in (torch.bfloat16, torch.float32) or c < 16 or c & (c - 1):
        raise ValueError(f"fused indexer: needs bf16/fp32 and a power-of-two head size ≥ 16, got {q.dtype}, {c}")
    q = q.contiguous()
    keys = keys.to(q.dtype).contiguous()
    w = w.float().contiguous()
    t = t.contiguous()
    out = torch.empty(b, C, N, dtype=torch.float32, device=q.device)
    if N == 0 or C == 0:
        return out
    BM, BN = 64, 64 if c > 128 else 128
    grid = (triton.cdiv(C, BM), triton.cdiv(N, BN), b)
    _scores_kernel[grid](q, w, keys, t, out, N, ratio,
                         q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), keys.stride(0), keys.stride(1),
                         out.stride(0), out.stride(1), C,
                         H=H, D=c, BLOCK_M=BM, BLOCK_N=BN, ROUND_BF16=q.dtype == torch.bfloat16,
                         IEEE=q.dtype == torch.float32, num_warps=4)
    return out
