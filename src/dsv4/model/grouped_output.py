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
the forward rounds Δ, not the rotated channels, to bf16.
"""
from __future__ import annotations

import torch

__all__ = ["grouped_output"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """x [T, h, r] (any strides; rows = tokens of cos/sin [T, r/2]) rotated by sign·θ pairwise, fp32."""
    x = x.float()
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, None], sign * sin[:, None]
    return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)


def _positions(cos: torch.Tensor, batch: int) -> torch.Tensor:
    """cos [L, r/2] -> [batch·L, r/2], one row per token of o flattened over (b, L)."""
    return cos.repeat(batch, 1) if batch > 1 else cos


@torch.library.custom_op("dsv4::grouped_output", mutates_args=())
def _forward(o: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """o [b, L, h, d], w [g, o_lora, h/g·d], cos/sin [L, r/2] -> (y [b, L, g·o_lora], Δ [b·L, g, h/g·r])."""
    b, L, h, d = o.shape
    g, n_out, i = w.shape
    r = 2 * cos.shape[-1]
    T = b * L
    rope = o.view(T, h, d)[..., d - r:]                                         # [T, h, r] strided
    delta = (_rotate(rope, _positions(cos, b), _positions(sin, b), -1.0) - rope.float()).to(o.dtype)
    delta = delta.view(T, g, (h // g) * r)
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
    rope = do.view(T, h, d)[..., d - r:]
    rope.copy_(_rotate(rope, _positions(cos, b), _positions(sin, b), 1.0))
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
    [g, o_lora, h/g·d] in o's dtype -> [b, L, g·o_lora], as `Attention._output` computes before wo_b."""
    return torch.ops.dsv4.grouped_output(o.contiguous(), w.contiguous(), cos.float().contiguous(),
                                         sin.float().contiguous())[0]
