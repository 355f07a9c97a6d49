"""Small building blocks: RMSNorm, a Linear that knows the official FP8 activation rounding, RoPE with YaRN."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import fp8_roundtrip


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as the official code does), weight kept in the model dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x).to(dtype)


def unweighted_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation without a weight (per-head q norm, the mHC input norm)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear without bias. ``fp8_input`` marks projections whose official weights are FP8/FP4: under
    official numerics their input is rounded through FP8 (128-value blocks) first, as the real
    FP8×FP8 / FP4×FP8 GEMMs do."""

    def __init__(self, in_features: int, out_features: int, fp8_input: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8_input = fp8_input
        self.official = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.official and self.fp8_input:
            x = fp8_roundtrip(x, 128)
        return F.linear(x, self.weight.to(x.dtype))


# ----------------------------------------------------------------------------------------------- RoPE
def rope_inv_freq(dim: int, base: float, yarn: dict | None) -> torch.Tensor:
    """Inverse frequencies [dim/2]; with YaRN, low frequencies are divided by `factor` and a linear ramp
    between the beta_fast / beta_slow correction dims blends the two (no attention-scale change)."""
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn and yarn.get("original_seq_len", 0) > 0:
        orig, factor = yarn["original_seq_len"], yarn["factor"]

        def corr_dim(n_rot: float) -> float:
            return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(yarn["beta_fast"])), 0)
        high = min(math.ceil(corr_dim(yarn["beta_slow"])), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp                     # 1 -> keep the original frequency, 0 -> interpolate
        inv = inv / factor * (1 - smooth) + inv * smooth
    return inv


class Rotary(nn.Module):
    """Interleaved RoPE on the trailing `dim` channels: pairs (2i, 2i+1) rotate as complex numbers."""

    def __init__(self, dim: int, base: float, yarn: dict | None = None):
        super().__init__()
        self.dim, self.base, self.yarn = dim, base, yarn
        self.register_buffer("inv_freq", rope_inv_freq(dim, base, yarn), persistent=False)

    def _apply(self, fn, recurse=True):
        """model.to(torch.bfloat16) casts floating buffers too; rounded to bf16 the frequencies would put a
        token at position 1M off by thousands of radians. They are recomputed in fp32 instead."""
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = rope_inv_freq(self.dim, self.base, self.yarn).to(self.inv_freq.device)
        return self

    def reset(self, device=None) -> None:
        """Recompute the (non-persistent) frequencies, e.g. after building the model on the meta device."""
        self.inv_freq = rope_inv_freq(self.dim, self.base, self.yarn).to(device or self.inv_freq.device)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [L] (int) -> cos, sin [L, dim/2] in fp32."""
        ang = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None]
        return ang.cos(), ang.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x [b, L, (h,) r] with cos/sin [L, r/2]; rotates the last r channels of x, returns a new tensor."""
        r = cos.shape[-1] * 2
        return torch.cat([x[..., :-r], Rotary.rotate(x[..., -r:], cos, sin, inverse).to(x.dtype)], dim=-1)

    @staticmethod
    def rotate(rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """rope [b, L, (h,) r] (any strides; all of it rotates) -> its rotation in fp32, cos/sin [L, r/2]."""
        if rope.dim() == 4:                   # [b, L, h, r]: broadcast over heads
            cos, sin = cos[:, None], sin[:, None]
        rope = rope.float()
        a, b = rope[..., 0::2], rope[..., 1::2]
        if inverse:
            sin = -sin
        return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
