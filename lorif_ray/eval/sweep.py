"""One sweep point: index (content-addressed, shared) → curvature → full scores → LDS, tail-patch → a row.

Every artifact lives under ``eval.cache_root`` named by what determines it, so a point that an
earlier point (or an earlier sweep) already made is loaded, not recomputed:

- ``index/<kind>-f<f>[-c<c>]-<hash>``: stage-1 rows (``lorif_ray.eval.index_cache``); points that
  differ only in r share one, and LoRIF points derive their factors from the dense index of the same
  f when it fits ``eval.cache_budget_mb``.
- ``runs/<method>-f<f>-c<c>-r<r>-<hash>``: curvature, ``scores.npy``, ``query.json`` (latency),
  ``tailpatch-k<k>-lr<lr>.json``.
- ``setups/<digest>/retrain/…``: the LDS ground truth (``lorif_ray.eval.groundtruth``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from lorif_ray.config import METHOD_PARTS, ClusterConfig, Config
from lorif_ray.eval.config import EvalConfig, SweepConfig, stage_config
from lorif_ray.eval.groundtruth import GroundTruth, Setup, ensure_setup, ground_truth, tokenized
from lorif_ray.eval.stats import MeanSE, lds_per_query, noise_ceiling
from lorif_ray.eval.tailpatch import tail_patch
from lorif_ray.math.curvature import Curvature
from lorif_ray.model.loading import load_model
from lorif_ray.stages.curvature import run_curvature
from lorif_ray.eval.index_cache import IndexCache
from lorif_ray.stages.query import run_query
from lorif_ray.store import atomic_path, write_json

RUNS: Counter = Counter()  # stage-2/3 runs this process actually made: "curvature", "query", "tail_patch"
# what names a results row: a new row replaces the one with the same key. ``curvature``, ``damping_scale`` and
# ``kfac_labels`` came later; rows written before them read as the method's preset curvature, the default scale
# and the training labels (row_key)
KEY_COLUMNS = ("setup", "method", "curvature", "f", "c", "r", "damping", "damping_scale", "kfac_labels", "dtype",
               "seed")


def row_curvature(row: dict) -> str | None:
    """The curvature a results row was scored with: its column, else its method's preset (None for a peer)."""
    parts = METHOD_PARTS.get(row["method"])
    return row.get("curvature") or (parts[1] if parts else None)


def damping_scale(curvature: str | None, damping: float | None, scale: float | None) -> float | None:
    """The scale of λ = scale × mean eigenvalue a point used: ``scale``, else its curvature's current default;
    None where λ was given (``damping``) or there is no curvature (RepSim, a peer)."""
    default = getattr(Curvature.registered().get(curvature), "default_damping_scale", None)
    if damping is not None or default is None:
        return None
    return scale if scale is not None else default


def row_kfac_labels(curvature: str | None, labels: str | None) -> str | None:
    """The labels of the K-FAC statistics a point used whose curvature is made from them (K-FAC, EK-FAC:
    ``Curvature.needs_stats``; rows before the column: training); None for the other curvatures, whose scores do
    not use the statistics."""
    uses_stats = getattr(Curvature.registered().get(curvature), "needs_stats", False)
    return (labels or "training") if uses_stats else None


def row_key(row: dict) -> tuple:
    """A row's KEY_COLUMNS; a row from before the ``curvature`` and ``damping_scale`` columns gets its method's
    preset and that curvature's default scale (0.1 for all of them then)."""
    curvature = row_curvature(row)
    filled = {"curvature": curvature,
              "damping_scale": damping_scale(curvature, row.get("damping"), row.get("damping_scale")),
              "kfac_labels": row_kfac_labels(curvature, row.get("kfac_labels"))}
    return tuple(filled.get(k, row.get(k)) for k in KEY_COLUMNS)


