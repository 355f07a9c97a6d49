"""The attention's output step for training: the inverse RoPE on each head's last r channels, then the grouped
low-rank projection wo_a, without a pass over the whole output for either.

The plain form (`Attention._output`) rotates o [b, L, h, d] into a new tensor (only r = 64 of each head's 512
channels change) and, compiled, Inductor copies it once more into the group-major layout its batched GEMM
takes, in the forward and again for the gradient: on an H200 (b2×4096, bench config) those two fused copy
kernels took 0.19 + 0.27 ms per layer, ~4 ms of a step (stop 26 profile), where the GEMMs themselves need
~0.05 ms. Here, per group g of h/g heads (i = h/g · d columns, W_g [o_lora, i]):

    y_g  = o_g @ W_gᵀ + Δ_g @ W_g,ropeᵀ      Δ = R(−θ)·o_rope − o_rope, the rotation's change, [T, h/g · r]
    do_g = dy_g @ W_g, then do_rope ← R(+θ)·do_rope in place      (the rotation's adjoint on r of d channels)
    dW_g = dy_gᵀ @ o_g + (dy_gᵀ @ Δ_g) on the rope columns

The batched GEMMs read o in place (the groups are a stride, not a copy) and write do straight into o's layout;
only the rope channels (1/8 of o) are touched elementwise. Both directions are torch custom ops, so a compiled
block calls them as they are (Inductor would otherwise re-materialise the strided views it cannot see through).
Equal to the plain form up to rounding: in fp32 up to summation order (tests/test_grouped_output.py); in bf16
the forward rounds Δ, not the rotated channels, to bf16. H200, b2×4096 (stop 28, `benchmarks/output_step_ab.py`):
forward 0.14 ms against 0.24 for the compiled plain forward, backward 0.16 ms; the compiled + CUDA-graph training
step 72.8 -> 71.2 ms.
"""
from __future__ import annotations

import torch

from .indexer_kernel import available, triton
from .layers import Rotary

__all__ = ["grouped_output", "plain_output"]

ROWS = 64                  # (token, head) rows per program of the rope kernel


