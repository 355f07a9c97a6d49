"""Matplotlib figures of a report dict, one PNG per theme. Every function reads only the report (so figures can be
redrawn from report.json) and returns False when the report lacks the data for it (e.g. gates not captured)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 110


def _arr(xs) -> np.ndarray:
    return np.array([np.nan if x is None else float(x) for x in xs], dtype=float)


def _save(fig, path: Path) -> bool:
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:
        if ax.get_xlabel() == "layer":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_ylabel() in ("layer", "head", "dead experts"):
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def _layers(n: int) -> np.ndarray:
    return np.arange(n)


def _positive(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[~(a > 0)] = np.nan
    return a


def sink_ratio(rep: dict, path: Path) -> bool:
    """Left: BOS/non-BOS magnitude ratio per layer (mean, and each run faintly). Right: magnitudes."""
    pl = rep["per_layer"]
    n = len(pl["bos_norm"])
    x = _layers(n)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rep["runs"]:
        a.plot(x, _positive(_arr(r["per_layer"]["sink_ratio"])), color="tab:blue", alpha=0.2, lw=1)
    a.plot(x, _positive(_arr(pl["sink_ratio"])), color="tab:blue", lw=2, marker="o", ms=3, label="mean over runs")
    a.axhline(1, color="grey", lw=0.8, ls=":")
    a.set_yscale("log")
    a.set(xlabel="layer", ylabel="‖h_BOS‖ / mean ‖h_t≠BOS‖", title="Sink ratio per layer")
    a.legend()
    b.plot(x, _positive(_arr(pl["bos_norm"])), marker="o", ms=3, label="BOS")
    b.plot(x, _positive(_arr(pl["nonbos_norm"])), marker="o", ms=3, label="non-BOS (mean)")
    b.plot(x, _positive(_arr(pl["last_norm"])), ls="--", label="last token")
    b.set_yscale("log")
    b.set(xlabel="layer", ylabel="‖h‖ over [hc, dim]", title="Token magnitude")
    b.legend()
    return _save(fig, path)


def sink_dims(rep: dict, path: Path) -> bool:
    sd = rep.get("matrices", {}).get("sink_dims")
    if not sd or not sd["dims"]:
        return False
    share = np.array(sd["share"], dtype=float)                                  # [L, dims]
    fig, ax = plt.subplots(figsize=(min(14, max(6.5, 3 + 0.25 * share.shape[0])), 1.8 + 0.28 * len(sd["dims"])))
    im = ax.imshow(share.T, aspect="auto", cmap="magma", vmin=0, vmax=max(1e-9, np.nanmax(share)),
                   interpolation="nearest")
    ax.set_yticks(range(len(sd["dims"])), [str(d) for d in sd["dims"]], fontsize=7)
    ax.set(xlabel="layer", ylabel="hidden dim", title="BOS energy share per hidden dim")
    fig.colorbar(im, ax=ax, label="v_d² / ‖v‖²")
    return _save(fig, path)


def cka(rep: dict, path: Path) -> bool:
    pl, mats = rep["per_layer"], rep.get("matrices", {})
    if "layer_cka" not in mats and all(v is None for v in pl["hc_cka_mean"]):
        return False
    n = len(pl["bos_norm"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    a = axes[0]
    for key, lab in (("hc_cka_mean", "with BOS"), ("hc_cka_nobos_mean", "without BOS"),
                     ("hc_cka_nobos_debiased_mean", "without BOS, debiased"), ("hc_cka_min", "min pair, with BOS")):
        a.plot(_layers(n), _arr(pl[key]), marker="o", ms=3, label=lab)
    a.set(xlabel="layer", ylabel="linear CKA", title="CKA between the hc copies")
    a.legend(fontsize=8)
    for ax, key, title in ((axes[1], "layer_cka", "Layer × layer CKA (with BOS)"),
                           (axes[2], "layer_cka_nobos", "Layer × layer CKA (without BOS)")):
        if key in mats:
            im = ax.imshow(np.array(mats[key], dtype=float), cmap="viridis", vmin=0, vmax=1, origin="lower")
            fig.colorbar(im, ax=ax)
        ax.set(xlabel="layer", ylabel="layer", title=title)
    return _save(fig, path)


def erank(rep: dict, path: Path) -> bool:
    pl = rep["per_layer"]
    n = len(pl["bos_norm"])
    fig, ax = plt.subplots(figsize=(7.5, 4))
    ax.plot(_layers(n), _arr(pl["erank"]), marker="o", ms=3, label="effective rank, with BOS")
    ax.plot(_layers(n), _arr(pl["erank_nobos"]), marker="o", ms=3, label="effective rank, without BOS")
    ax.plot(_layers(n), _arr(pl["pr"]), ls="--", label="participation ratio, with BOS")
    ax.plot(_layers(n), _arr(pl["pr_nobos"]), ls="--", label="participation ratio, without BOS")
    ax.set_yscale("log")
    ax.set(xlabel="layer", ylabel="dimensions", title="Effective rank of the token × [hc·dim] states")
    ax.legend(fontsize=8)
    return _save(fig, path)


def experts(rep: dict, path: Path) -> bool:
    ex = rep.get("experts")
    if not ex:
        return False
    pl = rep["per_layer"]
    counts = np.array(ex["counts"], dtype=float)                               # [L, E]
    hashed = np.array(rep["model"]["hash_layers"], dtype=bool)
    learned = counts[~hashed] if (~hashed).any() else counts
    mean = learned.mean(1, keepdims=True)
    rel = (learned / np.where(mean > 0, mean, 1)).ravel()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(rel, bins=40, color="tab:purple")
    a.axvline(1, color="k", ls=":", lw=1)
    a.set(xlabel="tokens routed / layer mean", ylabel="(layer, expert) pairs",
          title="Expert usage (learned-routing layers, all runs)")
    n = counts.shape[0]
    b.bar(_layers(n), _arr(pl["experts_dead"]), color="tab:red", alpha=0.6, label="dead experts")
    b.set(xlabel="layer", ylabel="dead experts")
    b2 = b.twinx()
    b2.plot(_layers(n), _arr(pl["experts_cv"]), color="tab:blue", marker="o", ms=3, label="load CV")
    b2.set_ylabel("std / mean")
    b.set_title("Dead experts and load imbalance per layer")
    h1, l1 = b.get_legend_handles_labels()
    h2, l2 = b2.get_legend_handles_labels()
    b.legend(h1 + h2, l1 + l2, fontsize=8)
    return _save(fig, path)


def routing(rep: dict, path: Path) -> bool:
    pl = rep["per_layer"]
    if "bos_routing_jaccard" not in pl:
        return False
    n = len(pl["bos_norm"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(_layers(n), _arr(pl["bos_routing_jaccard"]), marker="o", ms=6, lw=4, alpha=0.5, label="BOS across prompts")
    a.plot(_layers(n - 1) + 0.5, _arr(pl["bos_jaccard_next_layer"]), marker="s", ms=3,
           label="BOS, layer l vs l+1")
    md = rep.get("modes") or {}
    if "prefix_routing_jaccard" in md:
        a.plot(_layers(n), _arr(md["prefix_routing_jaccard"]), marker="^", ms=3,
               label=f"{md['modes'][0]} vs {md['modes'][1]}, shared prefix")
    if "tail_routing_jaccard" in md:
        a.plot(_layers(n), _arr(md["tail_routing_jaccard"]), marker="v", ms=3,
               label=f"{md['modes'][0]} vs {md['modes'][1]}, differing tail")
    a.set(xlabel="layer", ylabel="Jaccard of expert sets", ylim=(-0.05, 1.05), title="Routing agreement")
    a.legend(fontsize=8)
    b.plot(_layers(n), _arr(pl["experts_bos_top_n"]), marker="o", ms=3, label="BOS")
    b.plot(_layers(n), _arr(pl["experts_content_top_n"]), marker="o", ms=3, label="content tokens")
    b.set(xlabel="layer", ylabel=f"share of top-{rep['experts']['top_n']} experts", ylim=(0, 1.05),
          title="Routing concentration")
    b.legend(fontsize=8)
    return _save(fig, path)


def attention(rep: dict, path: Path) -> bool:
    pl, mats = rep["per_layer"], rep.get("matrices", {})
    if "attn_sink" not in pl:
        return False
    n = len(pl["bos_norm"])
    x = _layers(n)
    s, w, c = (np.nan_to_num(_arr(pl[k])) for k in ("attn_sink", "attn_window", "attn_compressed"))
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.bar(x, w, label="window", color="tab:green")
    a.bar(x, c, bottom=w, label="compressed", color="tab:orange")
    a.bar(x, s, bottom=w + c, label="sink", color="tab:gray")
    a.set(xlabel="layer", ylabel="mean attention mass", ylim=(0, 1.02), title="Where attention goes")
    a.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    heads = mats["attention_per_head"]["sink"]
    width = max((len(h) for h in heads if h), default=0)
    grid = np.full((n, max(width, 1)), np.nan)
    for i, h in enumerate(heads):
        if h:
            grid[i, :len(h)] = h
    top = float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0
    im = b.imshow(grid.T, aspect="auto", cmap="Greys", vmin=0, vmax=max(0.05, top), origin="lower",
                  interpolation="nearest")
    b.set(xlabel="layer", ylabel="head", title="Sink mass per head")
    fig.colorbar(im, ax=b)
    return _save(fig, path)


def mhc(rep: dict, path: Path) -> bool:
    m = rep.get("mhc")
    if not m:
        return False
    n = len(rep["per_layer"]["bos_norm"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for sub, style in (("attn", "-"), ("ffn", "--")):
        a.plot(_layers(n), _arr(m[sub]["comb_identity_distance"]), ls=style, marker="o", ms=3,
               label=f"{sub}: ‖comb − I‖_F")
        a.plot(_layers(n), _arr(m[sub]["comb_lambda2"]), ls=style, marker="s", ms=3, label=f"{sub}: |λ₂(comb)|")
        err = _positive(_arr(m[sub]["comb_ds_error"]))
        if np.isfinite(err).any():
            b.plot(_layers(n), err, ls=style, marker="o", ms=3, label=sub)
    a.set(xlabel="layer", title="mHC stream mixing")
    a.legend(fontsize=8)
    b.set_yscale("log")
    b.set(xlabel="layer", ylabel="max |row/col sum − 1|", title="Sinkhorn doubly-stochastic error")
    b.legend(fontsize=8)
    return _save(fig, path)


def lens(rep: dict, path: Path) -> bool:
    pl = rep["per_layer"]
    if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in pl["lens_nll"]):
        return False
    n = len(pl["bos_norm"])
    fig, a = plt.subplots(figsize=(7.5, 4))
    a.plot(_layers(n), _arr(pl["lens_top1_agreement"]), marker="o", ms=3, color="tab:blue")
    a.set(xlabel="layer", ylabel="top-1 agreement with final", ylim=(-0.02, 1.02), title="Logit lens")
    a2 = a.twinx()
    a2.plot(_layers(n), _arr(pl["lens_nll"]), marker="s", ms=3, color="tab:red")
    a2.set_ylabel("next-token loss (nats)", color="tab:red")
    return _save(fig, path)


FIGURES = (
    ("sink_ratio.png", "Sink ratio and token magnitudes per layer", sink_ratio),
    ("sink_dims.png", "Sink register dimensions", sink_dims),
    ("cka.png", "CKA: hc copies and layer × layer", cka),
    ("erank.png", "Effective rank with and without BOS", erank),
    ("experts.png", "Expert usage", experts),
    ("routing.png", "Routing agreement (BOS determinism, adjacent layers, modes)", routing),
    ("attention.png", "Attention mass: window / compressed / sink", attention),
    ("mhc.png", "mHC maps", mhc),
    ("logit_lens.png", "Logit lens", lens),
)


def draw_all(rep: dict, out_dir: Path) -> list[tuple[str, str]]:
    """Draw every figure the report has data for -> [(file name, caption)]."""
    made = []
    for name, caption, fn in FIGURES:
        if fn(rep, Path(out_dir) / name):
            made.append((name, caption))
    return made