def point_config(cfg: SweepConfig, setup: Setup) -> Config:
    """The stages' config of a sweep point, pointed at the setup's model and data (one process, no Ray)."""
    base = stage_config(cfg)
    ev = cfg.eval
    return replace(base,
                   model=replace(base.model, path=str(setup.model_dir)),
                   data=replace(base.data, train=str(setup.train_path), queries=str(setup.queries_path),
                                max_length=ev.max_length),
                   query=replace(base.query, full_scores=True),
                   cluster=ClusterConfig(backend="none"))


def run_dir(cfg: Config, index_dir: Path, root: Path) -> Path:
    """Where a point's curvature and scores go: named by its index and its curvature/query settings (the damping
    scale resolved, so that a changed default of a curvature makes new runs instead of reusing old ones)."""
    key = {"index": index_dir.name, "method": cfg.method.name, "curvature": cfg.curvature_kind, "r": cfg.r,
           "damping": cfg.damping, "damping_scale": damping_scale(cfg.curvature_kind, cfg.damping, cfg.damping_scale),
           "oversample": cfg.oversample, "svd_power_iters": cfg.svd_power_iters, "normalize": cfg.query.normalize}
    if cfg.kfac_labels != "training":  # (the index dir differs too); absent = training, so old runs are reused
        key["kfac_labels"] = cfg.kfac_labels
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    label = index_dir.name.rsplit("-", 1)[0]  # e.g. factors-f4-c1
    name = cfg.method.name if cfg.curvature_kind == cfg.method.curvature else f"{cfg.method.name}+{cfg.curvature_kind}"
    return root / "runs" / f"{name}-{label}-r{cfg.r}-{digest}"


def load_scores(directory: Path, gt: GroundTruth) -> np.ndarray:
    """(nq, N) scores of a run, reordered to the ground truth's query and training ids."""
    meta = json.loads((directory / "scores.json").read_text())
    scores = np.load(directory / "scores.npy").astype(np.float64)
    rows = {q: i for i, q in enumerate(meta["query_ids"])}
    cols = {t: i for i, t in enumerate(meta["train_ids"])}
    return scores[np.ix_([rows[q] for q in gt.query_ids], [cols[t] for t in gt.train_ids])]


def run_point(cfg: SweepConfig) -> dict:
    """Evaluate one (method, f, c, r) point; returns its results row (and appends it to the table)."""
    ev = cfg.eval
    torch.set_num_threads(ev.threads)
    root = Path(ev.cache_root)
    setup = ensure_setup(ev)
    gt = ground_truth(ev, setup, progress=cfg.progress)
    write_ground_truth_summary(ev, setup, gt)
    point = point_config(cfg, setup)
    cache = IndexCache(root / "index", budget_bytes=ev.cache_budget_mb * 2**20)
    index_dir, index_info = cache.ensure(point)
    point = replace(point, index_dir=str(index_dir), output_dir=str(run_dir(point, index_dir, root)))
    out = Path(point.output_dir)

    curvature = run_curvature(point)
    if not curvature["reused"]:
        RUNS["curvature"] += 1
        write_json(out / "curvature.json", curvature)
    curvature = json.loads((out / "curvature.json").read_text()) if (out / "curvature.json").exists() else curvature

    if not ((out / "scores.npy").exists() and (out / "query.json").exists()):
        start = time.perf_counter()
        query = run_query(point)
        query["wall_seconds"] = time.perf_counter() - start
        write_json(out / "query.json", query)
        RUNS["query"] += 1
    query = json.loads((out / "query.json").read_text())
    scores = load_scores(out, gt)
    lds_values = lds_per_query(scores, gt.subsets, gt.mean_losses)
    lds = MeanSE.of(lds_values)
    write_json(out / "lds.json", {"query_ids": gt.query_ids, "per_query": [float(v) for v in lds_values],
                                  "num_subsets": int(gt.subsets.shape[0]), "seeds": gt.seeds})

    tp_path = cached_tail_patch(ev, setup, scores, out)
    tp = json.loads(tp_path.read_text())

    method = point.method.name
    row = {
        "setup": f"{ev.setup}:{setup.digest[:12]}",
        "method": method,
        "curvature": point.curvature_kind,
        "f": point.f if method != "repsim" else None,
        "c": point.c if method == "lorif" else None,
        "r": point.r if Curvature.of(point.curvature_kind).truncates else None,  # r matters only where it truncates
        "damping": point.damping,
        "damping_scale": damping_scale(point.curvature_kind, point.damping, point.damping_scale),  # the one used
        "kfac_labels": row_kfac_labels(point.curvature_kind, point.kfac_labels),
        "dtype": point.dtype,
        "seed": point.seed,
        "lds": lds.mean, "lds_se": lds.se, "lds_queries": lds.n,
        "tail_patch": tp["mean"], "tail_patch_se": tp["se"],
        "bytes_per_example": index_info["payload_bytes_per_example"],
        "disk_bytes_per_example": index_info["bytes_per_example"],
        "index_source": index_info["source"],  # how this run got it: cache | model | dense
        "index_made_by": "dense" if index_info.get("derived_from") else "model",  # how it was first made
        "index_seconds": index_info.get("seconds"),
        "curvature_seconds": curvature.get("seconds", 0.0),
        "query_seconds": query["query_gradient_seconds"] + query["score_seconds"],
        "num_train": len(gt.train_ids), "num_queries": len(gt.query_ids),
        "num_subsets": int(gt.subsets.shape[0]), "num_seeds": len(gt.seeds),
        "index_dir": str(index_dir), "run_dir": str(out), "tail_patch_path": str(tp_path),
    }
    append_row(Path(ev.results_dir), row)
    return row


