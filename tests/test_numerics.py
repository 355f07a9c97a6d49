"""The official rounding helpers really round, with power-of-two scales, at the official block sizes."""
import torch

from dsv4.numerics import fp4_roundtrip, fp8_roundtrip, hadamard, indexer_roundtrip, kv_roundtrip, round_to_fp4

FP4_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _block_scales(x, block, qmax):
    amax = x.unflatten(-1, (-1, block)).abs().amax(-1, keepdim=True)
    return torch.exp2(torch.ceil(torch.log2(amax / qmax)))


def test_fp8_roundtrip_lands_on_e4m3_grid_with_pow2_scales():
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0)) * 3
    y = fp8_roundtrip(x, 128)
    s = _block_scales(x, 128, 448.0)
    q = y.unflatten(-1, (-1, 128)) / s
    assert torch.equal(q, q.to(torch.float8_e4m3fn).float())        # every value representable in e4m3
    assert not torch.equal(x, y)                                     # and it did round (not just clamp)
    assert ((y - x).abs() / x.abs().clamp_min(1e-3)).median() < 0.07  # 3 mantissa bits


def test_fp4_rounds_to_nearest_with_ties_to_even():
    v = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -2.5, 0.3, 5.1, 7.0])
    assert torch.equal(round_to_fp4(v), torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -2.0, 0.5, 6.0, 6.0]))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    y = fp4_roundtrip(x, 32)
    q = y.unflatten(-1, (-1, 32)) / _block_scales(x, 32, 6.0)
    assert torch.isin(q.abs(), FP4_GRID).all()
    # nearest: no grid point is closer than the chosen one
    scaled = x.unflatten(-1, (-1, 32)) / _block_scales(x, 32, 6.0)
    best = (scaled.abs()[..., None] - FP4_GRID).abs().amin(-1)
    assert torch.allclose((scaled.abs() - q.abs()).abs(), best)


def test_hadamard_is_orthogonal_and_involutive():
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    y = hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(hadamard(y), x, atol=1e-5)
    e0 = torch.zeros(8); e0[0] = 1
    assert torch.allclose(hadamard(e0), torch.full((8,), 8 ** -0.5))


def test_kv_roundtrip_keeps_rope_dims_and_rounds_the_rest():
    kv = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(3))
    y = kv_roundtrip(kv, 64)
    assert torch.equal(y[..., 64:], kv[..., 64:])
    assert torch.equal(y[..., :64], fp8_roundtrip(kv[..., :64], 64))
    assert not torch.equal(y[..., :64], kv[..., :64])


def test_indexer_roundtrip_is_hadamard_then_fp4():
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(indexer_roundtrip(x), fp4_roundtrip(hadamard(x), 32))
