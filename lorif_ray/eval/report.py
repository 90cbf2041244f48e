"""The Markdown quality report: results table, LDS-vs-storage Pareto plot, top proponents side by side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lorif_ray.data import load_examples
from lorif_ray.eval.sweep import read_results

MARKERS = {"lorif": ("o", "tab:red"), "logra": ("s", "tab:blue"), "graddot": ("^", "tab:green"),
           "repsim": ("v", "tab:purple"), "kronfluence": ("D", "tab:orange")}


def _is_peer(row: dict) -> bool:
    """An external peer's row (Kronfluence): no per-example storage, its own factors."""
    return row["method"].startswith("kronfluence")


def _label(row: dict) -> str:
    if not _is_peer(row):
        return row["method"]
    damping = row.get("damping")
    return f"{row['method']} (λ {'0.1×mean Λ' if damping is None else format(damping, 'g')})"


def _storage(row: dict) -> str:
    if _is_peer(row):
        factors = row.get("factor_bytes")
        return "none" + ("" if factors is None else f" (factors {factors / 2**20:.2f} MiB in all)")
    storage = row.get("bytes_per_example")
    return "–" if storage is None else f"{storage / 1024:.2f} KiB"


def _fmt(value, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def results_table(rows: list[dict]) -> str:
    head = ("| method | f | c | r | LDS ± s.e. | tail-patch Δlog p ± s.e. | storage/example | stage 1 s | "
            "stage 2 s | query s |\n|---|---|---|---|---|---|---|---|---|---|")
    order = {"lorif": 0, "logra": 1, "graddot": 2, "repsim": 3, "kronfluence": 4}
    rows = sorted(rows, key=lambda r: (order.get(r["method"].split("-")[0], 9), r["method"], r.get("f") or 0,
                                       r.get("c") or 0, r.get("r") or 0, -(r.get("damping") or float("inf"))))
    lines = [head]
    for r in rows:
        source = r.get("index_source")
        derived = (r.get("index_made_by") or source) == "dense"
        stage1 = _fmt(r.get("index_seconds"), ".2f") + (" (from dense)" if derived else "")
        lines.append(
            f"| {_label(r)} | {_fmt(r.get('f'), 'd')} | {_fmt(r.get('c'), 'd')} | {_fmt(r.get('r'), 'd')} | "
            f"{_fmt(r['lds'])} ± {_fmt(r['lds_se'])} | {_fmt(r.get('tail_patch'))} ± {_fmt(r.get('tail_patch_se'))} | "
            f"{_storage(r)} | {stage1} | "
            f"{_fmt(r.get('curvature_seconds'), '.2f')} | {_fmt(r.get('query_seconds'), '.2f')} |")
    return "\n".join(lines)


def paired_differences(rows: list[dict], metric: str = "lds") -> str:
    """LDS difference of every other point to each LoGRA point, paired over queries (mean ± s.e.).

    Both scores face the same ground truth on the same queries, so the paired s.e. of the difference
    is much smaller than either point's own s.e.
    """
    from lorif_ray.eval.stats import MeanSE

    def per_query(r):
        if metric == "lds":
            path = Path(r["run_dir"]) / "lds.json"
        else:
            path = Path(r.get("tail_patch_path") or "/nonexistent")
        return np.array(json.loads(path.read_text())["per_query"]) if path.exists() else None

    refs = sorted((r for r in rows if r["method"] == "logra"), key=lambda r: r["f"])
    others = [r for r in rows if r["method"] in ("lorif", "graddot", "repsim") or _is_peer(r)]
    if not refs or not others:
        return "(needs LoGRA and other points)"
    lines = ["| point | storage/example | " + " | ".join(f"Δ vs LoGRA f={r['f']} ({r['bytes_per_example'] / 1024:.0f} KiB)"
                                                          for r in refs) + " |",
             "|---|---|" + "---|" * len(refs)]
    for r in sorted(others, key=lambda r: (_is_peer(r), r["method"], r.get("f") or 0, r.get("c") or 0, r.get("r") or 0,
                                           -(r.get("damping") or float("inf")))):
        mine = per_query(r)
        name = _label(r) + (f" f={r['f']}" if r.get("f") else "") + (f" c={r['c']} r={r['r']}" if r["method"] == "lorif" else "")
        cells = []
        for ref in refs:
            theirs = per_query(ref)
            cells.append("–" if mine is None or theirs is None else str(MeanSE.of(mine - theirs)))
        lines.append(f"| {name} | {_storage(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    """LDS (± s.e.) against stored bytes per example (log scale), like the paper's Figure 4.

    LoRIF: one line per factor rank c through its f values at the largest r swept (other r values as
    small faded markers); LoGRA: one line through its f values; GradDot and RepSim as points.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.6, 4.8))
    kib = lambda r: r["bytes_per_example"] / 1024  # noqa: E731
    lorif = [r for r in rows if r["method"] == "lorif"]
    shades = plt.get_cmap("Reds")
    ranks = sorted({r["c"] for r in lorif})
    for i, c in enumerate(ranks):
        group = [r for r in lorif if r["c"] == c]
        top_r = max(r["r"] for r in group)
        best = {}
        for r in group:
            if r["r"] == top_r:
                best[r["f"]] = r
            else:
                ax.plot(kib(r), r["lds"], "o", color=shades(0.35 + 0.6 * i / max(len(ranks) - 1, 1)), alpha=0.35,
                        markersize=4)
        pts = sorted(best.values(), key=kib)
        ax.errorbar([kib(r) for r in pts], [r["lds"] for r in pts], yerr=[r["lds_se"] or 0 for r in pts], fmt="o-",
                    color=shades(0.35 + 0.6 * i / max(len(ranks) - 1, 1)), capsize=3, label=f"LoRIF c={c} (r={top_r})")
        for r in pts:
            ax.annotate(f"f{r['f']}", (kib(r), r["lds"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for method, (marker, colour) in MARKERS.items():
        if method == "lorif":
            continue
        pts = sorted((r for r in rows if r["method"] == method and r.get("bytes_per_example")), key=kib)
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
        candidates = [r for r in rows if r["method"] == method]
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
        "## LDS differences, paired over queries", "",
        "Mean over queries of LDS(point) − LDS(LoGRA) ± the s.e. of that paired difference.", "",
        paired_differences(rows, "lds"), "",
        "Tail-patch, the same way: mean over queries of Δlog p(point) − Δlog p(LoGRA) ± paired s.e.", "",
        paired_differences(rows, "tail_patch"), "",
        "## Top proponents, LoRIF vs LoGRA (best LDS of each)", "",
        proponents_side_by_side(rows, Path(gt["directory"])),
    ]
    text = "\n".join(md) + "\n"
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(text)
    return text
