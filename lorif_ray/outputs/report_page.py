"""``report.html``: one self-contained page of a query run (no network, no scripts, no external style; inline SVG).

Per query: its text (the prompt in grey, the attributed part in bold; with ``query.per_token`` each target
token coloured by its attribution), its top proponents and opponents with their texts and scores (the known
source marked, where the queries name one), the distribution of its scores against every training row (the
run's score bins, re-binned to a linear axis; the bar heights are log counts) and, with ``query.per_layer``,
each layer's share of its top proponents' scores. Every text is escaped (training data is untrusted). What is
shown is capped (``MAX_QUERIES`` queries, ``MAX_ROWS`` rows a side, ``MAX_TEXT`` characters a text) and the page
says so; the run's tables hold everything.
"""

from __future__ import annotations

import html
import math
import time
from collections import defaultdict

import numpy as np

from lorif_ray.store.query_run import FILES, QueryRun, score_bin_edges

MAX_QUERIES = 50
MAX_ROWS = 10
MAX_TEXT = 300
MAX_LAYERS = 12
MAX_TOKENS = 200
HISTOGRAM_BINS = 48


def write_report_page(run: QueryRun) -> None:
    """Render the run's page and write it as the run's ``report.html``."""
    run.write_text("report", render_report(run))


def escape(text, limit: int | None = MAX_TEXT) -> str:
    """``text`` (None: an em dash) cut to ``limit`` characters and escaped for HTML text and attributes."""
    if text is None:
        return "—"
    text = str(text)
    if limit is not None and len(text) > limit:
        text = text[:limit - 1] + "…"
    return html.escape(text, quote=True)


def format_score(value: float) -> str:
    return f"{value:+.4g}"


def rows_by_query(table) -> dict[str, list[dict]]:
    """{query id: its rows, by rank} of a top-k-shaped table."""
    out = defaultdict(list)
    for row in table.to_pylist():
        out[row["query_id"]].append(row)
    for rows in out.values():
        rows.sort(key=lambda r: r["rank"])
    return out


def render_report(run: QueryRun) -> str:
    """The page of a query run (a complete HTML document)."""
    queries = run.table("queries").to_pylist()
    top, bottom = rows_by_query(run.table("topk")), rows_by_query(run.table("opponents"))
    shown = queries[:MAX_QUERIES]
    tokens = _tokens_by_query(run, {q["query_id"] for q in shown})
    layers = _layer_shares(run, shown, top)
    cfg = run.meta.get("config", {})
    sections = [_query_section(q, top.get(q["query_id"], []), bottom.get(q["query_id"], []),
                               tokens.get(q["query_id"]), layers.get(q["query_id"]), run)
                for q in shown]
    return _PAGE.format(title=escape(f"lorif-ray: {len(queries)} queries, {cfg.get('output_dir', '')}", None),
                        style=_STYLE, header=_header(run, queries, top), sections="\n".join(sections),
                        footer=_footer(run))


def _header(run: QueryRun, queries: list[dict], top: dict) -> str:
    cfg = run.meta.get("config", {})
    method = cfg.get("method", {}).get("name", "?")
    settings = (f"method {method} · curvature {run.meta.get('curvature', '?')} · "
                f"f={cfg.get('f')} c={cfg.get('c')} r={cfg.get('r')} · "
                f"measurement {cfg.get('query', {}).get('measurement', 'loss')} · route {run.meta.get('route')} · "
                f"{run.record.get('train', '?')} training examples · {len(queries)} queries")
    k = run.record.get("top_k", 0)
    notes = []
    if len(queries) > MAX_QUERIES:
        notes.append(f"showing the first {MAX_QUERIES} of {len(queries)} queries")
    if k > MAX_ROWS:
        notes.append(f"the top {MAX_ROWS} of the {k} ranks kept on each side")
    notes.append(f"texts cut at {MAX_TEXT} characters (hover a text for more)")
    if not run.record.get("texts", True):
        notes.append("no training texts: the index has no row table, or the training input moved or changed "
                     "(see the run's log)")
    summary = ""
    sources = {q["query_id"]: q["source_id"] for q in queries if q.get("source_id")}
    if sources:
        ranks = {}
        for query, source in sources.items():
            ranks[query] = next((r["rank"] for r in top.get(query, []) if r["train_id"] == source), None)
        first = sum(1 for r in ranks.values() if r == 1)
        within = sum(1 for r in ranks.values() if r is not None and r <= min(5, k))
        summary = (f'<p class="summary">known source ranked first for <b>{first}/{len(sources)}</b> queries, '
                   f'in the top {min(5, k)} for <b>{within}/{len(sources)}</b></p>')
    return (f'<header><h1>Training-data attribution</h1><p class="settings">{escape(settings, None)}</p>'
            f'<p class="meaning">score: {escape(run.meta.get("score", ""), None)}</p>{summary}'
            f'<p class="notes">{escape("; ".join(notes), None)}. Everything is in topk.parquet, opponents.parquet and '
            f'queries.parquet beside this page.</p></header>')


