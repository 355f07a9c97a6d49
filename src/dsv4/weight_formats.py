"""Storage formats of DeepSeek-V4's hub checkpoints, as pure tensor math (no files here).

* FP8: ``float8_e4m3fn`` weight [out, in] with one power-of-two (ue8m0, ``float8_e8m0fnu``) scale per
  128x128 block: scale [ceil(out/128), ceil(in/128)]; edge blocks may be partial.
* FP4 (routed experts): e2m1 codes packed two per byte along `in` — element 2j in the LOW nibble, 2j+1 in the
  high nibble — stored as ``int8`` [out, in/2], with one ue8m0 scale per 32 values of a row: scale [out, in/32].
  (The official convert.py may also re-tag the bytes as ``float4_e2m1fn_x2``; same bytes.)
* Which tensor is stored how follows the official model (`official_storage`).

Scales are powers of two, so quantise -> dequantise -> quantise is exact: a weight that is already
representable comes back bit for bit.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from .numerics import FP4_MAX, FP4_VALUES, FP8_MAX, _pow2_scale, round_to_fp4

FP8_BLOCK = 128          # FP8 weight scale block (both dims)
FP4_BLOCK = 32           # FP4 scale block (along the input dim)
SCALE_DTYPE = torch.float8_e8m0fnu
FP4_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)

# The config.json fields the hub files carry (DeepSeek-V4-Flash / -Pro).
HUB_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "scale_fmt": "ue8m0", "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


class FormatError(ValueError):
    """A tensor does not fit the storage format asked of it (the message says which shape / dtype)."""


# ------------------------------------------------------------------------------------------------ scales
def ue8m0_scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """Smallest power of two s (fp32) with amax / s <= qmax, kept in e8m0's range [2^-127, 2^127]."""
    return _pow2_scale(amax.float().clamp_min(qmax * 2.0 ** -127), qmax).clamp_max(2.0 ** 127)


def _expand(s: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(rows/b0), ceil(cols/b1)] -> one scale per element [rows, cols] (fp32)."""
    return s.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


# ------------------------------------------------------------------------------------------------ FP8
def quant_fp8_blocks(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q float8_e4m3fn [out, in], scale float8_e8m0fnu [ceil(out/b), ceil(in/b)]); w ≈ q · s."""
    if w.dim() != 2:
        raise FormatError(f"FP8 block quantisation needs a 2-D weight, got shape {tuple(w.shape)}")
    o, i = w.shape
    wp = F.pad(w.float(), (0, -i % block, 0, -o % block))                         # [O, I], multiples of b
    blocks = wp.unflatten(0, (-1, block)).unflatten(-1, (-1, block))             # [ob, b, ib, b]
    s = ue8m0_scale(blocks.abs().amax(dim=(1, 3)), FP8_MAX)                      # [ob, ib]
    q = (wp / _expand(s, *wp.shape, (block, block))).clamp(-FP8_MAX, FP8_MAX)
    return q[:o, :i].to(torch.float8_e4m3fn).contiguous(), s.to(SCALE_DTYPE)


