"""The fused sparse-MQA path (FlexAttention, sparse_attention.py) computes the reference attention: window band,
HCA's visible entries, CSA's picks and the sinks. On the CPU FlexAttention runs its unfused eager form (no
backward there), which checks the masks and the sink algebra; on CUDA the compiled kernel runs, forward and
backward."""
import pytest
import torch

from conftest import random_tiny
from dsv4.model import sparse_attention
from dsv4.model.attention import Attention

CUDA = torch.cuda.is_available()


@pytest.fixture
def flex_anywhere(monkeypatch):
    """Let the fused path run on this machine: on the CPU through FlexAttention's eager implementation."""
    if not CUDA:
        from torch.nn.attention import flex_attention as fa
        monkeypatch.setattr(sparse_attention, "_flex", fa.flex_attention)
        monkeypatch.setattr(sparse_attention, "available", lambda q: True)
    yield "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("seq", [37, 90, 300])
def test_fused_forward_equals_reference(flex_anywhere, monkeypatch, seq):
    """Logits of the whole model (sliding, CSA with binding top-k, HCA layers; random sinks) agree in fp32. 300
    tokens span several query blocks and key blocks, and more compressed entries than a block."""
    model = random_tiny(4).float().to(flex_anywhere)
    assert model.cfg.index_topk < seq // 4 and {0, 4}.issubset(model.cfg.compress_ratios)
    ids = torch.randint(0, model.cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seq)).to(flex_anywhere)
    with torch.no_grad():
        monkeypatch.setattr(Attention, "fused", False)
        ref = model(ids)
        monkeypatch.setattr(Attention, "fused", True)
        out = model(ids)
    assert float((out - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.skipif(not CUDA, reason="FlexAttention has no backward on the CPU")
def test_fused_gradients_equal_reference(monkeypatch):
    monkeypatch.setattr(Attention, "fused_training", True)
    model = random_tiny(5).float().cuda().train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 300), generator=torch.Generator().manual_seed(1)).cuda()
    grads = []
    for fused in (False, True):
        monkeypatch.setattr(Attention, "fused", fused)
        model.zero_grad(set_to_none=True)
        model(ids).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert float((grads[1][n] - g).norm()) <= 1e-4 * float(g.norm()) + 1e-9, n
    assert any("attn_sink" in n for n in grads[0])
