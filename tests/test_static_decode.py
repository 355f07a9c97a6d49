"""The static-shape decode step (what a CUDA graph captures) equals the reference decode: same logits step by
step and the same tokens, for every layer type (sliding, CSA with a binding top-k, HCA) across window and
compression boundaries, for both CSA attention forms; repeating a step (a graph warm-up) changes nothing."""
import pytest
import torch

from conftest import random_tiny
from dsv4.inference.generate import StaticDecoder, generate, prefill, static_decoder
from dsv4.model.attention import Attention


def _lockstep(m, prompts, steps, capacity, repeat_each=False):
    """Feed the reference path and the static decoder the same greedy tokens; return the largest relative
    logit difference over all steps (and check the argmaxes agree)."""
    ids = torch.tensor(prompts)
    B, P = ids.shape
    ref_caches = m.new_caches(B, capacity, mtp=False)
    dec = StaticDecoder(m, B, capacity, graph=False)
    with torch.no_grad():
        ref = prefill(m, ids, ref_caches)
        st = dec.prefill(ids)
        worst = float((st - ref).norm() / ref.norm())
        for pos in range(P, P + steps):
            tok = ref.argmax(-1, keepdim=True)
            assert torch.equal(tok, st.argmax(-1, keepdim=True)), pos
            ref = m(tok, pos, ref_caches)[:, -1]
            if repeat_each:                     # what the graph warm-up does: the same step more than once
                dec.step(tok, pos)
            st = dec.step(tok, pos).clone()
            worst = max(worst, float((st - ref).norm() / ref.norm()))
    return worst


def test_tiny_has_every_layer_type():
    cfg = random_tiny().cfg
    assert {0, 4}.issubset(cfg.compress_ratios[:cfg.num_hidden_layers])
    assert any(r > 4 for r in cfg.compress_ratios[:cfg.num_hidden_layers])       # HCA
    assert cfg.index_n_heads >= 16                                               # no ReLU-zero score ties


@pytest.mark.parametrize("plen", [1, 3, 4, 5, 8, 9, 15, 16, 17, 33])
@pytest.mark.parametrize("mask_factor", [0, 10 ** 9])                           # CSA: gathered picks / mask
def test_static_step_equals_reference(monkeypatch, plen, mask_factor):
    """70 steps cross the window (8), CSA (4) and HCA (16) boundaries; top-k (4) binds once > 4 entries exist."""
    monkeypatch.setattr(Attention, "csa_mask_factor", mask_factor)
    m = random_tiny(seed=31)
    prompt = torch.randint(0, 512, (plen,), generator=torch.Generator().manual_seed(plen)).tolist()
    assert plen + 70 > 4 * (m.cfg.index_topk + 2)
    assert _lockstep(m, [prompt], 70, capacity=128) < 1e-5


def test_static_step_batched_and_capacity_not_a_multiple():
    m = random_tiny(seed=32)
    g = torch.Generator().manual_seed(5)
    prompts = torch.randint(0, 512, (3, 11), generator=g).tolist()
    assert _lockstep(m, prompts, 50, capacity=61) < 1e-5                      # 61: last CSA/HCA slot never completes


def test_repeating_a_step_is_harmless():
    m = random_tiny(seed=33)
    prompt = torch.randint(0, 512, (6,), generator=torch.Generator().manual_seed(6)).tolist()
    assert _lockstep(m, [prompt], 40, capacity=64, repeat_each=True) < 1e-5


def test_generate_static_equals_reference_and_reuses_the_decoder():
    m = random_tiny(seed=34)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], [100, 101, 102, 103, 104]]
    ref = generate(m, prompts, max_new_tokens=30, cuda_graph=False)
    assert generate(m, prompts, max_new_tokens=30, cuda_graph=True) == ref
    dec = m.__dict__["_static_decoder"]
    assert generate(m, prompts, max_new_tokens=28, cuda_graph=True) == [r[:28] for r in ref]
    assert m.__dict__["_static_decoder"] is dec                                 # same batch/capacity: reused
    single = generate(m, prompts[0], max_new_tokens=30, cuda_graph=True)
    assert single == generate(m, prompts[0], max_new_tokens=30, cuda_graph=False)


def test_stop_ids_on_the_queued_static_path():
    """The static path queues step t+1 before reading token t back, so a stop computes one step too many: the
    tokens must still end at the stop, and the reused decoder must give the full reference sequence after it."""
    m = random_tiny(seed=37)
    prompt = [9, 8, 7, 6]
    ref = generate(m, prompt, max_new_tokens=30, cuda_graph=False)
    stop = ref[12]
    got = generate(m, prompt, max_new_tokens=30, stop_ids=[stop], cuda_graph=True)
    assert got == ref[:ref.index(stop) + 1] and len(got) < 30
    assert generate(m, prompt, max_new_tokens=30, cuda_graph=True) == ref


def test_decoder_is_rebuilt_when_weights_change():
    m = random_tiny(seed=35)
    prompt = [3, 4, 5, 6, 7]
    generate(m, prompt, max_new_tokens=10, cuda_graph=True)
    dec = m.__dict__["_static_decoder"]
    with torch.no_grad():
        m.layers[0].attn.wq_a.weight.mul_(1.5)
    assert static_decoder(m, 1, 15, True) is not dec
    assert generate(m, prompt, max_new_tokens=20, cuda_graph=True) == generate(m, prompt, max_new_tokens=20,
                                                                               cuda_graph=False)


def test_cpu_default_is_the_reference_path():
    m = random_tiny(seed=36)
    assert static_decoder(m, 1, 20, None) is None
