"""The model core against transformers' DeepseekV4 and against its own invariants (fp32, tiny configs)."""
import pytest
import torch

from conftest import random_tiny
from dsv4.config import preset
from dsv4.model import sinkhorn
from dsv4.model.mhc import hc_maps

transformers = pytest.importorskip("transformers")


def rel_err_per_position(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(-1) / b.abs().amax(-1)


def test_tiny_preset_exercises_every_part():
    cfg = preset("tiny")
    kinds = {cfg.layer_kind(i) for i in range(cfg.num_hidden_layers)}
    assert kinds == {"sliding", "csa", "hca"}
    assert 0 < cfg.num_hash_layers < cfg.num_hidden_layers          # hash and learned routing
    assert cfg.index_n_heads >= 16                                  # avoids ReLU-zero ties in top-k
    assert cfg.swiglu_limit > 0 and cfg.rope_scaling["type"] == "yarn"


@pytest.mark.parametrize("seq", [37, 120])
def test_plain_forward_matches_transformers(tmp_path, seq):
    from hf_reference import hf_model_from
    m = random_tiny(seed=3)
    hf = hf_model_from(m, tmp_path)
    ids = torch.randint(0, m.cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(seq))
    with torch.no_grad():
        ours, theirs = m(ids), hf(ids).logits
    # seq 120 with ratio 4 gives 30 compressed entries per CSA layer: index_topk = 4 binds
    assert (seq // 4) > m.cfg.index_topk or seq < 40
    assert rel_err_per_position(ours, theirs).max() < 1e-4


def test_swiglu_clamp_is_active_and_matches(tmp_path):
    """With a tiny swiglu_limit the clamp changes the output, and we still match transformers."""
    from hf_reference import hf_model_from
    ids = torch.randint(0, 512, (1, 50), generator=torch.Generator().manual_seed(0))
    loose, tight = random_tiny(seed=5, swiglu_limit=0.0), random_tiny(seed=5, swiglu_limit=0.05)
    with torch.no_grad():
        assert (loose(ids) - tight(ids)).abs().max() > 1e-3
        assert rel_err_per_position(tight(ids), hf_model_from(tight, tmp_path)(ids).logits).max() < 1e-4


def test_causal_prefix_logits_unchanged():
    m = random_tiny()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, prefix = m(ids), m(ids[:, :41])
    assert (full[:, :41] - prefix).abs().max() < 1e-5
    # and the future really matters (no accidental identity)
    ids2 = ids.clone()
    ids2[:, 60] = (ids2[:, 60] + 1) % m.cfg.vocab_size
    with torch.no_grad():
        changed = m(ids2)
    assert (changed[:, :60] - full[:, :60]).abs().max() < 1e-5
    assert (changed[:, 60:] - full[:, 60:]).abs().max() > 1e-4


def test_sinkhorn_is_doubly_stochastic():
    logits = torch.randn(64, 4, 4, generator=torch.Generator().manual_seed(0))
    m = sinkhorn(logits, iters=20, eps=1e-6)
    assert (m >= 0).all()
    assert (m.sum(-1) - 1).abs().max() < 1e-3          # 20 iterations: rows close to 1 ...
    assert (m.sum(-2) - 1).abs().max() < 1e-5          # ... columns exact (the last normalisation)
    # sharper logits converge more slowly; more iterations still get there
    sharp = logits * 3
    assert (sinkhorn(sharp, iters=20, eps=1e-6).sum(-1) - 1).abs().max() > 1e-3
    assert (sinkhorn(sharp, iters=2000, eps=1e-6).sum(-1) - 1).abs().max() < 2e-4


def test_hc_maps_official_split():
    """pre = sigmoid(.)+eps in (eps, 1+eps), post = 2·sigmoid in (0, 2), comb doubly stochastic."""
    n, D = 4, 8
    h = torch.randn(2, 5, n, D)
    fn, base, scale = torch.randn((2 + n) * n, n * D), torch.randn((2 + n) * n), torch.rand(3) + 0.5
    pre, post, comb = hc_maps(h, fn, base, scale, iters=20, hc_eps=1e-6, norm_eps=1e-6)
    x = h.flatten(2)
    mixes = (x @ fn.t()) * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(pre, torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + 1e-6, atol=1e-6)
    assert torch.allclose(post, 2 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n]), atol=1e-6)
    assert (comb.sum(-2) - 1).abs().max() < 1e-5


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 5, 8, 9, 16, 17, 33])
def test_cached_decode_equals_recompute(prompt_len):
    m = random_tiny(seed=7)
    T = 72
    ids = torch.randint(0, m.cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(prompt_len))
    with torch.no_grad():
        full = m(ids)
        caches = m.new_caches(2, T)
        outs = [m(ids[:, :prompt_len], 0, caches)]
        for t in range(prompt_len, T):
            outs.append(m(ids[:, t:t + 1], t, caches))
    got = torch.cat(outs, 1)
    assert rel_err_per_position(got, full).max() < 1e-5
    assert torch.equal(got.argmax(-1), full.argmax(-1))


