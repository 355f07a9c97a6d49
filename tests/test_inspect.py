"""dsv4.inspect: metrics on synthetic inputs with known answers, capture hooks against direct computation on a
random tiny model, the report (JSON schema, HTML images) and `dsv4 inspect`."""
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import dsv4.inspect as I
from dsv4.inspect import metrics as M
from dsv4.inspect.analyze import build_report
from dsv4.inspect.capture import CaptureError
from dsv4.inspect.prompts import Prompt, PromptFileError, encode_prompt, load_prompts, parse_modes
from dsv4.inspect.published import compare
from dsv4.model.mhc import hc_maps

from conftest import random_tiny


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ============================================================================================ CKA / HSIC
def test_cka_identical_and_invariances():
    x = _rand(50, 8)
    q, _ = torch.linalg.qr(_rand(8, 8, seed=1))
    assert M.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert M.linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0, abs=1e-10)        # orthogonal map and scale
    assert M.linear_cka(x, x + 5.0) == pytest.approx(1.0, abs=1e-10)            # translation (centring)
    assert M.linear_cka(x, x, debiased=True) == pytest.approx(1.0, abs=1e-12)
    assert M.linear_cka(x, x[:, :3]) < 0.9                                       # a projection is not the same


def test_cka_independent_biased_vs_debiased():
    """Independent wide representations: biased CKA is pulled up by dim ≫ n, the debiased estimate is near 0."""
    x, y = _rand(40, 2000, seed=2), _rand(40, 2000, seed=3)
    biased, deb = M.linear_cka(x, y), M.linear_cka(x, y, debiased=True)
    assert biased > 0.5
    assert abs(deb) < 0.1


def test_hsic_matches_explicit_formulas():
    x, y = _rand(12, 5, seed=4), _rand(12, 3, seed=5)
    k, l = x @ x.t(), y @ y.t()
    n = 12
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    assert M.hsic(k, l) == pytest.approx(float(torch.trace(k @ h @ l @ h)) / (n - 1) ** 2, rel=1e-10)
    kt, lt = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    ref = (torch.trace(kt @ lt) + (one.t() @ kt @ one) * (one.t() @ lt @ one) / ((n - 1) * (n - 2))
           - 2.0 / (n - 2) * (one.t() @ kt @ lt @ one)) / (n * (n - 3))
    assert M.hsic(k, l, debiased=True) == pytest.approx(float(ref), rel=1e-10)
    with pytest.raises(M.MetricInputError):
        M.hsic(k[:3, :3], l[:3, :3], debiased=True)


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_matrix_equals_pairwise(debiased):
    grams = [M.gram(_rand(10, 4, seed=s)) for s in range(4)]
    mat = M.cka_matrix(grams, debiased)
    for a in range(4):
        for b in range(4):
            assert mat[a, b] == pytest.approx(M.cka_from_grams(grams[a], grams[b], debiased), abs=1e-10)


# ============================================================================================ rank
def test_effective_rank_and_participation_ratio():
    u, v = _rand(30, 1), _rand(1, 20, seed=1)
    assert M.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-9)             # rank 1
    assert M.participation_ratio(u @ v) == pytest.approx(1.0, abs=1e-9)
    assert M.effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-9)       # r equal singular values
    assert M.participation_ratio(torch.eye(7)) == pytest.approx(7.0, rel=1e-9)
    p = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert M.effective_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(
        math.exp(float(-(p * p.log()).sum())), rel=1e-9)
    assert M.participation_ratio(torch.tensor([2.0, 1.0])) == pytest.approx(25 / 17, rel=1e-9)


def test_singular_values_from_gram():
    x = _rand(9, 5)
    sv = M.singular_values_from_gram(M.gram(x))
    assert torch.allclose(sv[:5], torch.linalg.svdvals(x), atol=1e-8)
    assert torch.allclose(sv[5:], torch.zeros(4, dtype=torch.float64), atol=1e-6)


