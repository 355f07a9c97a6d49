"""Generation over the compressed KV cache: exactness, batching, sampling, MTP speculation, KV accounting."""
import pytest
import torch

from conftest import random_tiny
from dsv4.config import preset
from dsv4.inference.generate import GenerationError, generate, generate_speculative
from dsv4.inference.kv import kv_report
from dsv4.model import CacheOverflowError


def greedy_by_recompute(m, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("plen", [1, 3, 4, 5, 7, 8, 9, 15, 16, 17])
def test_cached_greedy_equals_recompute_greedy(plen):
    """Over 40+ new tokens windows (8) and HCA (16) boundaries are crossed and top-k (4) binds."""
    m = random_tiny(seed=21)
    prompt = torch.randint(0, 512, (plen,), generator=torch.Generator().manual_seed(plen)).tolist()
    assert generate(m, prompt, max_new_tokens=45) == greedy_by_recompute(m, prompt, 45)


def test_long_greedy_hundreds_of_tokens():
    m = random_tiny(seed=22)
    prompt = list(range(10, 30))
    assert generate(m, prompt, max_new_tokens=200) == greedy_by_recompute(m, prompt, 200)


def test_batch_of_different_lengths_equals_one_by_one():
    m = random_tiny(seed=23)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [40, 41], [100, 101, 102, 103, 104]]
    batched = generate(m, prompts, max_new_tokens=25)
    assert batched == [generate(m, p, max_new_tokens=25) for p in prompts]


def test_stop_ids_end_a_sequence():
    m = random_tiny(seed=23)
    free = generate(m, [1, 2, 3], max_new_tokens=30)
    stop = free[10]
    first = free.index(stop)
    assert generate(m, [1, 2, 3], max_new_tokens=30, stop_ids=[stop]) == free[:first + 1]


def test_sampling_is_seeded_and_top_p_restricts():
    m = random_tiny(seed=24)
    a = generate(m, [1, 2, 3], 20, temperature=1.0, seed=7)
    assert a == generate(m, [1, 2, 3], 20, temperature=1.0, seed=7)
    assert a != generate(m, [1, 2, 3], 20, temperature=1.0, seed=8)
    # top_p tiny -> only the most likely token survives -> greedy
    assert generate(m, [1, 2, 3], 20, temperature=1.0, top_p=1e-6, seed=9) == generate(m, [1, 2, 3], 20)


@pytest.mark.parametrize("plen", [1, 6, 17])
def test_speculative_equals_greedy_with_the_real_mtp(plen):
    m = random_tiny(seed=25)
    prompt = torch.randint(0, 512, (plen,), generator=torch.Generator().manual_seed(plen)).tolist()
    out, stats = generate_speculative(m, prompt, max_new_tokens=50)
    assert out == generate(m, prompt, max_new_tokens=50)
    assert stats.drafted > 0


@pytest.mark.parametrize("every", [1, 2, 3])
def test_speculative_accept_and_reject_paths(every):
    """An MTP that is right except every `every`-th draft (every=1: always right) exercises acceptance,
    rollback and their interleaving; the output must still be plain greedy."""
    m = random_tiny(seed=26)
    prompt = [7, 8, 9, 10, 11]
    greedy = generate(m, prompt, max_new_tokens=40)
    calls = {"n": 0}
    real = m.mtp_forward

    def oracle(h, next_ids, start_pos=0, cache=None, depth=0):
        logits = real(h, next_ids, start_pos, cache, depth)
        target = start_pos + next_ids.shape[1] + 1 - len(prompt)     # index in `greedy` of the drafted token
        calls["n"] += 1
        if 0 <= target < len(greedy):
            tok = greedy[target] if (every == 1 or calls["n"] % every) else (greedy[target] + 1) % 512
            logits[0, -1] = -1e9
            logits[0, -1, tok] = 0.0
        return logits

    m.mtp_forward = oracle
    out, stats = generate_speculative(m, prompt, max_new_tokens=40)
    assert out == greedy
    if every == 1:
        assert stats.acceptance == 1.0
    else:
        assert 0 < stats.accepted < stats.drafted


def test_bad_prompts_are_clear_errors():
    m = random_tiny()
    with pytest.raises(GenerationError, match="empty prompt"):
        generate(m, [], 5)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(m, [1, 99999], 5)
    with pytest.raises(GenerationError, match="exceeds the model limit"):
        generate(m, [1, 2], m.cfg.max_position_embeddings)


def test_cache_overflow_is_a_clear_error():
    m = random_tiny()
    caches = m.new_caches(1, 16)
    with pytest.raises(CacheOverflowError, match="capacity"):
        m(torch.zeros(1, 40, dtype=torch.long), 0, caches)


@pytest.mark.parametrize("context", [64, 1000])
def test_allocated_cache_equals_formula(context):
    m = random_tiny()
    caches = m.new_caches(1, context, dtype=torch.bfloat16, mtp=False)
    measured = sum(c.nbytes() for c in caches)
    assert measured == kv_report(m.cfg, context, bytes_per_value=2)["total_bytes"]


def test_flash_kv_cache_is_a_small_fraction_of_mla():
    from dsv4.inference.kv import mla_v32_bytes
    cfg = preset("flash")
    ours = kv_report(cfg, 1 << 20)["total_bytes"]
    assert ours / mla_v32_bytes(cfg, 1 << 20) < 0.15


def test_chunked_prefill_helper_gives_the_last_logits_of_one_pass():
    """prefill() (what generate and the long-context benchmarks use) = the last row of a full forward, whatever
    the chunk size, including chunks that end mid-window and mid-compression-block."""
    from dsv4.inference.generate import prefill
    m = random_tiny(seed=23)
    ids = torch.randint(0, 512, (2, 61), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = m(ids)[:, -1]
        for chunk in (61, 16, 7):
            got = prefill(m, ids, m.new_caches(2, 64, mtp=False), chunk=chunk)
            torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