def test_chunked_prefill_equals_one_shot():
    m = random_tiny(seed=2)
    ids = torch.randint(0, m.cfg.vocab_size, (1, 77), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        one = m.new_caches(1, 80)
        full = m(ids, 0, one)
        chunked = m.new_caches(1, 80)
        parts = [m(ids[:, c:c + 10], c, chunked) for c in range(0, 77, 10)]
    assert rel_err_per_position(torch.cat(parts, 1), full).max() < 1e-5
    for a, b in zip(one, chunked):       # same cache contents
        assert a.n_comp == b.n_comp and a.n_window == b.n_window
        if a.comp is not None:
            assert torch.allclose(a.comp[:, :a.n_comp], b.comp[:, :b.n_comp], atol=1e-5)


def test_query_chunking_is_invisible():
    """Processing queries in chunks (to bound memory) must not change the result."""
    m = random_tiny(seed=4)
    ids = torch.randint(0, m.cfg.vocab_size, (1, 90), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids)
        for blk in list(m.layers) + list(m.mtp):
            blk.attn.query_chunk = 7
        got = m(ids)
    assert (got - ref).abs().max() < 1e-5


def test_official_numerics_really_round():
    m = random_tiny(seed=6, preset_name="tiny-official")
    ids = torch.randint(0, m.cfg.vocab_size, (1, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = m(ids)
        m.set_numerics("official")
        official = m(ids)
        m.set_numerics("plain")
        again = m(ids)
    assert torch.equal(plain, again)
    rel = (official - plain).abs().max() / plain.abs().max()
    assert rel > 1e-3 and torch.isfinite(official).all()


def test_official_numerics_reject_unfit_sizes():
    from dsv4.config import ConfigError
    with pytest.raises(ConfigError, match="hidden_size"):
        random_tiny().set_numerics("official")


def test_bad_token_ids_are_clear_errors():
    m = random_tiny()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="empty"):
        m(torch.zeros(1, 0, dtype=torch.long))


def test_mtp_logits_depend_on_next_token():
    m = random_tiny()
    ids = torch.randint(0, m.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, h = m(ids, return_hidden=True)
        a = m.mtp_forward(h[:, :-1], ids[:, 1:])
        b = m.mtp_forward(h[:, :-1], (ids[:, 1:] + 1) % m.cfg.vocab_size)
    assert a.shape == (1, 19, m.cfg.vocab_size)
    assert (a - b).abs().max() > 1e-4


def test_rope_frequencies_stay_fp32_in_a_bf16_model():
    """model.to(bf16) must not round the RoPE frequencies: at position 2^20 a bf16 frequency is off by up to
    ~2^-9 relative, i.e. thousands of radians."""
    from dsv4.model.layers import Rotary, rope_inv_freq
    model = random_tiny().to(torch.bfloat16)
    ropes = [m for m in model.modules() if isinstance(m, Rotary)]
    assert ropes
    for r in ropes:
        assert r.inv_freq.dtype == torch.float32
        assert torch.equal(r.inv_freq, rope_inv_freq(r.dim, r.base, r.yarn))
    cos, _ = ropes[0].angles(torch.tensor([1 << 20]))
    ang = torch.tensor([float(1 << 20)], dtype=torch.float64)[:, None] * rope_inv_freq(ropes[0].dim, ropes[0].base,
                                                                                      ropes[0].yarn).double()
    assert torch.allclose(cos.double(), ang.cos(), atol=0.05)