def _footer(run: QueryRun) -> str:
    files = ", ".join(sorted(set(run.record["files"]) | {FILES["report"]}))
    made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.record.get("created", time.time())))
    return (f'<footer>query run {escape(run.run_id, None)} · written {escape(made, None)} · files: '
            f'{escape(files, None)}</footer>')


def _query_section(query: dict, top: list[dict], bottom: list[dict], tokens: list[dict] | None,
                   layers: list[tuple[str, float]] | None, run: QueryRun) -> str:
    query_id, source = query["query_id"], query.get("source_id")
    chips = f'<div class="tokens">target tokens: {tokens_html(tokens)}</div>' if tokens else ""
    low = bottom[0]["score"] if bottom else 0.0
    high = top[0]["score"] if top else 0.0
    marks = [(r["score"], "#ca8a04", f"the known source [{source}], rank {r['rank']}") for r in top + bottom
             if source is not None and r["train_id"] == source]
    plots = [f'<div class="plot"><div class="caption">scores against all {run.record.get("train", "?")} training '
             f'examples (height: log count{"; ▲ known source" if marks else ""})</div>'
             f'{histogram_svg(query["score_bins"], low, high, marks)}</div>', _facts(query, top, bottom, run)]
    if layers is not None:
        shown = len(top[:MAX_ROWS])
        plots.append(f'<div class="plot layers"><div class="caption">share of each layer in the top {shown} '
                     f'proponents\' scores</div>{layers_svg(layers)}</div>')
    elif not run.has("layer_scores"):
        plots.append('<div class="plot layers hint">per-layer split: run the query with query.per_layer=true</div>')
    scale = max([abs(r["score"]) for r in top[:MAX_ROWS] + bottom[:MAX_ROWS]] + [1e-30])
    sides = (_rows_table("proponents", "pro", top[:MAX_ROWS], source, scale)
             + _rows_table("opponents", "con", bottom[:MAX_ROWS], source, scale))
    return (f'<section class="query" id="q-{escape(query_id, None)}"><h2><span class="qid">{escape(query_id, 80)}'
            f'</span>{_query_text(query)}</h2>{chips}<div class="plots">{"".join(plots)}</div>'
            f'<div class="sides">{sides}</div></section>')


def _facts(query: dict, top: list[dict], bottom: list[dict], run: QueryRun) -> str:
    """A few numbers of one query: how many scores are positive, where its known source ranks."""
    bins = np.asarray(query["score_bins"])
    half = len(bins) // 2
    total, positive = int(bins.sum()), int(bins[half + 1:].sum())
    lines = [f"positive scores: {positive} of {total} ({100 * positive / max(total, 1):.0f} %)"]
    source = query.get("source_id")
    if source is not None:
        rank = next((r["rank"] for r in top if r["train_id"] == source), None)
        low = next((r["rank"] for r in bottom if r["train_id"] == source), None)
        where = (f"rank {rank}" if rank is not None else f"opponent rank {low}" if low is not None
                 else f"not in the top {len(top)}")
        lines.append(f"known source [{source}]: {where}")
    if top:
        lines.append(f"top proponent [{top[0]['train_id']}]: {format_score(top[0]['score'])}")
    if bottom:
        lines.append(f"strongest opponent [{bottom[0]['train_id']}]: {format_score(bottom[0]['score'])}")
    return '<div class="facts">' + "".join(f"<div>{escape(line, None)}</div>" for line in lines) + "</div>"