def dequant_fp8_blocks(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK),
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [out, in] (FP8) and block scales s [ceil(out/b0), ceil(in/b1)] -> q · s as `dtype` [out, in]."""
    o, i = q.shape
    want = (-(-o // block[0]), -(-i // block[1]))
    if tuple(s.shape) != want:
        raise FormatError(f"FP8 scale shape {tuple(s.shape)} does not fit weight {o}x{i} with {block[0]}x{block[1]} "
                          f"blocks (expected {want})")
    return (q.float() * _expand(s, o, i, block)).to(dtype)


def fp8_scale_block(weight_shape, scale_shape, preferred=(FP8_BLOCK, FP8_BLOCK)) -> tuple[int, int] | None:
    """The (rows, cols) block a scale grid implies for a weight: the preferred one when the ceil-divided grid
    matches, else an exact divisor grid (as in FP8-ised FP4 experts); None when neither fits."""
    (o, i), (so, si) = weight_shape, scale_shape
    if (-(-o // preferred[0]), -(-i // preferred[1])) == (so, si):
        return tuple(preferred)
    if so and si and o % so == 0 and i % si == 0:
        return o // so, i // si
    return None


# ------------------------------------------------------------------------------------------------ FP4
# 2·|value| (0, 1, 2, 3, 4, 6, 8, 12) -> e2m1 magnitude code (0..7); -1: not on the grid
_CODE_OF_TWICE = torch.tensor([0, 1, 2, 3, 4, -1, 5, -1, 6, -1, -1, -1, 7])


def fp4_codes(v: torch.Tensor) -> torch.Tensor:
    """Values already on the e2m1 grid -> 4-bit codes (uint8): bit 3 sign, bits 0-2 the index in FP4_VALUES."""
    twice = v.float().abs() * 2
    idx = twice.clamp(max=12).long()
    mag = _CODE_OF_TWICE.to(v.device)[idx]
    if (mag < 0).any() or not torch.equal(idx.float(), twice):
        raise FormatError("values are not on the FP4 e2m1 grid {0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6}")
    return (mag | (torch.signbit(v).long() << 3)).to(torch.uint8)


def pack_fp4(v: torch.Tensor) -> torch.Tensor:
    """e2m1 values [..., n] (n even) -> int8 [..., n/2]: value 2j in the low nibble, 2j+1 in the high one."""
    if v.shape[-1] % 2:
        raise FormatError(f"FP4 packing needs an even last dimension, got {v.shape[-1]}")
    c = fp4_codes(v)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """int8 / uint8 / float4_e2m1fn_x2 [..., n/2] -> fp32 values [..., n] (low nibble first)."""
    u = packed.view(torch.uint8).long()
    table = torch.cat([FP4_VALUES, -FP4_VALUES]).to(packed.device)              # code -> value
    return torch.stack([table[u & 0xF], table[u >> 4]], dim=-1).flatten(-2)


def quant_fp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (packed int8 [out, in/2], scale float8_e8m0fnu [out, in/block]); values round to the
    nearest e2m1 value (ties to even)."""
    if w.dim() != 2 or w.shape[1] % block:
        raise FormatError(f"FP4 quantisation needs a 2-D weight whose input dim is a multiple of {block}, "
                          f"got shape {tuple(w.shape)}")
    wb = w.float().unflatten(-1, (-1, block))                                    # [out, in/b, b]
    s = ue8m0_scale(wb.abs().amax(-1), FP4_MAX)                                  # [out, in/b]
    q = round_to_fp4((wb / s[..., None]).clamp(-FP4_MAX, FP4_MAX)).flatten(-2)
    return pack_fp4(q), s.to(SCALE_DTYPE)


def dequant_fp4(packed: torch.Tensor, s: torch.Tensor, block: int = FP4_BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed [out, in/2] and scales [out, in/block] -> values [out, in] as `dtype`."""
    v = unpack_fp4(packed)                                                       # [out, in]
    if tuple(s.shape) != (v.shape[0], v.shape[1] // block) or v.shape[1] % block:
        raise FormatError(f"FP4 scale shape {tuple(s.shape)} does not fit a weight of logical shape "
                          f"{tuple(v.shape)} with {block}-value blocks")
    return (v * s.float().repeat_interleave(block, -1)).to(dtype)


# ------------------------------------------------------------------------------------------------ policy
_EXPERT = re.compile(r"(^|\.)ffn\.experts\.\d+\.w[123]\.weight$")
# every Linear the official model.py builds with its default (FP8) dtype; wo_a too: model.py runs it in bf16,
# but the hub files store it FP8 with 128x128 scales (convert.py dequantises it)
_FP8 = re.compile(r"(^|\.)(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|attn\.indexer\.wq_b|ffn\.shared_experts\.w[123]"
                  r"|e_proj|h_proj)\.weight$")
# kept in fp32 by the official model (and by transformers' loader)
_FP32 = re.compile(r"(^|\.)(hc_\w+|attn_sink|ape|gate\.bias|\w*norm\.weight)$")


def official_storage(name: str, expert_dtype: str | None = "fp4") -> str:
    """How the hub files store tensor `name`: 'fp4', 'fp8', 'fp32' or 'bf16' (floating tensors; integer
    ones such as tid2eid are stored as they are). Routed experts are 'fp4' unless expert_dtype is not 'fp4'
    (then FP8, as in the official fp8-expert variant)."""
    if _EXPERT.search(name):
        return "fp4" if expert_dtype == "fp4" else "fp8"
    if _FP8.search(name):
        return "fp8"
    if _FP32.search(name):
        return "fp32"
    return "bf16"


def round_to_storage(w: torch.Tensor, storage: str) -> torch.Tensor:
    """What `w` becomes after a trip through `storage` (same dtype and shape as w)."""
    if storage == "fp8":
        return dequant_fp8_blocks(*quant_fp8_blocks(w), dtype=w.dtype)
    if storage == "fp4":
        return dequant_fp4(*quant_fp4(w), dtype=w.dtype)
    if storage == "bf16":
        return w.to(torch.bfloat16).to(w.dtype)
    return w.clone()


__all__ = ["FP8_BLOCK", "FP4_BLOCK", "HUB_QUANTIZATION_CONFIG", "FormatError", "quant_fp8_blocks",
           "dequant_fp8_blocks", "fp8_scale_block", "pack_fp4", "unpack_fp4", "quant_fp4", "dequant_fp4",
           "official_storage", "round_to_storage", "ue8m0_scale"]
