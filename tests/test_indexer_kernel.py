"""The fused Triton indexer computes the reference path's scores and picks. Runs where Triton runs: on a CUDA
machine, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1); skipped elsewhere (CI's CPU build of
torch has no Triton)."""
import pytest
import torch

from dsv4.config import preset
from dsv4.model import indexer_kernel
from dsv4.model.attention import Indexer

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not indexer_kernel.available(torch.empty(0, device=DEV)),
                                reason="needs Triton (CUDA, or TRITON_INTERPRET=1 on the CPU)")


def _inputs(dtype, b=2, C=70, H=4, c=32, N=40, t0=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, C, H, c, generator=g).to(DEV, dtype)
    w = torch.randn(b, C, H, generator=g).to(DEV)
    keys = torch.randn(b, N, c, generator=g).to(DEV, dtype)
    t = torch.arange(t0, t0 + C, device=DEV)
    return q, w, keys, t


def _reference(q, w, keys, t, ratio):
    s = torch.einsum("bchd,bnd->bchn", q, keys).float().relu_()
    s = torch.einsum("bchn,bch->bcn", s, w)
    return s.masked_fill_(torch.arange(keys.shape[1], device=q.device)[None] >= ((t + 1) // ratio)[:, None], float("-inf"))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_scores_equal_reference(dtype, tol):
    """Same finite scores (fp32: to rounding; bf16: each head's dot rounded to bf16 as the reference does) and
    −inf exactly where the reference masks, incl. programs whose rows see none of their entries."""
    if dtype == torch.bfloat16 and DEV == "cpu":
        pytest.skip("Triton's interpreter multiplies bf16 tiles wrongly (seen with triton 3.9); bf16 runs on CUDA")
    q, w, keys, t = _inputs(dtype)
    ref = _reference(q, w, keys, t, 4)
    out = indexer_kernel.visible_scores(q, w, keys, t, 4)
    assert torch.equal(torch.isinf(out), torch.isinf(ref)) and bool(torch.isinf(ref).any())
    fin = torch.isfinite(ref)
    err = (out[fin] - ref[fin]).abs().max() / ref[fin].abs().max()
    assert float(err) < tol


def test_select_picks_equal_reference(monkeypatch):
    """Indexer.select with the kernel returns the reference path's entry ids (fp32, visible/none handling)."""
    cfg = preset("tiny")
    ix = Indexer(cfg, 4).to(DEV)
    q, w, keys, t = _inputs(torch.float32, C=90, H=cfg.index_n_heads, c=cfg.index_head_dim, N=50, t0=0)
    monkeypatch.setattr(Indexer, "fused", False)
    ref = ix.select(q, w, keys, t, 0)
    monkeypatch.setattr(Indexer, "fused", True)
    assert torch.equal(ix.select(q, w, keys, t, 0), ref)
    assert bool((ref == -1).any()) and bool((ref >= 0).any())
