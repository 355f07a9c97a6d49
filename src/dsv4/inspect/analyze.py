"""Capture records (one per prompt × mode) -> the report dictionary written as report.json.

Per-run numbers are averaged over runs per layer; routing statistics pool the runs' expert picks; the mode
comparison pairs runs of the same prompt. The layout is documented in docs/inspect.md (schema SCHEMA).
"""
from __future__ import annotations

import datetime as _dt
import math
from collections import defaultdict
from typing import Callable, Sequence

import torch

from ..config import ModelConfig
from . import metrics as M

SCHEMA = "dsv4.inspect.report/1"
SINK_MAP_DIMS = 24          # at most this many dims in the sink-dimension map


def _mean(xs) -> float:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _per_layer(records: list[dict], key: str, n_layers: int, reduce=_mean) -> list[float]:
    return [reduce([r["layers"][i].get(key) for r in records]) for i in range(n_layers)]


def _nanmin(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return min(xs) if xs else float("nan")


def _nanmax(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return max(xs) if xs else float("nan")


def build_report(records: Sequence[dict], cfg: ModelConfig, *, meta: dict | None = None,
                 decode: Callable[[list[int]], str] | None = None, top_n: int = 10) -> dict:
    """Aggregate capture records into the report dict (JSON-ready once passed through `to_json_ready`).
    decode turns ids into text (token strings for secondary sinks); top_n is the "top-10" of expert concentration."""
    records = list(records)
    if not records:
        raise ValueError("no capture records: run at least one prompt")
    n_layers = len(records[0]["layers"])
    decode = decode or (lambda ids: " ".join(str(i) for i in ids))
    rep: dict = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
        "model": {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
                  "hc_mult": 1 if cfg.residual == "plain" else cfg.hc_mult, "n_routed_experts": cfg.n_routed_experts,
                  "num_experts_per_tok": cfg.num_experts_per_tok, "num_hash_layers": cfg.num_hash_layers,
                  "sliding_window": cfg.sliding_window, "residual": cfg.residual, "bos_token_id": cfg.bos_token_id,
                  "layer_kinds": [cfg.layer_kind(i) for i in range(n_layers)],
                  "hash_layers": [i < cfg.num_hash_layers for i in range(n_layers)]},
        "runs": [_run_entry(r, cfg, decode) for r in records],
    }
    pl = rep["per_layer"] = {}
    for key in ("bos_norm", "nonbos_norm", "nonbos_median", "last_norm", "sink_ratio", "hc_cka_mean",
                "hc_cka_nobos_mean", "hc_cka_nobos_debiased_mean", "erank", "erank_nobos", "pr", "pr_nobos",
                "lens_top1_agreement", "lens_nll"):
        pl[key] = _per_layer(records, key, n_layers)
    pl["sink_ratio_max"] = _per_layer(records, "sink_ratio", n_layers, _nanmax)
    pl["hc_cka_min"] = _per_layer(records, "hc_cka_min", n_layers, _nanmin)
    pl["hc_cka_nobos_min"] = _per_layer(records, "hc_cka_nobos_min", n_layers, _nanmin)
    rep["matrices"] = {}
    _cka(records, rep, n_layers)
    _sink_dims(records, rep, n_layers)
    _attention(records, rep, n_layers)
    _indexer(records, rep, n_layers)
    _mhc(records, rep, n_layers)
    _experts(records, rep, cfg, n_layers, top_n)
    rep["secondary_sinks"] = _secondary(records, decode)
    rep["modes"] = _modes(records, n_layers)
    rep["summary"] = _summary(rep)
    return rep


# ============================================================================================ pieces
def _run_entry(r: dict, cfg: ModelConfig, decode) -> dict:
    L = r["layers"]
    ids = r["ids"]
    return {"label": r["label"], "mode": r["mode"], "n_tokens": r["n_tokens"],
            "first_is_bos": bool(ids and ids[0] == cfg.bos_token_id),
            "text_head": decode(ids[:24]), "text_tail": decode(ids[-8:]),
            "per_layer": {k: [l.get(k) for l in L] for k in ("bos_norm", "nonbos_norm", "last_norm", "sink_ratio",
                                                             "hc_cka_mean", "erank", "erank_nobos")}}


def _cka(records, rep, n_layers) -> None:
    for tag in ("", "_nobos"):
        mats = [r["layer_cka" + tag] for r in records if r.get("layer_cka" + tag) is not None]
        if mats:
            m = torch.stack(mats).nanmean(0)
            rep["matrices"]["layer_cka" + tag] = m.tolist()
            rep["per_layer"]["adjacent_cka" + tag] = [float(m[i, i + 1]) for i in range(n_layers - 1)]
    hc = [torch.tensor([r["layers"][i]["hc_cka"] for r in records if "hc_cka" in r["layers"][i]]).nanmean(0).tolist()
          if any("hc_cka" in r["layers"][i] for r in records) else None for i in range(n_layers)]
    if any(h is not None for h in hc):
        rep["matrices"]["hc_cka"] = hc


def _sink_dims(records, rep, n_layers) -> None:
    """Map of BOS energy share: layers × the dims that lead in some layer (in order of first appearance)."""
    en = [r["bos_energy"] for r in records if r.get("bos_energy") is not None]
    if not en:
        return
    share = torch.stack(en).double().mean(0)                                    # [L, D]
    dims: list[int] = []
    for rank in range(3):                                                        # leaders first, then runners-up
        for i in range(n_layers):
            d = int(share[i].topk(rank + 1).indices[rank])
            if d not in dims and len(dims) < SINK_MAP_DIMS:
                dims.append(d)
    top = share.topk(min(3, share.shape[1]), dim=1)
    rep["matrices"]["sink_dims"] = {"dims": dims, "share": share[:, dims].tolist()}
    rep["per_layer"]["bos_top_dims"] = top.indices.tolist()
    rep["per_layer"]["bos_top_dims_share"] = top.values.tolist()


def _attention(records, rep, n_layers) -> None:
    if not any("attn_mass" in L for r in records for L in r["layers"]):
        return
    per_head = {k: [] for k in ("sink", "window", "compressed")}
    for i in range(n_layers):
        tot = {k: None for k in per_head}
        q = 0
        for r in records:
            a = r["layers"][i].get("attn_mass")
            if a:
                for k in per_head:
                    v = torch.tensor(a[k], dtype=torch.float64) * a["queries"]
                    tot[k] = v if tot[k] is None else tot[k] + v
                q += a["queries"]
        for k in per_head:
            per_head[k].append((tot[k] / max(q, 1)).tolist() if tot[k] is not None else None)
    rep["matrices"]["attention_per_head"] = per_head
    for k in per_head:
        rep["per_layer"]["attn_" + k] = [_mean(v) if v is not None else None for v in per_head[k]]


def _indexer(records, rep, n_layers) -> None:
    keys = ("mean", "median", "max", "beyond_window", "bos_block_rate", "adjacent_jaccard", "pick_recall")
    if not any("indexer" in L for r in records for L in r["layers"]):
        return
    for k in keys:
        red = _nanmax if k == "max" else _mean
        rep["per_layer"]["indexer_" + ("reach_" + k if k in ("mean", "median", "max") else k)] = [
            red([r["layers"][i]["indexer"].get(k, float("nan")) for r in records if "indexer" in r["layers"][i]])
            if any("indexer" in r["layers"][i] for r in records) else None for i in range(n_layers)]


def _mhc(records, rep, n_layers) -> None:
    if not any("mhc" in L for r in records for L in r["layers"]):
        return
    out = {}
    for sub in ("attn", "ffn"):
        d = defaultdict(list)
        for i in range(n_layers):
            st = [r["layers"][i]["mhc"][sub] for r in records if sub in r["layers"][i].get("mhc", {})]
            d["comb_identity_distance"].append(_mean(s["comb_identity_distance"] for s in st))
            d["comb_ds_error"].append(_nanmax([s["comb_ds_error"] for s in st]))
            d["comb_lambda2"].append(_mean(s["comb_lambda2"] for s in st))
            d["bos_comb_identity_distance"].append(_mean(s["bos"]["comb_identity_distance"] for s in st))
            for vec in ("comb_singular_values", "pre_mean", "post_mean", "pre_std", "post_std"):
                d[vec].append(torch.tensor([s[vec] for s in st]).mean(0).tolist() if st else None)
            d["comb_mean"].append(torch.tensor([s["comb_mean"] for s in st]).mean(0).tolist() if st else None)
        out[sub] = dict(d)
    rep["mhc"] = out


def _counts(idx: torch.Tensor, n: int) -> torch.Tensor:
    return torch.bincount(idx.reshape(-1).long(), minlength=n)


def _experts(records, rep, cfg: ModelConfig, n_layers: int, top_n: int) -> None:
    recs = [r for r in records if r.get("experts") is not None]
    if not recs:
        return
    E = cfg.n_routed_experts
    pl = rep["per_layer"]
    all_c, bos_c, con_c = (torch.zeros(n_layers, E, dtype=torch.long) for _ in range(3))
    for r in recs:
        ex = r["experts"]                                                          # [L, s, k]
        for i in range(n_layers):
            all_c[i] += _counts(ex[i], E)
            bos_c[i] += _counts(ex[i, :1], E)
            con_c[i] += _counts(ex[i, 1:], E)
    load = [M.expert_load_stats(all_c[i]) for i in range(n_layers)]
    for k in ("dead", "cv", "entropy", "max_violation"):
        pl["experts_" + k] = [s[k] for s in load]
    pl["experts_bos_unique"] = [int((bos_c[i] > 0).sum()) for i in range(n_layers)]
    pl["experts_content_unique"] = [int((con_c[i] > 0).sum()) for i in range(n_layers)]
    pl["experts_bos_top_n"] = [M.topk_concentration(bos_c[i], top_n) for i in range(n_layers)]
    pl["experts_content_top_n"] = [M.topk_concentration(con_c[i], top_n) for i in range(n_layers)]
    det = [M.routing_agreement([r["experts"][i, 0].tolist() for r in recs]) for i in range(n_layers)]
    pl["bos_routing_jaccard"] = [d["mean_jaccard"] for d in det]
    pl["bos_routing_identical"] = [d["identical_fraction"] for d in det]
    pl["bos_jaccard_next_layer"] = [_mean(M.jaccard(r["experts"][i, 0].tolist(), r["experts"][i + 1, 0].tolist())
                                          for r in recs) for i in range(n_layers - 1)]
    pooled = {"bos": bos_c, "content": con_c}
    rep["experts"] = {
        "top_n": top_n,
        "counts": all_c.tolist(),
        "pooled": {g: {"unique_layer_expert_pairs": int((c > 0).sum()),
                       "top_n_share": M.topk_concentration(c.flatten(), top_n),
                       "slots": int(c.sum())} for g, c in pooled.items()},
        "dead_total": sum(s["dead"] for s in load),
    }


def _secondary(records, decode) -> list[dict]:
    """Secondary sinks pooled by token id: how many (run, layer) pairs flagged it, in how many runs, where."""
    hits: dict[int, dict] = {}
    for r in records:
        for i, L in enumerate(r["layers"]):
            for pos, z, tid in L.get("secondary_sinks", []):
                h = hits.setdefault(tid, {"token_id": tid, "hits": 0, "runs": set(), "layers": set(), "z": []})
                h["hits"] += 1
                h["runs"].add((r["label"], r["mode"]))
                h["layers"].add(i)
                h["z"].append(z)
    out = []
    for h in sorted(hits.values(), key=lambda h: -h["hits"]):
        out.append({"token_id": h["token_id"], "token": decode([h["token_id"]]), "hits": h["hits"],
                    "runs": len(h["runs"]), "layers": sorted(h["layers"]), "mean_z": _mean(h["z"]),
                    "max_z": max(h["z"])})
    return out


def _modes(records, n_layers) -> dict:
    """Pairs runs of the same prompt in two modes (first two modes in run order): BOS identical?, expert-set
    Jaccard on the shared prefix and on the differing tail, last-token magnitude per layer in each mode."""
    by_label: dict[str, dict[str, dict]] = defaultdict(dict)
    order: list[str] = []
    for r in records:
        by_label[r["label"]].setdefault(r["mode"], r)
        if r["mode"] not in order:
            order.append(r["mode"])
    if len(order) < 2:
        return {}
    a_mode, b_mode = order[:2]
    pairs = []
    for label, runs in by_label.items():
        if a_mode not in runs or b_mode not in runs:
            continue
        a, b = runs[a_mode], runs[b_mode]
        ia, ib = a["ids"], b["ids"]
        p = next((j for j, (x, y) in enumerate(zip(ia, ib)) if x != y), min(len(ia), len(ib)))
        e = {"label": label, "common_prefix": p, "n_tokens": [len(ia), len(ib)]}
        bn_a = [L.get("bos_norm") for L in a["layers"]]
        bn_b = [L.get("bos_norm") for L in b["layers"]]
        if None not in bn_a and None not in bn_b:
            e["bos_norm_max_rel_diff"] = max(abs(x - y) / max(abs(x), 1e-30) for x, y in zip(bn_a, bn_b))
        if a.get("experts") is not None and b.get("experts") is not None:
            xa, xb = a["experts"], b["experts"]
            e["bos_experts_equal"] = bool(torch.equal(xa[:, 0], xb[:, 0]))
            pre = [float(M.rowwise_jaccard(xa[i, 1:p], xb[i, 1:p]).mean()) if p > 1 else float("nan")
                   for i in range(n_layers)]
            m = min(len(ia), len(ib))
            tail = [float(M.rowwise_jaccard(xa[i, p:m], xb[i, p:m]).mean()) if m > p else float("nan")
                    for i in range(n_layers)]
            e["prefix_routing_jaccard"], e["tail_routing_jaccard"] = pre, tail
        e["bos_identical"] = bool(e.get("bos_experts_equal", True) and e.get("bos_norm_max_rel_diff", 0.0) < 1e-4)
        e["last_norm"] = {a_mode: [L.get("last_norm") for L in a["layers"]],
                          b_mode: [L.get("last_norm") for L in b["layers"]]}
        pairs.append(e)
    if not pairs:
        return {}
    agg = {"modes": [a_mode, b_mode], "pairs": pairs,
           "bos_identical_all": all(e["bos_identical"] for e in pairs)}
    for key in ("prefix_routing_jaccard", "tail_routing_jaccard"):
        got = [e[key] for e in pairs if key in e]
        if got:
            agg[key] = [_mean(col) for col in zip(*got)]
    for mode in (a_mode, b_mode):
        agg.setdefault("last_norm_mean", {})[mode] = [_mean(col) for col in zip(*(e["last_norm"][mode] for e in pairs))]
    return agg


# ============================================================================================ headline numbers
def _ratio(a, b) -> float:
    return a / b if a is not None and b and not math.isnan(a) and not math.isnan(b) else float("nan")


def _summary(rep: dict) -> dict:
    pl = rep["per_layer"]
    s: dict = {"n_runs": len(rep["runs"]), "n_layers": len(pl["bos_norm"])}
    bos, non = pl["bos_norm"], pl["nonbos_norm"]
    s["bos_norm_first"], s["bos_norm_last"] = bos[0], bos[-1]
    s["bos_growth"] = _ratio(bos[-1], bos[0])
    s["nonbos_growth"] = _ratio(non[-1], non[0])
    sr = pl["sink_ratio"]
    finite = [(v, i) for i, v in enumerate(sr) if v is not None and not math.isnan(v)]
    if finite:
        s["sink_ratio_peak"], s["sink_ratio_peak_layer"] = max(finite)
    s["sink_ratio_peak_any_run"] = _nanmax(pl["sink_ratio_max"])
    cka = pl["hc_cka_mean"]
    s["hc_cka_layer0"] = cka[0]
    s["hc_cka_min_from_layer3"] = _nanmin(pl["hc_cka_min"][3:]) if len(cka) > 3 else float("nan")
    s["hc_cka_nobos_min_from_layer3"] = _nanmin(pl["hc_cka_nobos_min"][3:]) if len(cka) > 3 else float("nan")
    for k in ("erank", "erank_nobos", "pr", "pr_nobos"):
        s[k + "_range"] = [_nanmin(pl[k]), _nanmax(pl[k])]
    if "experts" in rep:
        s["dead_experts_total"] = rep["experts"]["dead_total"]
        s["experts_cv_mean"] = _mean(pl["experts_cv"])
        hashed = rep["model"]["hash_layers"]
        learned = [i for i, h in enumerate(hashed) if not h]
        s["bos_routing_jaccard_mean"] = _mean(pl["bos_routing_jaccard"][i] for i in learned)
        s["bos_routing_identical_mean"] = _mean(pl["bos_routing_identical"][i] for i in learned)
        s["bos_jaccard_next_layer_mean"] = _mean(pl["bos_jaccard_next_layer"])
        s["bos_unique_experts_mean"] = _mean(pl["experts_bos_unique"])
        s["content_unique_experts_mean"] = _mean(pl["experts_content_unique"])
        s["bos_top_n_mean"] = _mean(pl["experts_bos_top_n"])
        s["content_top_n_mean"] = _mean(pl["experts_content_top_n"])
    if "attn_sink" in pl:
        s["attn_sink_mass_mean"] = _mean(pl["attn_sink"])
        s["attn_sink_mass_max"] = _nanmax(pl["attn_sink"])
    if "indexer_pick_recall" in pl:
        s["indexer_pick_recall_mean"] = _mean(pl["indexer_pick_recall"])
        s["indexer_pick_recall_min"] = min((v for v in pl["indexer_pick_recall"] if v is not None and not math.isnan(v)),
                                           default=float("nan"))
    if rep["secondary_sinks"]:
        s["secondary_sink_tokens"] = [e["token"] for e in rep["secondary_sinks"][:5]]
    md = rep["modes"]
    if md:
        s["modes_compared"] = md["modes"]
        s["modes_bos_identical"] = md["bos_identical_all"]
        if "prefix_routing_jaccard" in md:
            s["modes_prefix_routing_jaccard"] = _mean(md["prefix_routing_jaccard"])
        if "tail_routing_jaccard" in md:
            s["modes_tail_routing_jaccard"] = _mean(md["tail_routing_jaccard"])
        ln = md["last_norm_mean"]
        a, b = md["modes"]
        s["modes_last_norm_ratio_final_layer"] = _ratio(ln[b][-1], ln[a][-1])
    return s


def to_json_ready(x):
    """Tensors -> lists, NaN/inf -> None, tuples/sets -> lists, recursively (JSON has no NaN)."""
    if isinstance(x, torch.Tensor):
        return to_json_ready(x.tolist())
    if isinstance(x, dict):
        return {str(k): to_json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [to_json_ready(v) for v in x]
    if isinstance(x, float):
        return M.finite_or_none(x)
    return x