# ============================================================================================ sinks
def test_sink_ratio_and_dominant_dims():
    assert M.sink_ratio(torch.tensor([10.0, 1.0, 2.0, 3.0])) == pytest.approx(5.0)
    assert M.sink_ratio(torch.tensor([1.0, 4.0, 2.0]), sink=1) == pytest.approx(4 / 1.5)
    assert math.isnan(M.sink_ratio(torch.tensor([3.0])))
    v = torch.zeros(16)
    v[5], v[2] = 3.0, 4.0
    dims, share = M.dominant_dims(v, 2)
    assert dims == [2, 5] and share == pytest.approx([16 / 25, 9 / 25])
    assert float(M.energy_share(_rand(10)).sum()) == pytest.approx(1.0)


def test_robust_z_and_secondary_sinks():
    z = M.robust_z(torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert float(z[-1]) == pytest.approx(97 / 1.4826)                             # median 3, MAD 1
    assert float(z[2]) == 0.0
    norms = torch.ones(20) + 0.01 * torch.arange(20)
    norms[0], norms[7] = 1000.0, 50.0                                             # BOS excluded; 7 is an outlier
    hits = M.secondary_sinks(norms, threshold=6.0)
    assert [p for p, _ in hits] == [7]
    assert M.robust_z(torch.full((5,), 2.0)).abs().max() == 0


# ============================================================================================ experts
def test_expert_load_stats_known_answers():
    even = M.expert_load_stats(torch.full((8,), 5))
    assert even == {"dead": 0, "cv": 0.0, "entropy": pytest.approx(1.0), "max_violation": 0.0, "tokens": 40.0}
    one = M.expert_load_stats(torch.tensor([12, 0, 0, 0]))
    assert one["dead"] == 3 and one["entropy"] == 0.0
    assert one["max_violation"] == pytest.approx(3.0)                             # 12 / 3 − 1
    assert one["cv"] == pytest.approx(math.sqrt(3))
    assert M.topk_concentration(torch.tensor([5, 3, 1, 1]), 2) == pytest.approx(0.8)


def test_jaccard_family():
    assert M.jaccard({1, 2, 3}, {2, 3, 4}) == 0.5
    assert M.jaccard([], []) == 1.0
    a = torch.tensor([[0, 1, 2], [3, 4, 5], [1, -1, -1]])
    b = torch.tensor([[2, 1, 0], [6, 7, 3], [1, 2, -1]])
    ref = [M.jaccard([v for v in x if v >= 0], [v for v in y if v >= 0]) for x, y in zip(a.tolist(), b.tolist())]
    assert M.rowwise_jaccard(a, b).tolist() == pytest.approx(ref)
    dup = M.rowwise_jaccard(torch.tensor([[3, 3, 1], [2, 2, 2]]), torch.tensor([[3, 1, 1], [2, 5, 5]]))
    assert dup.tolist() == pytest.approx([1.0, 0.5])                             # repeats count once
    assert M.routing_agreement([[1, 2], [2, 1], [1, 2]]) == {"mean_jaccard": 1.0, "identical_fraction": 1.0, "n": 3}
    r = M.routing_agreement([[1, 2], [1, 3]])
    assert r["mean_jaccard"] == pytest.approx(1 / 3) and r["identical_fraction"] == 0.0


# ============================================================================================ mHC maps
def test_mixing_matrix_metrics():
    n = 4
    eye, uni = torch.eye(n), torch.full((n, n), 1 / n)
    perm = eye[[1, 2, 3, 0]]
    assert M.distance_from_identity(eye) == 0.0
    assert M.distance_from_identity(uni) == pytest.approx(math.sqrt(n - 1))
    assert M.distance_from_identity(perm) == pytest.approx(math.sqrt(2 * n))
    assert M.doubly_stochastic_error(perm) == 0.0
    rows_only = torch.tensor([[0.5, 0.5], [1.0, 0.0]])                             # column sums 1.5, 0.5
    assert M.doubly_stochastic_error(rows_only) == pytest.approx(0.5)
    batch = torch.stack([eye, uni])
    assert M.distance_from_identity(batch).tolist() == pytest.approx([0.0, math.sqrt(3)])
    assert M.mixing_spectrum(eye)["eigen_moduli"][1] == pytest.approx(1.0)
    assert M.mixing_spectrum(uni)["eigen_moduli"][1] == pytest.approx(0.0, abs=1e-7)
    assert M.mixing_spectrum(uni)["singular_values"].tolist() == pytest.approx([1, 0, 0, 0], abs=1e-7)


def test_model_sinkhorn_output_is_nearly_doubly_stochastic():
    h = _rand(1, 6, 4, 16).float()
    fn = 0.05 * _rand(24, 64, seed=1).float()          # moderate logits: 20 Sinkhorn steps converge
    _, _, comb = hc_maps(h, fn, torch.zeros(24), torch.ones(3), 20, 1e-6, 1e-6, "mhc")
    assert float(M.doubly_stochastic_error(comb).max()) < 1e-3
    _, _, raw = hc_maps(h, fn, torch.zeros(24), torch.ones(3), 20, 1e-6, 1e-6, "hc")
    assert float(M.doubly_stochastic_error(raw).max()) > 0.1


# ============================================================================================ attention / indexer / lens
def test_indexer_reach_known_answer():
    sel = torch.tensor([[0, -1], [0, 1], [2, 0]])                                # ratio 4
    pos = torch.tensor([4, 9, 13])
    st = M.indexer_reach(sel, pos, ratio=4, window=8)
    # distances: 4-0=4; 9-0=9, 9-4=5; 13-8=5, 13-0=13  -> beyond window (t-(j+1)m+1 >= 8): 9-4+1=6 no, 13-4+1=10 yes
    assert st["mean"] == pytest.approx((4 + 9 + 5 + 5 + 13) / 5)
    assert st["max"] == 13 and st["median"] == 5
    assert st["beyond_window"] == pytest.approx(1 / 5)
    assert st["bos_block_rate"] == 1.0 and st["picks"] == 5


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_adjacent_overlap(chunk):
    sel = torch.tensor([[0, 1], [1, 2], [1, 2], [-1, -1], [3, 0]])
    # pairs: {0,1}/{1,2} = 1/3, {1,2}/{1,2} = 1, the empty row skips two pairs
    assert M.adjacent_overlap(sel, chunk=chunk) == pytest.approx((1 / 3 + 1) / 2)


def test_attention_mass_and_lens_stats():
    w, c, s = torch.rand(3, 5, 2), torch.rand(3, 5, 2), torch.rand(3, 5, 2)
    am = M.attention_mass(w, c, s)
    assert am["sink"].tolist() == pytest.approx(s.double().mean((0, 1)).tolist())
    logits = _rand(6, 11).float()
    nxt = torch.tensor([1, 4, 2, 0, 9])
    st = M.lens_stats(logits, nxt)
    assert torch.allclose(st["nll"], F.cross_entropy(logits[:5], nxt, reduction="none"))
    assert st["top1"].tolist() == logits.argmax(-1).tolist()


def test_subsample_positions():
    idx = M.subsample_positions(1000, 64)
    assert idx[0] == 0 and idx[-1] == 999 and len(idx) <= 64 and bool((idx[1:] > idx[:-1]).all())
    assert M.subsample_positions(10, 64).tolist() == list(range(10))


# ============================================================================================ capture
def _ids(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [0] + torch.randint(2, 500, (n - 1,), generator=g).tolist()


def _layer_outputs(model, ids):
    """Every block's output [s, n, D] computed by hand (no hooks)."""
    x = torch.tensor([ids])
    h = model.embed(x).unsqueeze(2).repeat(1, 1, model.n_streams, 1)
    outs = []
    for blk in model.layers:
        h = blk(h, x)
        outs.append(h[0])
    return outs


@pytest.fixture(scope="module")
def tiny():
    return random_tiny(3)


def test_capture_matches_direct_computation(tiny):
    ids = _ids(40)
    with torch.no_grad():
        ref_logits = tiny(torch.tensor([ids]))
        outs = _layer_outputs(tiny, ids)
    with I.capture(tiny, gram_tokens=1024) as cap:
        rec = cap.run(ids, label="p", mode="chat")
    for i, h in enumerate(outs):
        L = rec["layers"][i]
        norms = h.flatten(1).norm(dim=-1)
        assert L["bos_norm"] == pytest.approx(float(norms[0]), rel=1e-5)
        assert L["sink_ratio"] == pytest.approx(M.sink_ratio(norms), rel=1e-5)
        assert L["hc_cka_mean"] == pytest.approx(
            sum(M.linear_cka(h[:, a], h[:, b]) for a in range(4) for b in range(a + 1, 4)) / 6, abs=1e-6)
        assert L["erank"] == pytest.approx(M.effective_rank(h.flatten(1)), rel=1e-6)
        assert L["erank_nobos"] == pytest.approx(M.effective_rank(h[1:].flatten(1)), rel=1e-6)
        assert sum(L["attn_mass"][k][0] for k in ("window", "compressed", "sink")) == pytest.approx(1.0)
        kind = tiny.cfg.layer_kind(i)
        assert ("indexer" in L) == (kind == "csa")
        if kind == "sliding":
            assert max(L["attn_mass"]["compressed"]) == 0.0
        # mHC stats of the attention sublayer equal the maps recomputed from the block's input
        blk, h_in = tiny.layers[i], (outs[i - 1] if i else tiny.embed(torch.tensor(ids)).unsqueeze(1).repeat(1, 4, 1))
        with torch.no_grad():
            _, _, comb = hc_maps(h_in[None], blk.hc_attn_fn, blk.hc_attn_base, blk.hc_attn_scale, blk.iters,
                                 blk.hc_eps, blk.norm_eps, "mhc")
        st = L["mhc"]["attn"]
        assert st["comb_identity_distance"] == pytest.approx(float(M.distance_from_identity(comb[0]).mean()), rel=1e-5)
        assert st["comb_ds_error"] == pytest.approx(float(M.doubly_stochastic_error(comb[0]).max()), rel=1e-4, abs=1e-7)
        assert st["comb_ds_error"] < 0.05
    # cross-layer CKA from the stored Grams equals CKA of the activations
    assert rec["layer_cka"][1, 3] == pytest.approx(M.linear_cka(outs[1].flatten(1), outs[3].flatten(1)), abs=1e-5)
    # hash layer: experts are the table's; logit lens at the last layer is the model's own output
    assert torch.equal(rec["experts"][0].long(), tiny.layers[0].ffn.gate.tid2eid[torch.tensor(ids)].long())
    last = rec["layers"][-1]
    assert last["lens_top1_agreement"] == 1.0
    assert last["lens_nll"] == pytest.approx(
        float(F.cross_entropy(ref_logits[0, :-1], torch.tensor(ids[1:]))), rel=1e-4)


def test_capture_leaves_model_untouched(tiny):
    ids = torch.tensor([_ids(20, seed=1)])
    before = tiny(ids)
    with I.capture(tiny) as cap:
        during = tiny(ids)                     # a forward outside cap.run records nothing
        cap.run(ids)
    assert torch.equal(before, during) and torch.equal(before, tiny(ids))
    assert len(cap.records) == 1
    for blk in tiny.layers:
        assert blk.attn.recorder is None and "_sublayer" not in vars(blk)
        assert not blk._forward_hooks and not blk.ffn.gate._forward_hooks


def test_capture_streams_small_records(tiny):
    """Nothing of size s·D or larger survives in a record (only per-token scalars, per-dim shares, ids)."""
    s, cfg = 64, tiny.cfg
    with I.capture(tiny) as cap:
        rec = cap.run(_ids(s))
    L, D, k = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts_per_tok
    limit = max(L * s * k, L * D, L * L, L * s)
    for key, v in rec.items():
        if isinstance(v, torch.Tensor):
            assert v.numel() <= limit, key


def test_capture_sees_an_injected_sink():
    """A BOS embedding 10⁴× larger gives a sink ratio of ~10³ (the study's scale) and a rank-1-like state (effective
    rank 1-2, as published), which BOS removal undoes."""
    m = random_tiny(4)
    with torch.no_grad():
        m.embed.weight[0] *= 1e4
    with I.capture(m, what=["blocks"]) as cap:
        rec = cap.run(_ids(48))
    L0 = rec["layers"][0]
    assert L0["sink_ratio"] > 500
    assert L0["erank"] < 1.5 and L0["erank_nobos"] > 10
    assert L0["hc_cka_mean"] > 0.99                                               # BOS dominates every copy alike


def test_capture_errors(tiny):
    with pytest.raises(CaptureError, match="unknown capture target"):
        I.Capture(tiny, what=["blocks", "nope"])
    with I.capture(tiny, what="gates") as cap:
        with pytest.raises(CaptureError, match="one prompt at a time"):
            cap.run(torch.zeros(2, 5, dtype=torch.long))
        with pytest.raises(CaptureError, match="empty"):
            cap.run([])


# ============================================================================================ report
@pytest.fixture(scope="module")
def report(tiny):
    from dsv4.train.data import ByteTokenizer
    prompts = [Prompt("a", "The capital of France is Paris."), Prompt("b", "def f(x):\n    return x * 2\n")]
    return I.inspect_model(tiny, ByteTokenizer(), prompts, ["chat", "thinking"], max_tokens=60,
                           meta={"random_weights": True})


def test_report_contents(report, tiny):
    L = tiny.cfg.num_hidden_layers
    assert report["schema"] == I.SCHEMA
    assert len(report["runs"]) == 4
    for key, vals in report["per_layer"].items():
        assert len(vals) in (L, L - 1), key
    md = report["modes"]
    assert md["modes"] == ["chat", "thinking"] and md["bos_identical_all"]
    # causal attention: the shared prefix is routed identically in both modes
    assert all(v == 1.0 for v in md["prefix_routing_jaccard"])
    assert report["per_layer"]["bos_routing_jaccard"] == [1.0] * L                # BOS sees only itself
    counts = torch.tensor(report["experts"]["counts"])
    assert counts.shape == (L, tiny.cfg.n_routed_experts)
    assert int(counts[0].sum()) == sum(r["n_tokens"] for r in report["runs"]) * tiny.cfg.num_experts_per_tok


def test_write_report_json_and_html(report, tmp_path):
    paths = I.write_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())                                 # strict JSON: no NaN
    assert data["schema"] == I.SCHEMA and data["comparison"] and data["summary_text"]
    imgs = re.findall(r"<img src='([^']+)'", paths["html"].read_text())
    assert len(imgs) >= 8 and set(imgs) == set(data["figures"])
    for name in imgs:
        f = tmp_path / name
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_with_published():
    good = {"bos_growth": 2000.0, "nonbos_growth": 50.0, "sink_ratio_peak": 800.0, "hc_cka_layer0": 0.95,
            "hc_cka_min_from_layer3": 0.99995, "erank_range": [1.0, 1.8], "erank_nobos_range": [6.5, 15.0],
            "modes_bos_identical": True}
    assert all(c["consistent"] is True for c in compare(good))
    bad = compare({"bos_growth": 2.0, "hc_cka_layer0": 0.5, "erank_range": [40.0, 50.0]})
    verdict = {c["key"]: c["consistent"] for c in bad}
    assert verdict["bos_growth"] is False and verdict["hc_cka_layer0"] is False and verdict["erank_range"] is False
    assert verdict["nonbos_growth"] is None                                      # not measured


# ============================================================================================ prompts
def test_prompt_files(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps(["one", {"name": "x", "text": "two", "kind": "long"}]))
    ps = load_prompts(tmp_path / "p.json")
    assert [(p.name, p.text, p.kind) for p in ps] == [("p0", "one", "short"), ("x", "two", "long")]
    (tmp_path / "p.jsonl").write_text('{"name": "a", "text": "alpha"}\n\n"beta"\n')
    assert [p.text for p in load_prompts(tmp_path / "p.jsonl")] == ["alpha", "beta"]
    (tmp_path / "p.txt").write_text("first\nprompt\n---\nsecond\n")
    assert [p.text for p in load_prompts(tmp_path / "p.txt")] == ["first\nprompt", "second"]
    (tmp_path / "bad.json").write_text('[{"name": "a"}]')
    with pytest.raises(PromptFileError, match="entry 0"):
        load_prompts(tmp_path / "bad.json")
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="unknown mode"):
        parse_modes("chat,dream")


