"""Fast paths equal the reference paths: grouped-GEMM experts vs the per-expert loop, and CSA's masked
dense attention vs its gather path (forward and gradients)."""
import pytest
import torch

from conftest import random_tiny
from dsv4.model.attention import Attention
from dsv4.model.moe import MoE


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(ids).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, ids, set_a, set_b):
    set_a()
    la, ga = _loss_and_grads(model, ids)
    set_b()
    lb, gb = _loss_and_grads(model, ids)
    assert torch.allclose(la, lb, rtol=1e-6, atol=0)
    for n, g in gb.items():
        ref = ga.get(n, torch.zeros_like(g))        # the loop leaves unused experts without a gradient
        assert float((g - ref).norm()) <= 1e-4 * float(ref.norm()) + 1e-9, n
    return la, lb


def test_grouped_experts_equal_loop(monkeypatch):
    model = random_tiny(3).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(MoE, "impl", "loop")
    ref = model(ids)
    monkeypatch.setattr(MoE, "impl", "grouped")
    assert torch.allclose(model(ids), ref, rtol=1e-5, atol=1e-6)
    _compare(model, ids, lambda: monkeypatch.setattr(MoE, "impl", "loop"),
             lambda: monkeypatch.setattr(MoE, "impl", "grouped"))


@pytest.mark.parametrize("seq", [37, 90])
def test_csa_mask_equals_gather(monkeypatch, seq):
    model = random_tiny(4).train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(2))
    assert 4 in model.cfg.compress_ratios and seq // 4 > model.cfg.index_topk   # top-k binds: paths differ
    _compare(model, ids, lambda: monkeypatch.setattr(Attention, "csa_mask_factor", 0),        # always gather
             lambda: monkeypatch.setattr(Attention, "csa_mask_factor", 10 ** 9))              # always mask


def test_compiled_mhc_equals_eager():
    """The fused (torch.compile) mHC maths that CUDA runs computes the eager functions: forward and gradients."""
    from dsv4.model.mhc import hc_expand, hc_pre
    g = torch.Generator().manual_seed(3)
    b, s, n, D = 2, 5, 4, 16
    h = torch.randn(b, s, n, D, generator=g, requires_grad=True)
    fn = (torch.randn((2 + n) * n, n * D, generator=g) * 0.1).requires_grad_()
    base, scale = torch.randn((2 + n) * n, generator=g).requires_grad_(), torch.rand(3, generator=g).requires_grad_()
    y = torch.randn(b, s, D, generator=g, requires_grad=True)
    args = (h, fn, base, scale, 20, 1e-6, 1e-6, "mhc")

    def run(pre, expand):
        x, post, comb = pre(*args)
        out = expand(y + x, h, post, comb)
        grads = torch.autograd.grad(out.square().sum(), (h, fn, base, scale, y))
        return out, grads
    ref, ref_g = run(hc_pre, hc_expand)
    out, out_g = run(torch.compile(hc_pre), torch.compile(hc_expand))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(out_g, ref_g):
        assert float((a - r).norm()) <= 1e-4 * float(r.norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the mHC functions are compiled on CUDA only")
def test_fused_mhc_alternating_lengths_and_grad_modes_equals_eager():
    """What a `dsv4 train` step asks of the CUDA-compiled mHC functions (`fused`: static graphs under autograd,
    dynamic ones without): lengths L and L−1 (blocks, then MTP on a slice of the streams), a no-grad pass in
    between (evaluation), and again — values and gradients equal the eager functions' each time."""
    from dsv4.model.mhc import hc_expand, hc_expand_fast, hc_head, hc_head_fast, hc_pre, hc_pre_fast
    g = torch.Generator().manual_seed(4)
    b, L, n, D = 2, 64, 4, 32
    fn = (torch.randn((2 + n) * n, n * D, generator=g) * 0.1).cuda().requires_grad_()
    base, scale = torch.randn((2 + n) * n, generator=g).cuda().requires_grad_(), torch.rand(3, generator=g).cuda()
    head_fn, head_base = (torch.randn(n, n * D, generator=g) * 0.1).cuda(), torch.randn(n, generator=g).cuda()
    streams = torch.randn(b, L, n, D, generator=g).cuda()

    def run(pre, expand, head, h):
        x, post, comb = pre(h, fn, base, scale, 20, 1e-6, 1e-6, "mhc")
        out = head(expand(x.tanh(), h, post, comb), head_fn, head_base, scale[:1], 1e-6, 1e-6)
        return out, (torch.autograd.grad(out.square().sum(), (fn, base)) if torch.is_grad_enabled() else ())

    for _ in range(2):
        for h, grad in ((streams, True), (streams[:, :-1], True), (streams[:, 5:], False)):
            with torch.set_grad_enabled(grad):
                ref, ref_g = run(hc_pre, hc_expand, hc_head, h)
                out, out_g = run(hc_pre_fast, hc_expand_fast, hc_head_fast, h)
            assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), h.shape
            for a, r in zip(out_g, ref_g):
                assert float((a - r).norm()) <= 1e-4 * float(r.norm()), h.shape


@pytest.mark.parametrize("t0", [0, 5, 37, 300])
def test_indexer_scores_only_visible_entries(t0):
    """Scoring only the entries a sub-chunk's last query can see (t0 given) selects what scoring all of them
    and masking the rest selects — including chunks that see none and chunks that see fewer than top-k."""
    from dsv4.config import preset
    from dsv4.model.attention import Indexer
    cfg = preset("tiny").replace(index_n_heads=16, index_topk=8)
    ind = Indexer(cfg, ratio=4)
    g = torch.Generator().manual_seed(t0)
    b, C, H, c, n = 2, 96, cfg.index_n_heads, cfg.index_head_dim, (t0 + 96) // 4 + 3   # a few future entries too
    q, keys = torch.randn(b, C, H, c, generator=g), torch.randn(b, n, c, generator=g)
    w = torch.randn(b, C, H, generator=g)
    t = torch.arange(t0, t0 + C)
    ref = ind.select(q, w, keys, t)
    # sub-chunks of 7 queries: each sees a different prefix; no score ties with 16 heads and random inputs
    fast = torch.cat([ind.select(q[:, i:i + 7], w[:, i:i + 7], keys, t[i:i + 7], t0 + i) for i in range(0, C, 7)], 1)
    assert fast.shape == ref.shape == (b, C, 8)
    assert torch.equal(fast.sort(-1).values, ref.sort(-1).values)
    assert (ref[:, 0] == -1).all() == (t0 + 1 < 4)                     # the first query sees no entry when t0 < 3