def cached_tail_patch(ev: EvalConfig, setup: Setup, scores: np.ndarray, out: Path) -> Path:
    """The tail-patch of (nq, N) scores (ground-truth order) into ``out``, unless already there; its path."""
    tp_path = out / f"tailpatch-k{ev.tail_patch_k}-lr{ev.tail_patch_lr:g}.json"
    if not tp_path.exists():
        model, tokenizer = load_model(setup.model_dir, device="cpu")
        train_set, queries = tokenized(setup, tokenizer, ev.max_length)
        start = time.perf_counter()
        tp, gains = tail_patch(model, tokenizer, train_set, queries, scores, ev.tail_patch_k, ev.tail_patch_lr)
        write_json(tp_path, {"mean": tp.mean, "se": tp.se, "per_query": gains.tolist(),
                             "seconds": time.perf_counter() - start})
        RUNS["tail_patch"] += 1
    return tp_path


def write_ground_truth_summary(ev: EvalConfig, setup: Setup, gt: GroundTruth) -> dict:
    info = setup.info()
    summary = {"setup": ev.setup, "digest": setup.digest, "directory": str(setup.directory), "recipe": info["recipe"],
               "num_train": len(gt.train_ids), "num_queries": len(gt.query_ids), "num_parameters": info["num_parameters"],
               "attributed_model_train_seconds": info["train_seconds"], "num_subsets": int(gt.subsets.shape[0]),
               "alpha": ev.alpha, "seeds": gt.seeds, "retrain_seconds_total": gt.seconds,
               "retrain_seconds_median": gt.median_seconds, "threads": ev.threads,
               "noise_ceiling": noise_ceiling(gt.losses)}
    write_json(Path(ev.results_dir) / "ground_truth.json", summary)
    return summary


def append_row(results_dir: Path, row: dict) -> None:
    """Insert or replace the row of this point in ``results.parquet`` and ``results.csv``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "results.parquet"
    rows = pq.read_table(path).to_pylist() if path.exists() else []
    key = row_key(row)
    rows = [r for r in rows if row_key(r) != key] + [row]
    names = list(dict.fromkeys(k for r in rows for k in r))  # union of columns, first-seen order
    table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows])
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    with atomic_path(results_dir / "results.csv") as tmp:
        pacsv.write_csv(table, tmp)


def read_results(results_dir: str | Path) -> list[dict]:
    """The rows of a results table, older rows with their key columns filled in (``row_key``)."""
    path = Path(results_dir) / "results.parquet"
    rows = pq.read_table(path).to_pylist() if path.exists() else []
    return [r | dict(zip(KEY_COLUMNS, row_key(r))) for r in rows]
