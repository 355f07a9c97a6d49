"""Write a report dict as report.json (schema in docs/inspect.md) and report.html with its PNG figures."""
from __future__ import annotations

import html
import json
from pathlib import Path

from . import plots
from .analyze import to_json_ready
from .published import STUDY, compare, summary_lines


def finalize(rep: dict) -> dict:
    """Attach the comparison with the published numbers and the text summary (idempotent)."""
    rep["comparison"] = compare(rep["summary"])
    rep["summary_text"] = summary_lines(rep)
    rep["published_source"] = STUDY
    return rep


def write_report(rep: dict, out_dir: str | Path) -> dict[str, Path]:
    """-> {"json": path, "html": path, <figure>: path ...}. Creates out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finalize(rep)
    data = to_json_ready(rep)
    figures = plots.draw_all(data, out)
    data["figures"] = [name for name, _ in figures]
    paths = {"json": out / "report.json", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(data, indent=1, allow_nan=False))
    paths["html"].write_text(render_html(data, figures))
    paths.update({name: out / name for name, _ in figures})
    return paths


def _fmt(x) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    if isinstance(x, list):
        return ", ".join(_fmt(v) for v in x)
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:0.9em;
text-align:left}th{background:#f2f2f2}img{max-width:100%;border:1px solid #eee}figure{margin:1.5em 0}
.yes{color:#070}.no{color:#a00}code{background:#f5f5f5;padding:0 3px}"""


def render_html(data: dict, figures: list[tuple[str, str]]) -> str:
    e = html.escape
    meta, model, s = data.get("meta", {}), data["model"], data["summary"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dsv4 inspect</title><style>{_CSS}</style>"
             "</head><body>", "<h1>dsv4 inspect</h1>"]
    parts.append(_table(["field", "value"], [[k, v] for k, v in meta.items()] + [
        ["layers", model["num_hidden_layers"]], ["hidden size", model["hidden_size"]], ["hc_mult", model["hc_mult"]],
        ["experts", f"{model['n_routed_experts']} (top-{model['num_experts_per_tok']})"],
        ["runs", s["n_runs"]], ["schema", data["schema"]], ["created", data["created"]]]))
    parts.append("<h2>Summary</h2><ul>" + "".join(f"<li>{e(t)}</li>" for t in data.get("summary_text", [])) + "</ul>")
    parts.append(f"<h2>Published numbers</h2><p>Source: {e(data.get('published_source', ''))}.</p>")
    parts.append(_table(["finding", "published", "ours", "consistent", "tolerance"],
                        [[c["finding"], c["published_text"], c["ours"], c["consistent"], c["tolerance"]]
                         for c in data.get("comparison", [])]))
    parts.append("<h2>Runs</h2>" + _table(
        ["prompt", "mode", "tokens", "BOS first", "start", "end"],
        [[r["label"], r["mode"], r["n_tokens"], r["first_is_bos"], r["text_head"], r["text_tail"]]
         for r in data["runs"]]))
    parts.append("<h2>Figures</h2>")
    for name, caption in figures:
        parts.append(f"<figure><img src='{e(name)}' alt='{e(caption)}'><figcaption>{e(caption)}</figcaption></figure>")
    ss = data.get("secondary_sinks") or []
    if ss:
        parts.append("<h2>Secondary sinks</h2><p>Non-BOS tokens whose magnitude has a robust z-score above the "
                     "threshold, pooled by token.</p>")
        parts.append(_table(["token", "id", "hits (run × layer)", "runs", "layers", "mean z"],
                            [[repr(x["token"]), x["token_id"], x["hits"], x["runs"], x["layers"], x["mean_z"]]
                             for x in ss[:30]]))
    md = data.get("modes") or {}
    if md.get("pairs"):
        a, b = md["modes"]
        parts.append(f"<h2>{e(a)} vs {e(b)}</h2>")
        parts.append(_table(["prompt", "shared prefix", "tokens", "BOS identical", "last-token ‖h‖ final layer "
                             f"({a} / {b})"],
                            [[p["label"], p["common_prefix"], p["n_tokens"], p["bos_identical"],
                              f"{_fmt(p['last_norm'][a][-1])} / {_fmt(p['last_norm'][b][-1])}"] for p in md["pairs"]]))
    parts.append("<p>Full numbers: <a href='report.json'>report.json</a> (layout in docs/inspect.md).</p></body></html>")
    return "\n".join(parts)
