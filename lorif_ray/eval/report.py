"""The Markdown quality report: results table, LDS-vs-storage Pareto plot, top proponents side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorif_ray.config import METHOD_PARTS
from lorif_ray.data import load_examples
from lorif_ray.eval.stats import MeanSE
from lorif_ray.eval.sweep import damping_scale, read_results
from lorif_ray.math.curvature import Curvature

MARKERS = {"lorif": ("o", "tab:red"), "logra": ("s", "tab:blue"), "graddot": ("^", "tab:green"),
           "repsim": ("v", "tab:purple"), "kronfluence": ("D", "tab:orange")}


def _is_peer(row: dict) -> bool:
    """An external peer's row (Kronfluence): no per-example storage, its own factors."""
    return row["method"].startswith("kronfluence")


def _is_preset(row: dict) -> bool:
    """Scored with its method's own curvature (LoRIF: Woodbury, LoGRA: exact, ...)."""
    return _is_peer(row) or row.get("curvature") in (None, METHOD_PARTS[row["method"]][1])


def _at_default_damping(row: dict) -> bool:
    """λ from the curvature's current default scale (``default_damping_scale``), not set by hand."""
    if _is_peer(row):
        return True
    return row.get("damping") is None and row.get("damping_scale") == damping_scale(row.get("curvature"), None, None)


def _label(row: dict) -> str:
    if not _is_peer(row):
        name = row["method"] + ("" if _is_preset(row) else f"+{row['curvature']}")
        if row.get("kfac_labels") == "sampled":  # K-FAC statistics of labels sampled from the model (true Fisher)
            name += " (sampled labels)"
        if not _at_default_damping(row):
            name += f" (λ {row['damping']:g})" if row.get("damping") is not None else f" ({row['damping_scale']:g}×mean Λ)"
        return name
    damping = row.get("damping")
    return f"{row['method']} (λ {'0.1×mean Λ' if damping is None else format(damping, 'g')})"


def _point(row: dict) -> str:
    """The label with the point's f, c and r."""
    return (_label(row) + (f" f={row['f']}" if row.get("f") else "") + (f" c={row['c']}" if row.get("c") else "")
            + (f" r={row['r']}" if row.get("r") else ""))


def per_query(row: dict, metric: str = "lds") -> np.ndarray | None:
    """A point's per-query LDS or tail-patch gain (None where its run directory is gone)."""
    path = Path(row["run_dir"]) / "lds.json" if metric == "lds" else Path(row.get("tail_patch_path") or "/nonexistent")
    return np.array(json.loads(path.read_text())["per_query"]) if path.exists() else None


def paired(row: dict, ref: dict | None, metric: str = "lds") -> str:
    """Mean over queries of metric(row) − metric(ref) ± the s.e. of that paired difference."""
    mine, theirs = per_query(row, metric), None if ref is None else per_query(ref, metric)
    return "–" if mine is None or theirs is None else str(MeanSE.of(mine - theirs))


def _storage(row: dict) -> str:
    if _is_peer(row):
        factors = row.get("factor_bytes")
        return "none" + ("" if factors is None else f" (factors {factors / 2**20:.2f} MiB in all)")
    storage = row.get("bytes_per_example")
    return "–" if storage is None else f"{storage / 1024:.2f} KiB"


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def _order(row: dict) -> tuple:
    methods = {"lorif": 0, "logra": 1, "graddot": 2, "repsim": 3, "kronfluence": 4}
    statistics = _from_statistics()  # after a method's own curvature, in their declaration order
    curvature = statistics.index(row["curvature"]) + 1 if row.get("curvature") in statistics else 0
    return (methods.get(row["method"].split("-")[0], 9), row["method"], curvature,
            row.get("f") or 0, row.get("c") or 0, row.get("r") or 0, -(row.get("damping") or float("inf")),
            -(row.get("damping_scale") or float("inf")), row.get("kfac_labels") or "")


def _from_statistics() -> list[str]:
    """The curvature kinds made from stage 1's K-FAC statistics (``Curvature.needs_stats``): K-FAC, EK-FAC."""
    return [kind for kind, cls in Curvature.registered().items() if cls.needs_stats]