def _query_text(query: dict) -> str:
    """The query: its prompt in grey and the rest bold."""
    full, prompt = query.get("query_text") or "", query.get("query_prompt")
    head = f'<span class="prompt">{escape(prompt)}</span>' if prompt else ""
    rest = full[len(prompt):] if prompt and full.startswith(prompt) else full
    return head + f'<span class="target">{escape(rest)}</span>'


def tokens_html(tokens: list[dict]) -> str:
    """Target tokens as chips coloured by attribution: each token's score against its query's top proponent
    (its part of that proponent's score) where the token scores were kept, else its own best score."""
    shown = tokens[:MAX_TOKENS]
    key = "score_on_top_proponent" if all(t.get("score_on_top_proponent") is not None for t in shown) else "best_score"
    scale = max([abs(t[key]) for t in shown] + [1e-30])
    what = "score on the query's top proponent" if key == "score_on_top_proponent" else "best score"
    chips = []
    for t in shown:
        value = t[key]
        alpha = min(1.0, abs(value) / scale)
        rgb = "22,163,74" if value >= 0 else "220,38,38"
        colour = f"rgba({rgb},{0.12 + 0.6 * alpha:.2f})"
        title = f"position {t['position']}: {what} {format_score(value)}; best proponent [{t['best_train_id']}]"
        chips.append(f'<span class="tok" style="background:{colour}" title="{escape(title, None)}">'
                     f'{escape(t["token"], 40)}</span>')
    more = f' <span class="hint">(+{len(tokens) - MAX_TOKENS} tokens)</span>' if len(tokens) > MAX_TOKENS else ""
    legend = f' <span class="hint">colour: {escape(what, None)}</span>'
    return "".join(chips) + more + legend