def test_encode_prompt_modes():
    from dsv4.tokenizer import load_tokenizer
    from dsv4.train.data import ByteTokenizer
    tok = load_tokenizer()
    p = I.BUILTIN[0]
    chat, think = encode_prompt(tok, p, "chat"), encode_prompt(tok, p, "thinking")
    assert chat[0] == tok.bos_id and chat[:-1] == think[:-1] and chat[-1] != think[-1]
    assert encode_prompt(tok, p, "raw") == [tok.bos_id, *tok.encode(p.text)]
    long = I.BUILTIN[-1]
    cut = encode_prompt(tok, long, "thinking", max_tokens=50)
    assert len(cut) <= 50 and cut[-1] == think[-1]                               # template tail kept
    b = encode_prompt(ByteTokenizer(), p, "chat")
    assert b[0] == 0 and max(b) < 258


def test_builtin_prompt_lengths_mirror_the_study():
    from dsv4.tokenizer import load_tokenizer
    tok = load_tokenizer()
    n = {p.name: len(encode_prompt(tok, p, "raw")) for p in I.BUILTIN}
    assert len(I.BUILTIN) == 7
    assert 300 <= n["long_prose"] <= 360 and 600 <= n["long_code"] <= 680      # study: 331 and 641 tokens
    assert all(v < 40 for k, v in n.items() if not k.startswith("long"))


