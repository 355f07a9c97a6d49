"""The CSA indexer's training signal (Indexer.kl_loss, Attention._indexer_target, recipe.compute_loss)."""
import pytest
import torch

from conftest import random_tiny, rel_diff
from dsv4.model import Attention, Indexer
from dsv4.model.attention import _kl_sum
from dsv4.train.recipe import compute_loss


def _captured_target_inputs(model, ids, monkeypatch):
    """Run compute_loss once and keep what each CSA layer handed to `_indexer_target` and what it returned."""
    seen = []
    original = Attention._indexer_target

    def spy(self, q, kv, comp, sel, t):
        out = original(self, q, kv, comp, sel, t)
        seen.append((self, q, kv, comp, sel, out))
        return out
    monkeypatch.setattr(Attention, "_indexer_target", spy)
    compute_loss(model, ids[:, :-1], ids[:, 1:])
    return seen


def _naive_target(attn, q, kv, comp, sel):
    """Per query, one softmax over its window keys, its picked entries and the sink, written out directly."""
    b, L, h, d = q.shape
    W, r = attn.window, attn.ratio
    out = torch.zeros(sel.shape, dtype=torch.float64)
    for i in range(b):
        for t in range(L):
            keys = [kv[i, s] for s in range(max(0, t - W + 1), t + 1)]
            picks = [int(j) for j in sel[i, t] if j >= 0]
            assert all(j < (t + 1) // r for j in picks)                    # only visible entries are picked
            z = torch.stack(keys + [comp[i, j] for j in picks]).double() @ q[i, t].double().T * d ** -0.5   # [n, h]
            z = torch.cat([z, attn.attn_sink.detach().double()[None]])
            p = z.softmax(0)[len(keys):-1].sum(-1)                           # picks' mass, summed over heads
            slots = [s for s in range(sel.shape[-1]) if sel[i, t, s] >= 0]
            if slots:
                out[i, t, slots] = p / p.sum()
    return out


@pytest.mark.parametrize("gather", [False, True])
def test_target_is_the_main_attention_on_the_picks(monkeypatch, gather):
    """Both forms of the reference path (picks as a mask over all entries, or gathered) give the main
    attention's per-pick probability, summed over heads and normalised, for every query and pick."""
    if gather:
        monkeypatch.setattr(Attention, "csa_mask_factor", 0)
    monkeypatch.setattr(Attention, "query_chunk", 16)                   # several chunks, windows across them
    model = random_tiny(3).float().train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 41), generator=torch.Generator().manual_seed(3))
    seen = _captured_target_inputs(model, ids, monkeypatch)
    assert len(seen) == sum(1 for r in model.cfg.compress_ratios[:model.cfg.num_hidden_layers] if r == 4) > 0
    for attn, q, kv, comp, sel, got in seen:
        want = _naive_target(attn, q, kv, comp, sel)
        assert (sel >= 0).any()
        assert rel_diff(got.double(), want) < 1e-5


def test_kl_loss_is_the_divergence_from_the_target():
    """kl_loss = mean over queries with picks of Σ p·(log p − log softmax(s)), chunking and recomputation
    included (values and gradients equal the one-chunk form); 0 when the indexer's distribution is the target."""
    g = torch.Generator().manual_seed(0)
    b, L, H, c, N, k = 2, 11, 3, 8, 6, 4
    q = torch.randn(b, L, H, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(b, L, H, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(b, N, c, generator=g, dtype=torch.float64, requires_grad=True)
    sel = torch.randint(0, N, (b, L, k), generator=g)
    sel[:, :2] = -1                                              # queries without picks
    sel[:, 5, 1:] = -1                                           # a query with one pick
    target = torch.rand(b, L, k, generator=g, dtype=torch.float64).masked_fill(sel < 0, 0)
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-30)
    idx = Indexer.__new__(Indexer)

    gathered = keys[torch.arange(b)[:, None, None], sel.clamp(min=0)]               # [b, L, k, c]
    s = (torch.einsum("blhc,blkc->blkh", q, gathered).relu() * w[:, :, None]).sum(-1)  # [b, L, k]
    logq = s.masked_fill(sel < 0, float("-inf")).log_softmax(-1)
    has = (sel >= 0).any(-1)
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - logq), torch.zeros_like(target))
    want = terms.sum(-1)[has].sum() / has.sum()

    gw = torch.autograd.grad(want, (q, w, keys))
    own = logq.exp().nan_to_num(0).masked_fill(~has[..., None], 0).detach()
    for dense in (False, True):
        got = idx.kl_loss(q, w, keys, sel, target, chunk=3, dense=dense)
        assert torch.allclose(got.double(), want, rtol=1e-6)       # scores in fp32, as on the GPU
        gg = torch.autograd.grad(idx.kl_loss(q, w, keys, sel, target, chunk=3, dense=dense), (q, w, keys))
        for a, e in zip(gg, gw):
            assert torch.isfinite(a).all() and rel_diff(a.double(), e) < 1e-5
        assert float(_kl_sum(q, w, keys, sel, own, dense)) == pytest.approx(0, abs=1e-5)
    assert float(idx.kl_loss(q, w, keys, torch.full_like(sel, -1), target * 0)) == 0
    assert idx.kl_loss(q, w, keys, sel[..., :0], target[..., :0]) is None


