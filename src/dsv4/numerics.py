"""Low-precision rounding that DeepSeek's inference code applies to the quantisation-aware-trained checkpoints.

"official" numerics = these round trips at the exact places the official code performs them (see
docs/numerics.md). Every function here really rounds (casts to the low-precision dtype and back), with
power-of-two (ue8m0) scales, as the official kernels do with ``scale_fmt="ue8m0"``.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0          # float8_e4m3fn largest finite value
FP4_MAX = 6.0            # e2m1 largest value
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _pow2_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The ue8m0 scale of the official kernels: 2^ceil(log2(amax · (1/qmax))), bit-exact with them.

    Computed as they do: fp32 product with the fp32 reciprocal, then an exact ceil-log2 from the exponent
    (frexp), not a floating-point log2, which rounds to an integer when amax is a few ulps above qmax·2^k
    and so picks half the kernels' scale there."""
    v = amax.float() * torch.tensor(1.0 / qmax, dtype=torch.float32)
    mant, exp = torch.frexp(v)                                       # v = mant · 2^exp, mant in [0.5, 1)
    return torch.ldexp(torch.ones_like(v), exp - (mant == 0.5).to(exp.dtype))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of the quantisation block {block}")
    return x.unflatten(-1, (-1, block))


def fp8_roundtrip(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantise to FP8 e4m3 with one power-of-two scale per `block` values of the last dim, and back.

    amax is floored at 1e-4 as in the official act_quant kernel; values are clamped to ±448 then cast
    (round to nearest even), which is what the hardware cast does.
    """
    xb = _blocks(x.float(), block)                                     # [..., nblk, block]
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(1e-4)
    s = _pow2_scale(amax, FP8_MAX)
    q = (xb / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * s).flatten(-2).to(x.dtype)


def round_to_fp4(v: torch.Tensor) -> torch.Tensor:
    """Round (already scaled, |v| <= 6) values to the nearest e2m1 value, ties to the even code."""
    grid = FP4_VALUES.to(v.device)
    a = v.abs().clamp(max=FP4_MAX)
    # index of nearest grid point; ties resolved toward the even code index (round-half-to-even of the cast)
    mid = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(a, mid, right=True)                 # a == mid[k] lands on the upper point k+1
    tie = (idx > 0) & (a == mid[(idx - 1).clamp(min=0)])
    idx = torch.where(tie & (idx % 2 == 1), idx - 1, idx)
    return torch.sign(v) * grid[idx]


def fp4_roundtrip(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """Quantise to FP4 e2m1 with a power-of-two scale per `block` values, and back (the indexer's QAT)."""
    xb = _blocks(x.float(), block)
    amax = xb.abs().amax(-1, keepdim=True).clamp_min(FP4_MAX * 2.0 ** -126)
    s = _pow2_scale(amax, FP4_MAX)
    q = round_to_fp4((xb / s).clamp(-FP4_MAX, FP4_MAX))
    return (q * s).flatten(-2).to(x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Normalised Walsh–Hadamard transform over the last dim (a power of two): spreads outliers before FP4.

    Orthogonal, so q·k is unchanged when both sides are rotated; it only matters once values are rounded.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two size, got {n}")
    y = x.float()
    h = 1
    while h < n:
        y = y.unflatten(-1, (-1, 2, h))                     # pairs (a, b) at distance h
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        h *= 2
    return (y * (n ** -0.5)).to(x.dtype)


def kv_roundtrip(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """Official KV storage: the non-rope dims through FP8 (blocks of 64), the rope dims kept as they are."""
    nope, rope = kv[..., :-rope_dim], kv[..., -rope_dim:]
    return torch.cat([fp8_roundtrip(nope, 64), rope], dim=-1)


def indexer_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """Official indexer q / key storage: Hadamard rotation then FP4 (blocks of 32)."""
    return fp4_roundtrip(hadamard(x), 32)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["fp8_roundtrip", "fp4_roundtrip", "round_to_fp4", "hadamard", "kv_roundtrip", "indexer_roundtrip",
           "ceil_div", "FP8_MAX", "FP4_MAX"]