# ============================================================================================ CLI
def test_cli_inspect_tiny(tmp_path, capsys):
    from dsv4.cli import main
    pf = tmp_path / "prompts.txt"
    pf.write_text("Hello there.\n---\nTwo plus two is four.\n")
    out = tmp_path / "out"
    rc = main(["inspect", "--preset", "tiny", "--prompts", str(pf), "--max-tokens", "40", "--out", str(out),
               "--quiet", "--what", "blocks,gates"])
    assert rc == 0
    data = json.loads((out / "report.json").read_text())
    assert data["meta"]["preset"] == "tiny" and len(data["runs"]) == 4
    assert "attn_sink" not in data["per_layer"]                                   # attention was not captured
    assert "random weights" in capsys.readouterr().out
    assert main(["inspect", "--out", str(out)]) == 2                              # no model given
    assert main(["inspect", "--preset", "tiny", "--out", str(out), "--modes", "dream"]) == 2


def test_cli_inspect_checkpoint(tmp_path):
    import dsv4
    from dsv4.cli import main
    dsv4.save(random_tiny(5), tmp_path / "ckpt")
    pf = tmp_path / "p.json"
    pf.write_text(json.dumps([{"name": "only", "text": "A short prompt."}]))
    rc = main(["inspect", "--ckpt", str(tmp_path / "ckpt"), "--prompts", str(pf), "--modes", "raw",
               "--what", "blocks", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["meta"]["random_weights"] is False and data["runs"][0]["label"] == "only"
    assert main(["inspect", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o")]) == 2     # no config.json