def results_table(rows: list[dict]) -> str:
    head = ("| method | curvature | f | c | r | LDS ± s.e. | tail-patch Δlog p ± s.e. | storage/example | stage 1 s | "
            "stage 2 s | query s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in sorted(rows, key=_order):
        source = r.get("index_source")
        derived = (r.get("index_made_by") or source) == "dense"
        stage1 = _fmt(r.get("index_seconds"), ".2f") + (" (from dense)" if derived else "")
        lines.append(
            f"| {_label(r)} | {r.get('curvature') or '–'} | {_fmt(r.get('f'), 'd')} | {_fmt(r.get('c'), 'd')} | {_fmt(r.get('r'), 'd')} | "
            f"{_fmt(r['lds'])} ± {_fmt(r['lds_se'])} | {_fmt(r.get('tail_patch'))} ± {_fmt(r.get('tail_patch_se'))} | "
            f"{_storage(r)} | {stage1} | "
            f"{_fmt(r.get('curvature_seconds'), '.2f')} | {_fmt(r.get('query_seconds'), '.2f')} |")
    return "\n".join(lines)


def paired_differences(rows: list[dict], metric: str = "lds") -> str:
    """Difference of every other point to each LoGRA point (exact curvature, default damping), paired over
    queries (mean ± s.e.).

    Both scores face the same ground truth on the same queries, so the paired s.e. of the difference
    is much smaller than either point's own s.e.
    """
    refs = sorted((r for r in rows if r["method"] == "logra" and _is_preset(r) and _at_default_damping(r)),
                  key=lambda r: r["f"])
    others = [r for r in rows if r not in refs and _at_default_damping(r)]
    if not refs or not others:
        return "(needs LoGRA and other points)"
    lines = ["| point | storage/example | " + " | ".join(f"Δ vs LoGRA f={r['f']} ({r['bytes_per_example'] / 1024:.0f} KiB)"
                                                          for r in refs) + " |",
             "|---|---|" + "---|" * len(refs)]
    for r in sorted(others, key=lambda r: (_is_peer(r), _order(r))):
        lines.append(f"| {_point(r)} | {_storage(r)} | " + " | ".join(paired(r, ref, metric) for ref in refs) + " |")
    return "\n".join(lines)


def _preset_of(row: dict, rows: list[dict]) -> dict | None:
    """The point with the same stored rows (method, f, c) at its method's own curvature and default damping
    (LoRIF: the largest r there is, among the runs whose per-query values are still on disk)."""
    same = [r for r in rows if not _is_peer(r) and _is_preset(r) and _at_default_damping(r)
            and (r["method"], r.get("f"), r.get("c")) == (row["method"], row.get("f"), row.get("c"))]
    return max(same, key=lambda r: (per_query(r) is not None, r.get("r") or 0)) if same else None


def curvature_differences(rows: list[dict], metric: str = "lds") -> str:
    """Each LoRIF/LoGRA point with another curvature than its method's, at its default damping, against (a) the
    same stored rows with the method's own curvature (listed too) and (b) each Kronfluence EK-FAC row: paired
    over queries (mean ± s.e.)."""
    points = [r for r in rows if r["method"] in ("lorif", "logra") and _at_default_damping(r)]
    others = [r for r in points if not _is_preset(r)]
    own = [_preset_of(r, rows) for r in others]
    points = others + [r for r in points if any(r is o for o in own)]  # the stores that have another curvature
    peers = sorted((r for r in rows if _is_peer(r) and r["method"].startswith("kronfluence-ekfac")),
                   key=lambda r: (r["method"], -(r.get("damping") or 1.0)))
    if not any(not _is_preset(r) for r in points):
        return "(no point with another curvature than its method's)"
    value = "LDS" if metric == "lds" else "Δlog p"
    lines = [f"| point | storage/example | {value} ± s.e. | Δ vs same rows, own curvature | "
             + " | ".join(f"Δ vs {_label(p)} ({_fmt(p[metric])})" for p in peers) + " |",
             "|---|---|---|---|" + "---|" * len(peers)]
    for r in sorted(points, key=lambda r: (r["method"] != "lorif", r.get("f") or 0, r.get("c") or 0, _order(r))):
        ref = None if _is_preset(r) else _preset_of(r, rows)
        own = "(itself)" if _is_preset(r) else paired(r, ref, metric) + ("" if ref is None else f" (vs r={ref['r']})"
                                                                          if ref.get("r") else "")
        lines.append(f"| {_point(r)} | {_storage(r)} | {_fmt(r[metric])} ± {_fmt(r[metric + '_se'])} | {own} | "
                     + " | ".join(paired(r, p, metric) for p in peers) + " |")
    return "\n".join(lines)


def damping_study(rows: list[dict]) -> str:
    """LDS and tail-patch per damping scale of each (method, curvature, f, c, r) swept over ``damping_scale``,
    with the paired LDS difference to that group's best scale."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not _is_peer(r) and r.get("damping") is None and r.get("damping_scale") is not None:
            groups.setdefault((r["method"], r.get("curvature"), r.get("f"), r.get("c"), r.get("r"), r.get("kfac_labels")),
                              []).append(r)
    groups = {k: sorted(v, key=lambda r: -r["damping_scale"]) for k, v in groups.items() if len(v) > 1}
    if not groups:
        return "(no point swept over damping_scale)"
    lines = ["| point | λ / mean Λ | LDS ± s.e. | Δ LDS vs the group's best | tail-patch ± s.e. |",
             "|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: _order(groups[k][0])):
        best = max(groups[key], key=lambda r: r["lds"])
        for r in groups[key]:
            name = (r["method"] + ("" if _is_preset(r) else f"+{r['curvature']}") + f" f={r['f']}"
                    + (f" c={r['c']}" if r.get("c") else "") + (f" r={r['r']}" if r.get("r") else ""))
            lines.append(f"| {name} | {r['damping_scale']:g} | {_fmt(r['lds'])} ± {_fmt(r['lds_se'])} | "
                         f"{'(best)' if r is best else paired(r, best)} | "
                         f"{_fmt(r.get('tail_patch'))} ± {_fmt(r.get('tail_patch_se'))} |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    """LDS (± s.e.) against stored bytes per example (log scale), like the paper's Figure 4.

    LoRIF: one line per factor rank c through its f values at the largest r swept (other r values as
    small faded markers); LoGRA: one line through its f values; GradDot and RepSim as points; points with a
    K-FAC or EK-FAC curvature as dotted / dashed lines of their own. Points at a hand-set damping are left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.6, 4.8))
    kib = lambda r: r["bytes_per_example"] / 1024  # noqa: E731
    rows = [r for r in rows if _at_default_damping(r)]
    lorif = [r for r in rows if r["method"] == "lorif"]
    shades = plt.get_cmap("Reds")
    ranks = sorted({r["c"] for r in lorif})
    shade = lambda c: shades(0.35 + 0.6 * ranks.index(c) / max(len(ranks) - 1, 1))  # noqa: E731
    # other curvatures than the method's: those made from K-FAC statistics, a line style and marker each
    styles = {kind: (line, marker, Curvature.of(kind).title)
              for kind, (line, marker) in zip(_from_statistics(), ((":", "x"), ("--", "P"), ("-.", "*")))}
    for c in ranks:
        group = [r for r in lorif if r["c"] == c and _is_preset(r)]
        if not group:
            continue
        top_r = max(r["r"] for r in group)
        best = {}
        for r in group:
            if r["r"] == top_r:
                best[r["f"]] = r
            else:
                ax.plot(kib(r), r["lds"], "o", color=shade(c), alpha=0.35, markersize=4)
        pts = sorted(best.values(), key=kib)
        ax.errorbar([kib(r) for r in pts], [r["lds"] for r in pts], yerr=[r["lds_se"] or 0 for r in pts], fmt="o-",
                    color=shade(c), capsize=3, label=f"LoRIF c={c} (r={top_r})")
        for r in pts:
            ax.annotate(f"f{r['f']}", (kib(r), r["lds"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for method, name in (("lorif", "LoRIF"), ("logra", "LoGRA")):
        for kind, (line, marker, curve) in styles.items():
            for c in (ranks if method == "lorif" else [None]):
                pts = sorted((r for r in rows if r["method"] == method and r.get("curvature") == kind
                              and r.get("c") == c), key=kib)
                if not pts:
                    continue
                colour = shade(c) if method == "lorif" else MARKERS["logra"][1]
                ax.errorbar([kib(r) for r in pts], [r["lds"] for r in pts], yerr=[r["lds_se"] or 0 for r in pts],
                            fmt=marker + line, color=colour, capsize=3,
                            label=f"{name} + {curve}" + (f" c={c}" if c else ""))
    for method, (marker, colour) in MARKERS.items():
        if method == "lorif":
            continue
        pts = sorted((r for r in rows if r["method"] == method and _is_preset(r) and r.get("bytes_per_example")),
                     key=kib)
        if not pts:
            continue
        ax.errorbar([kib(r) for r in pts], [r["lds"] for r in pts], yerr=[r["lds_se"] or 0 for r in pts],
                    fmt=marker + ("-" if method == "logra" else ""), color=colour, capsize=3, label=method)
        for r in pts:
            if r.get("f"):
                ax.annotate(f"f{r['f']}", (kib(r), r["lds"]), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=colour)
    peers = sorted((r for r in rows if _is_peer(r)), key=lambda r: -r["lds"])
    for i, r in enumerate(peers):  # no per-example storage: a level across the plot, its s.e. as a band
        style = ("--", ":", "-.")[i % 3]
        factors = r.get("factor_bytes")
        ax.axhline(r["lds"], color=MARKERS["kronfluence"][1], linestyle=style, linewidth=1.2,
                   label=f"{_label(r)}: no per-example storage"
                         + ("" if factors is None else f", factors {factors / 2**20:.1f} MiB"))
        ax.axhspan(r["lds"] - (r["lds_se"] or 0), r["lds"] + (r["lds_se"] or 0), color=MARKERS["kronfluence"][1],
                   alpha=0.08)
    ax.set_xscale("log")
    ax.set_xlabel("storage per training example (KiB, log scale)")
    ax.set_ylabel("LDS (mean over queries ± s.e.)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def proponents_side_by_side(rows: list[dict], setup_dir: Path, num_queries: int = 3, k: int = 3) -> str:
    """The top-k proponents of a few queries for the best-LDS LoRIF and LoGRA points."""
    best = {}
    for method in ("lorif", "logra"):
        candidates = [r for r in rows if r["method"] == method and _is_preset(r)]
        if candidates:
            best[method] = max(candidates, key=lambda r: r["lds"])
    if len(best) < 2:
        return "(needs a LoRIF and a LoGRA point)"
    text = {e.id: e.text for e in load_examples(setup_dir / "train.jsonl")}
    queries = load_examples(setup_dir / "queries.jsonl")
    tops = {}
    for method, r in best.items():
        meta = json.loads((Path(r["run_dir"]) / "scores.json").read_text())
        scores = np.load(Path(r["run_dir"]) / "scores.npy")
        qrow = {q: i for i, q in enumerate(meta["query_ids"])}
        tops[method] = (meta["train_ids"], scores, qrow)
    label = {m: f"{m} f={r['f']}" + (f" c={r['c']} r={r['r']}" if m == "lorif" else "") for m, r in best.items()}
    lines = []
    for q in queries[:num_queries]:
        shown = repr(q.text) if q.prompt is None else f"{q.prompt!r} → {q.text[len(q.prompt):]!r}"
        lines += [f"**{q.id}**: {shown}", "", f"| rank | {label['lorif']} | {label['logra']} |", "|---|---|---|"]
        cols = []
        for method in ("lorif", "logra"):
            ids, scores, qrow = tops[method]
            row = scores[qrow[q.id]]
            order = np.argsort(-row, kind="stable")[:k]
            cols.append([f"{row[i]:+.3g} {text[ids[i]]}".replace("|", "\\|") for i in order])
        lines += [f"| {i + 1} | {a} | {b} |" for i, (a, b) in enumerate(zip(*cols))] + [""]
    return "\n".join(lines)


def write_report(results_dir: str | Path, markdown_path: str | Path, plot_path: str | Path) -> str:
    """Write the report (and the plot) from a sweep's results dir; returns the Markdown."""
    results_dir, markdown_path, plot_path = Path(results_dir), Path(markdown_path), Path(plot_path)
    rows = read_results(results_dir)
    if not rows:
        raise FileNotFoundError(f"no results in {results_dir}; run jobs/sweep.py first")
    gt = json.loads((results_dir / "ground_truth.json").read_text())
    recipe, ceiling = gt["recipe"], gt["noise_ceiling"]
    pareto_plot(rows, plot_path, f"LDS vs storage: {gt['setup']}, N={gt['num_train']}, M={gt['num_subsets']}")
    try:
        rel = plot_path.resolve().relative_to(markdown_path.parent.resolve())
    except ValueError:
        rel = plot_path
    md = [
        f"# Attribution quality: {gt['setup']} setup", "",
        f"Model: GPT-2, {recipe['n_layer']} layers, n_embd {recipe['n_embd']} ({gt['num_parameters']:,} parameters); "
        f"N = {gt['num_train']} training examples, {gt['num_queries']} queries. Recipe: full-batch AdamW, "
        f"{recipe['steps']} steps, lr {recipe['lr']:g} (warm-up {recipe['warmup_steps']}, linear decay), same init per "
        f"seed index. Attributed model: seed {gt['seeds'][0]} on the full set ({gt['attributed_model_train_seconds']:.1f} s).",
        "",
        f"LDS ground truth: M = {gt['num_subsets']} subsets (α = {gt['alpha']}), seeds {gt['seeds']} averaged; "
        f"retraining took {gt['retrain_seconds_total']:.0f} s of wall time in all on a shared 2-core CPU "
        f"({gt.get('threads', '?')} threads; median {gt.get('retrain_seconds_median', float('nan')):.1f} s per retrain).",
        "Noise ceiling: Spearman of subset losses between two seeds = "
        + (f"{ceiling['two_seeds']:.3f} ± {ceiling['two_seeds_se']:.3f}; estimated for the "
           f"{ceiling['seeds']}-seed average: {ceiling['averaged']:.3f}." if ceiling["two_seeds"] is not None else "n/a (one seed)."),
        "",
        "LDS: Spearman over subsets between Σ_{t∈S} I(t,q) and −loss_S(q), mean over queries ± s.e. "
        "Tail-patch: one SGD step on the top-k proponents (one batch), increase of the query's target log-probability "
        "(nats), mean ± s.e. Storage: payload bytes per example (c(d1+d2) or d1·d2 floats per layer × 4 B). "
        "Query s: query gradients + scoring all N."
        + (" Kronfluence (external peer, jobs/peer_kronfluence.py): EK-FAC influence on the full (unprojected) "
           "gradients of the same block layers, same loss convention and ground truth; it stores nothing per "
           "training example (its factors, size given, are fitted once), stage 2 s = fitting the factors, query s = "
           "query gradients + recomputing all N training gradients; λ = its damping (0.1×mean Λ: its heuristic, "
           "per module; a number: fixed)." if any(_is_peer(r) for r in rows) else ""),
        "", results_table(rows), "", f"![LDS vs storage]({rel})", "",
        "## Kronecker curvatures (K-FAC, EK-FAC) against the method's own and against Kronfluence", "",
        "Each point at its curvature's default damping; Δ = mean over queries of the paired difference ± its s.e., "
        "against the same stored rows with the method's own curvature (LoRIF: Woodbury at the largest r run; LoGRA: "
        "exact) and against Kronfluence's EK-FAC.", "",
        "LDS:", "", curvature_differences(rows, "lds"), "",
        "Tail-patch (Δlog p, nats):", "", curvature_differences(rows, "tail_patch"), "",
        "## LDS differences, paired over queries", "",
        "Mean over queries of LDS(point) − LDS(LoGRA) ± the s.e. of that paired difference.", "",
        paired_differences(rows, "lds"), "",
        "Tail-patch, the same way: mean over queries of Δlog p(point) − Δlog p(LoGRA) ± paired s.e.", "",
        paired_differences(rows, "tail_patch"), "",
        *(["## Damping study", "", "λ = scale × mean Λ per layer (Λ: the curvature's eigenvalues); Δ paired over "
           "queries against the best scale of the same point.", "", damping_study(rows), ""]
          if any(r.get("damping_scale") is not None and not _at_default_damping(r) for r in rows) else []),
        "## Top proponents, LoRIF vs LoGRA (best LDS of each)", "",
        proponents_side_by_side(rows, Path(gt["directory"])),
    ]
    text = "\n".join(md) + "\n"
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(text)
    return text
