"""The published DeepSeek-V4-Flash numbers this tool reproduces, and the comparison of a report against them.

Source: a public measurement study of DeepSeek-V4-Flash (FP8 weights on 8×H100; forward hooks on every Block
output [batch, seq, hc_mult, dim] and every MoE gate; 7 prompts — 5 short: factual, code, quantum, story, math;
2 long: a Roman-Empire prose paragraph of 331 tokens and attention code of 641 tokens), as summarised in
project issue #5. Only numbers stated there are listed; findings reported without a number are compared
qualitatively in the summary text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

STUDY = ("public measurement study of DeepSeek-V4-Flash (FP8, 43 layers, hc_mult 4; 7 prompts: 5 short, "
         "2 long of 331 and 641 tokens), via project issue #5")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _within_factor(f: float) -> Callable[[Any, Any], bool | None]:
    return lambda ours, pub: (pub / f <= ours <= pub * f) if _finite(ours) else None


def _abs_tol(t: float) -> Callable[[Any, Any], bool | None]:
    return lambda ours, pub: abs(ours - pub) <= t if _finite(ours) else None


def _at_least(lo: float) -> Callable[[Any, Any], bool | None]:
    return lambda ours, pub: ours >= lo if _finite(ours) else None


def _range_inside(lo: float, hi: float) -> Callable[[Any, Any], bool | None]:
    def check(ours, pub):
        if not isinstance(ours, (list, tuple)) or not all(_finite(v) for v in ours):
            return None
        return lo <= ours[0] and ours[1] <= hi
    return check


def _same(ours, pub) -> bool | None:
    return None if ours is None else bool(ours) == bool(pub)


@dataclass(frozen=True)
class Finding:
    key: str                   # key in report["summary"]
    what: str
    value: Any                 # the published number (or range / flag)
    text: str                  # how the study states it
    check: Callable[[Any, Any], bool | None]
    tolerance: str             # what "consistent" means, in words


FINDINGS: tuple[Finding, ...] = (
    Finding("bos_growth", "BOS magnitude growth, first -> last layer", 1800.0, "~1,800x (28 -> 69,632)",
            _within_factor(3), "within a factor of 3"),
    Finding("nonbos_growth", "non-BOS magnitude growth, first -> last layer", 70.0, "~70x",
            _within_factor(3), "within a factor of 3"),
    Finding("sink_ratio_peak", "peak BOS / non-BOS magnitude ratio over layers", 900.0,
            "up to ~900x (e.g. 79x at layer 5, 12x at layer 20)", _within_factor(3), "within a factor of 3"),
    Finding("hc_cka_layer0", "CKA between the hc copies at layer 0", 0.95, "~0.95", _abs_tol(0.03), "±0.03"),
    Finding("hc_cka_min_from_layer3", "lowest CKA between hc copies, layers >= 3", 0.9999, "> 0.9999",
            _at_least(0.999), ">= 0.999"),
    Finding("erank_range", "effective rank per layer, with BOS (min, max)", [1, 2], "1-2",
            _range_inside(1, 3), "all layers within [1, 3]"),
    Finding("erank_nobos_range", "effective rank per layer, without BOS (min, max)", [6, 17], "6-17",
            _range_inside(3, 34), "all layers within [3, 34]"),
    Finding("modes_bos_identical", "BOS state and routing identical in chat and thinking mode", True, "identical",
            _same, "same"),
)


def compare(summary: dict) -> list[dict]:
    """One entry per published finding: ours, published, consistent (True / False / None = not measured)."""
    out = []
    for f in FINDINGS:
        ours = summary.get(f.key)
        out.append({"key": f.key, "finding": f.what, "published": f.value, "published_text": f.text,
                    "ours": ours, "tolerance": f.tolerance, "consistent": f.check(ours, f.value)})
    return out


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (list, tuple)):
        return "–".join(_fmt(v) for v in x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return "n/a"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.4g}"
    return str(x)


def summary_lines(report: dict) -> list[str]:
    """A short plain-text reading of the report next to the published numbers."""
    s, lines = report["summary"], []
    meta = report.get("meta", {})
    if meta.get("random_weights"):
        lines.append("This model has random weights: the published findings are properties of the trained "
                     "V4-Flash weights, so no agreement is expected here — this run only exercises the pipeline.")
    for c in report.get("comparison", []):
        verdict = {True: "consistent", False: "differs", None: "not measured"}[c["consistent"]]
        lines.append(f"{c['finding']}: {_fmt(c['ours'])} (published {c['published_text']}) — {verdict}.")
    if "sink_ratio_peak_layer" in s:
        lines.append(f"The BOS/non-BOS magnitude ratio peaks at layer {s['sink_ratio_peak_layer']} "
                     f"({_fmt(s['sink_ratio_peak'])}x; single-run peak {_fmt(s.get('sink_ratio_peak_any_run'))}x).")
    if "bos_routing_jaccard_mean" in s:
        lines.append(f"BOS routing across prompts (learned-routing layers): mean Jaccard "
                     f"{_fmt(s['bos_routing_jaccard_mean'])}, identical in {_fmt(100 * s['bos_routing_identical_mean'])}% "
                     f"of prompt pairs — BOS sees only itself under causal attention, so identical routing is "
                     f"expected up to numerics. BOS experts of adjacent layers: mean Jaccard "
                     f"{_fmt(s['bos_jaccard_next_layer_mean'])} (expert ids of different layers are unrelated; "
                     f"chance level is about k/E).")
        lines.append(f"Experts per layer used by BOS: {_fmt(s['bos_unique_experts_mean'])} vs content tokens "
                     f"{_fmt(s['content_unique_experts_mean'])}; top-{report['experts']['top_n']} share "
                     f"{_fmt(s['bos_top_n_mean'])} (BOS) vs {_fmt(s['content_top_n_mean'])} (content). "
                     f"Dead experts over all layers: {s['dead_experts_total']}, mean load CV "
                     f"{_fmt(s['experts_cv_mean'])}.")
    if "attn_sink_mass_mean" in s:
        lines.append(f"Attention mass on the learned sink slot: mean {_fmt(s['attn_sink_mass_mean'])}, "
                     f"max layer {_fmt(s['attn_sink_mass_max'])} (the study could not read attention "
                     f"probabilities through its fused kernels).")
    if "indexer_pick_recall_mean" in s:
        lines.append(f"CSA indexer: its top-k picks hold {_fmt(s['indexer_pick_recall_mean'])} of the attention a "
                     f"dense pass over every visible entry would put on compressed entries (mean over CSA layers; "
                     f"lowest layer {_fmt(s['indexer_pick_recall_min'])}).")
    if s.get("secondary_sink_tokens"):
        lines.append("Most frequent secondary-sink tokens: " + ", ".join(repr(t) for t in s["secondary_sink_tokens"]) + ".")
    if "modes_compared" in s:
        a, b = s["modes_compared"]
        lines.append(f"{a} vs {b}: BOS identical {_fmt(s['modes_bos_identical'])}; expert-set Jaccard on the shared "
                     f"prefix {_fmt(s.get('modes_prefix_routing_jaccard'))}, on the differing tail "
                     f"{_fmt(s.get('modes_tail_routing_jaccard'))}; last-token magnitude at the last layer "
                     f"{b}/{a} = {_fmt(s.get('modes_last_norm_ratio_final_layer'))}.")
    return lines