def plain_output(o: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference form of the same step (`Attention._output` without autograd, and what the ops are tested
    against): o rotated into a new tensor, then one einsum over the groups -> [b, L, g·o_lora]."""
    b, L = o.shape[:2]
    o = Rotary.apply(o, cos, sin, inverse=True)                                  # undo the query-position RoPE
    return torch.einsum("blgi,gri->blgr", o.reshape(b, L, w.shape[0], -1), w).flatten(2)


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rope_kernel(X, COS, SIN, OUT, n_rows, L, H: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                     SIGN: tl.constexpr, DELTA: tl.constexpr, ROWS: tl.constexpr):
        """Rows (token, head) of X [b·L·H, D]: their last R channels rotated pairwise by SIGN·θ, in fp32; DELTA:
        rotated − original to OUT [rows, R] (X's dtype), else back into X in place. Each row's R channels are
        read and written as one contiguous piece, the pairs split apart in registers (loading the even and the
        odd channels separately, 2-byte accesses at a stride, took 0.15 ms at b2×4096 on an H200)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        ok = rows < n_rows
        ch = tl.arange(0, R)
        i = tl.arange(0, R // 2)
        pos = (rows // H) % L                                         # token position of each row
        x_off = rows.to(tl.int64)[:, None] * D + (D - R) + ch[None, :]
        x = tl.load(X + x_off, mask=ok[:, None]).to(tl.float32)      # [ROWS, R]
        a, b = tl.split(tl.reshape(x, (ROWS, R // 2, 2)))              # channels 2i, 2i + 1: [ROWS, R/2] each
        c = tl.load(COS + pos[:, None] * (R // 2) + i[None, :], mask=ok[:, None])
        s = tl.load(SIN + pos[:, None] * (R // 2) + i[None, :], mask=ok[:, None]) * SIGN
        ra, rb = a * c - b * s, a * s + b * c
        if DELTA:
            ra, rb = ra - a, rb - b
        out = tl.reshape(tl.join(ra, rb), (ROWS, R))
        if DELTA:
            tl.store(OUT + rows.to(tl.int64)[:, None] * R + ch[None, :], out.to(OUT.dtype.element_ty),
                     mask=ok[:, None])
        else:
            tl.store(X + x_off, out.to(X.dtype.element_ty), mask=ok[:, None])


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, r: int, sign: float, delta: bool):
    """x [b, L, h, d] contiguous: its last r channels rotated by sign·θ — delta: (rotated − original) as a new
    [b·L, h·r] tensor in x's dtype; else rotated in place. One Triton pass where Triton runs (the PyTorch form is
    ~10 elementwise kernels over [b·L·h, r] in fp32)."""
    b, L, h, d = x.shape
    if available(x) and not (r // 2) & (r // 2 - 1):                    # (tl.arange: a power of two)
        out = torch.empty(b * L, h * r, dtype=x.dtype, device=x.device) if delta else x
        n = b * L * h
        _rope_kernel[(triton.cdiv(n, ROWS),)](x, cos, sin, out, n, L, H=h, D=d, R=r, SIGN=sign, DELTA=delta,
                                               ROWS=ROWS)
        return out
    part = x[..., d - r:]
    rot = Rotary.rotate(part, cos, sin, inverse=sign < 0)
    if delta:
        return (rot - part.float()).to(x.dtype).view(b * L, h * r)
    part.copy_(rot)
    return x


@torch.library.custom_op("dsv4::grouped_output", mutates_args=())
def _forward(o: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """o [b, L, h, d], w [g, o_lora, h/g·d], cos/sin [L, r/2] -> (y [b, L, g·o_lora], Δ [b·L, g, h/g·r])."""
    b, L, h, d = o.shape
    g, n_out, i = w.shape
    r = 2 * cos.shape[-1]
    T = b * L
    delta = _rope(o, cos, sin, r, -1.0, delta=True).view(T, g, (h // g) * r)
    w_rope = w.view(g, n_out, h // g, d)[..., d - r:].reshape(g, n_out, -1)     # [g, o_lora, h/g·r]
    y = torch.bmm(o.view(T, g, i).transpose(0, 1), w.transpose(1, 2))          # [g, T, o_lora]
    y.baddbmm_(delta.transpose(0, 1), w_rope.transpose(1, 2))
    return y.transpose(0, 1).reshape(b, L, g * n_out), delta


@_forward.register_fake
def _(o, w, cos, sin):
    b, L, h, d = o.shape
    g, n_out, _ = w.shape
    return o.new_empty(b, L, g * n_out), o.new_empty(b * L, g, (h // g) * 2 * cos.shape[-1])


@torch.library.custom_op("dsv4::grouped_output_backward", mutates_args=())
def _backward_op(dy: torch.Tensor, o: torch.Tensor, delta: torch.Tensor, w: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (do [b, L, h, d] in o's dtype, dw [g, o_lora, h/g·d] in w's dtype)."""
    b, L, h, d = o.shape
    g, n_out, i = w.shape
    r = 2 * cos.shape[-1]
    T = b * L
    dy_g = dy.reshape(T, g, n_out).transpose(0, 1)                              # [g, T, o_lora]
    do = torch.empty(T, g, i, dtype=o.dtype, device=o.device)
    torch.bmm(dy_g, w, out=do.transpose(0, 1))                                  # written in o's layout
    _rope(do.view(b, L, h, d), cos, sin, r, 1.0, delta=False)
    dyt = dy_g.transpose(1, 2)                                                  # [g, o_lora, T]
    dw = torch.bmm(dyt, o.view(T, g, i).transpose(0, 1))                        # [g, o_lora, i]
    dw.view(g, n_out, h // g, d)[..., d - r:] += torch.bmm(dyt, delta.transpose(0, 1)).view(g, n_out, h // g, r)
    return do.view(b, L, h, d), dw


@_backward_op.register_fake
def _(dy, o, delta, w, cos, sin):
    return torch.empty_like(o), torch.empty_like(w)


def _setup(ctx, inputs, output):
    o, w, cos, sin = inputs
    ctx.save_for_backward(o, output[1], w, cos, sin)


def _autograd_backward(ctx, dy, _ddelta):
    o, delta, w, cos, sin = ctx.saved_tensors
    do, dw = torch.ops.dsv4.grouped_output_backward(dy.contiguous(), o, delta, w, cos, sin)
    return do, dw, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup)


def grouped_output(o: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Inverse RoPE then the grouped projection: o [b, L, h, d] (positions of cos/sin [L, r/2], fp32), w
    [g, o_lora, h/g·d] in o's dtype -> [b, L, g·o_lora], as `Attention._output` computes before wo_b. Under
    autocast both go in the autocast dtype, as the plain form's einsum takes them (the ops themselves run with
    autocast off: their GEMMs and in-place additions keep one dtype)."""
    dev = o.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        o, w = o.to(dt), w.to(dt)
    with torch.autocast(dev, enabled=False):
        return torch.ops.dsv4.grouped_output(o.contiguous(), w.contiguous(), cos.float().contiguous(),
                                             sin.float().contiguous())[0]