def _rows_table(title: str, kind: str, rows: list[dict], source: str | None, scale: float) -> str:
    body = []
    for r in rows:
        mark = ' class="source"' if source is not None and r["train_id"] == source else ""
        star = '<span class="star" title="the known source">★</span> ' if mark else ""
        width = 100 * min(1.0, abs(r["score"]) / scale)
        text = r.get("train_text")
        body.append(f'<tr{mark}><td class="rank">{r["rank"]}</td><td class="score">{format_score(r["score"])}'
                    f'<div class="bar {kind}" style="width:{width:.0f}%"></div></td>'
                    f'<td class="text"{_full_text(text)}>{star}{escape(text)}'
                    f' <span class="tid">[{escape(r["train_id"], 60)}]</span></td></tr>')
    if not body:
        body.append('<tr><td colspan="3" class="hint">none</td></tr>')
    return (f'<div class="side"><h3 class="{kind}">{title}</h3><table><thead><tr><th>#</th><th>score</th>'
            f'<th>training example</th></tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _full_text(text) -> str:
    """A title attribute with the whole text (up to 1,000 characters) where the cell shows it cut."""
    return f' title="{escape(text, 1000)}"' if text is not None and len(text) > MAX_TEXT else ""


def linear_histogram(counts, low: float, high: float, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """The signed log bins' ``counts`` spread over ``bins`` equal bins of [low, high] (each log bin's count by
    the overlap of its interval, clipped to [low, high], with each linear bin)."""
    counts = np.asarray(counts, dtype=np.float64)
    out = np.zeros(bins)
    if high <= low:
        out[bins // 2] = counts.sum()
        return out
    width = (high - low) / bins
    edges = score_bin_edges()
    for b in np.nonzero(counts)[0]:
        a, z = max(edges[b, 0], low), min(edges[b, 1], high)
        if z <= a:  # outside [low, high] by rounding: the nearest end
            out[0 if edges[b, 1] <= low else bins - 1] += counts[b]
            continue
        first, last = int((a - low) // width), min(bins - 1, int((z - low) // width))
        for i in range(first, last + 1):
            lo_i, hi_i = low + i * width, low + (i + 1) * width
            out[min(i, bins - 1)] += counts[b] * (min(z, hi_i) - max(a, lo_i)) / (z - a)
    return out


def histogram_svg(counts, low: float, high: float, marks: list[tuple[float, str, str]] = (), width: int = 420,
                  height: int = 92) -> str:
    """A small bar plot of a query's score distribution between its bottom-1 and top-1 scores; ``marks``:
    (score, colour, label) drawn as triangles under the axis (e.g. the known source)."""
    values = linear_histogram(counts, low, high)
    top = math.log1p(values.max()) or 1.0
    base = height - 30
    bar_w = width / len(values)
    span = (high - low) or 1.0
    bars = []
    for i, v in enumerate(values):
        if v <= 0:
            continue
        h = max(1.0, (base - 4) * math.log1p(v) / top)
        colour = "#16a34a" if low + (i + 0.5) * span / len(values) > 0 else "#dc2626"
        bars.append(f'<rect x="{i * bar_w:.1f}" y="{base - h:.1f}" width="{max(bar_w - 0.8, 0.6):.1f}" '
                    f'height="{h:.1f}" fill="{colour}" fill-opacity=".7"/>')
    zero = ""
    if low < 0 < high:
        x = width * (0 - low) / span
        zero = (f'<line x1="{x:.1f}" y1="2" x2="{x:.1f}" y2="{base}" stroke="#475569" stroke-dasharray="2,2"/>'
                f'<text x="{x:.1f}" y="{height - 2}" text-anchor="middle">0</text>')
    pins = []
    for value, colour, label in marks:
        x = min(width - 4, max(4, width * (value - low) / span))
        pins.append(f'<path d="M{x:.1f} {base + 2} l-4 7 h8 z" fill="{colour}"><title>{escape(label, 200)}</title>'
                    f'</path>')
    labels = (f'<text x="0" y="{height - 2}">{escape(format_score(low), None)}</text>'
              f'<text x="{width}" y="{height - 2}" text-anchor="end">{escape(format_score(high), None)}</text>')
    return (f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" stroke="#94a3b8"/>{"".join(bars)}{zero}'
            f'{"".join(pins)}{labels}</svg>')


def layers_svg(shares: list[tuple[str, float]], width: int = 360) -> str:
    """Horizontal bars of each layer's (signed) share, largest first (``MAX_LAYERS`` shown)."""
    shown = sorted(shares, key=lambda s: -abs(s[1]))[:MAX_LAYERS]
    row, label_w = 13, 150
    scale = max([abs(v) for _, v in shown] + [1e-30])
    mid = label_w + (width - label_w) / 2
    half = (width - label_w) / 2 - 34
    parts = []
    for i, (name, value) in enumerate(shown):
        y = i * row
        length = half * abs(value) / scale
        x = mid if value >= 0 else mid - length
        colour = "#16a34a" if value >= 0 else "#dc2626"
        parts.append(f'<text x="{label_w - 6}" y="{y + 10}" text-anchor="end">{escape(_short(name), 28)}</text>'
                     f'<rect x="{x:.1f}" y="{y + 2}" width="{max(length, 0.5):.1f}" height="{row - 4}" '
                     f'fill="{colour}" fill-opacity="0.75"><title>{escape(name, None)}: '
                     f'{escape(f"{100 * value:+.1f}", None)}%</title></rect>'
                     f'<text x="{mid + (half + 4 if value >= 0 else -half - 4):.1f}" y="{y + 10}" '
                     f'text-anchor="{"start" if value >= 0 else "end"}">{escape(f"{100 * value:+.0f}%", None)}</text>')
    height = row * len(shown) + 4
    more = len(shares) - len(shown)
    note = f'<div class="hint">{more} more layers in layer_scores.npy</div>' if more > 0 else ""
    return (f'<svg class="layers" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            f'<line x1="{mid}" y1="0" x2="{mid}" y2="{height}" stroke="#94a3b8"/>{"".join(parts)}</svg>{note}')


def _short(name: str) -> str:
    """A layer name without its model prefix (``transformer.h.0.attn.c_attn`` → ``h.0.attn.c_attn``)."""
    for prefix in ("transformer.", "model.layers.", "model.", "base_model.model."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _tokens_by_query(run: QueryRun, query_ids: set[str]) -> dict[str, list[dict]]:
    table = run.table("tokens")
    if table is None:
        return {}
    out = defaultdict(list)
    for row in table.to_pylist():
        if row["query_id"] in query_ids:
            out[row["query_id"]].append(row)
    return {q: sorted(rows, key=lambda r: r["position"]) for q, rows in out.items()}


def _layer_shares(run: QueryRun, queries: list[dict], top: dict) -> dict[str, list[tuple[str, float]]]:
    """{query id: [(layer, its part of the sum of the shown top proponents' scores)]}, from layer_scores.npy
    (its columns of those rows only)."""
    ids = run.sidecar("layer_scores_ids")
    if ids is None:
        return {}
    scores = run.array("layer_scores")  # (L, queries, N)
    row_of = {t: i for i, t in enumerate(ids["train_ids"])}
    query_row = {q: i for i, q in enumerate(ids["query_ids"])}
    out = {}
    for query in queries:
        rows = [row_of[r["train_id"]] for r in top.get(query["query_id"], [])[:MAX_ROWS] if r["train_id"] in row_of]
        if not rows or query["query_id"] not in query_row:
            continue
        parts = np.asarray(scores[:, query_row[query["query_id"]], :][:, rows], dtype=np.float64).sum(axis=1)
        total = parts.sum()
        scale = total if abs(total) > 1e-30 else np.abs(parts).sum() or 1.0
        out[query["query_id"]] = [(name, float(v / scale)) for name, v in zip(ids["layers"], parts)]
    return out


_STYLE = """
*{box-sizing:border-box}body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#0f172a;
background:#f1f5f9;margin:0;padding:20px 28px}header{margin-bottom:14px}h1{font-size:22px;margin:0 0 4px}
.settings,.meaning,.notes{margin:2px 0;color:#475569;font-size:13px}.summary{margin:6px 0;font-size:15px}
section.query{background:#fff;border:1px solid #e2e8f0;border-radius:8px;padding:12px 16px;margin:12px 0;
box-shadow:0 1px 2px rgba(0,0,0,.04)}h2{font-size:16px;font-weight:500;margin:0 0 8px}.qid{display:inline-block;
background:#e2e8f0;color:#334155;border-radius:4px;padding:0 6px;margin-right:8px;
font:12px/20px ui-monospace,monospace}.prompt{color:#64748b}.tokens{font-size:14px;margin:-4px 0 8px;color:#64748b}
.target{font-weight:650}.tok{display:inline-block;border-radius:3px;padding:0 3px;margin:0 1px;color:#0f172a;
font-weight:600}.plots{display:flex;gap:24px;align-items:flex-start;margin-bottom:6px}.plot{flex:none;width:430px}
.plot.layers{width:380px}.caption,.hint{font-size:11px;color:#64748b}.hint{font-style:italic}svg text{
font:10px system-ui,sans-serif;fill:#475569}.sides{display:flex;gap:18px}.side{flex:1;min-width:0}h3{font-size:13px;
margin:4px 0;text-transform:uppercase;letter-spacing:.04em}h3.pro{color:#15803d}h3.con{color:#b91c1c}table{
border-collapse:collapse;width:100%;table-layout:fixed}th{font-size:11px;color:#64748b;text-align:left;
font-weight:500;border-bottom:1px solid #e2e8f0}td{padding:2px 4px;border-bottom:1px solid #f1f5f9;
vertical-align:top}td.rank{width:26px;color:#64748b}th:first-child{width:26px}th:nth-child(2),td.score{width:74px}
td.score{font:12px ui-monospace,monospace;position:relative}.bar{height:3px;border-radius:2px;margin-top:1px}
.bar.pro{background:#16a34a}.bar.con{background:#dc2626}td.text{overflow-wrap:anywhere}.tid{color:#94a3b8;
font-size:11px}tr.source td{background:#fef9c3}.facts{flex:none;width:300px;font-size:12px;color:#334155;
line-height:1.6;padding-top:14px}.star{color:#ca8a04}footer{color:#94a3b8;font-size:11px;margin-top:16px}
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<style>{style}</style></head>
<body>
{header}
{sections}
{footer}
</body></html>
"""