def test_indexer_loss_trains_the_indexers_and_nothing_else():
    """With the indexer loss the indexers get gradients (and only from it: every other gradient equals the
    one without it); without it they get none. Training only the indexers on it moves them toward the target."""
    model = random_tiny(5).float().train()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(5))

    def grads(weight):
        model.zero_grad(set_to_none=True)
        parts = compute_loss(model, ids[:, :-1], ids[:, 1:], indexer_weight=weight)
        parts.total.backward()
        return parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    off, g_off = grads(0.0)
    on, g_on = grads(1.0)
    assert off.indexer is None and on.indexer is not None and float(on.indexer.detach()) > 0
    assert torch.equal(on.total, off.total + on.indexer)
    idx_names = {n for n, _ in model.named_parameters() if ".indexer." in n}
    assert idx_names and not idx_names & g_off.keys()
    assert idx_names <= g_on.keys() and all(float(g_on[n].abs().sum()) > 0 for n in idx_names)
    assert g_on.keys() - idx_names == g_off.keys()
    for n in g_off:
        assert torch.equal(g_on[n], g_off[n]), n
    assert all(m.loss is None and not m.collect_loss for m in model.modules() if isinstance(m, Indexer))

    params = [p for n, p in model.named_parameters() if n in idx_names]
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(20):
        model.zero_grad(set_to_none=True)
        loss = compute_loss(model, ids[:, :-1], ids[:, 1:]).indexer
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.3 * first, (first, float(loss.detach()))


# ---------------------------------------------------------------------------------------- dissection: pick recall
def test_pick_recall_is_the_dense_attention_share_of_the_picks(monkeypatch):
    """`dsv4 inspect`'s indexer pick recall: per query, the share of a dense pass's compressed-entry attention
    (softmax over window, every visible entry and the sink) that lands on the picks, mean over heads; the
    captured per-layer number is its mean over queries that see an entry. 1 once the picks cover everything."""
    from dsv4 import inspect as I
    monkeypatch.setattr(Attention, "query_chunk", 16)
    model = random_tiny(6).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (1, 57), generator=torch.Generator().manual_seed(6))
    seen = []
    original = Attention._pick_recall

    def spy(self, q, kw, band, t, comp, sel):
        out = original(self, q, kw, band, t, comp, sel)
        seen.append((self, q, kw, band, t, comp, sel, out))
        return out
    monkeypatch.setattr(Attention, "_pick_recall", spy)
    with I.capture(model, what="indexer") as cap:
        rec = cap.run(ids[0].tolist())
    assert seen
    per_layer = {}
    for attn, q, kw, band, t, comp, sel, got in seen:
        d = attn.head_dim
        for c in range(q.shape[1]):
            keys = kw[0, band[c]]
            vis = int(t[c] + 1) // attn.ratio
            z = torch.cat([keys, comp[0, :vis]]).double() @ q[0, c].double().T * d ** -0.5            # [n, h]
            p = torch.cat([z, attn.attn_sink.detach().double()[None]]).softmax(0)[len(keys):-1]    # [vis, h]
            picks = [int(j) for j in sel[0, c] if j >= 0]
            want = (p[picks].sum(0) / p.sum(0)).mean() if vis else float("nan")
            if vis:
                assert abs(float(got[0, c]) - float(want)) < 1e-5
                per_layer.setdefault(id(attn), []).append(float(got[0, c]))
            else:
                assert torch.isnan(got[0, c])
    layers = [i for i, blk in enumerate(model.layers) if id(blk.attn) in per_layer]
    assert layers
    for i in layers:
        vals = per_layer[id(model.layers[i].attn)]
        assert rec["layers"][i]["indexer"]["pick_recall"] == pytest.approx(sum(vals) / len(vals), rel=1e-9)
        assert 0 < rec["layers"][i]["indexer"]["pick_recall"] < 1          # top-4 of up to 14 entries

    monkeypatch.setattr(Attention, "_pick_recall", original)
    for m in model.modules():
        if isinstance(m, Indexer):
            monkeypatch.setattr(m, "topk", 10 ** 6)                       # every visible entry picked
    with I.capture(model, what="indexer") as cap:
        rec = cap.run(ids[0].tolist())
    assert [rec["layers"][i]["indexer"]["pick_recall"] for i in layers] == pytest.approx([1.0] * len(layers), abs=1e-6)
