"""Content-addressed stage-1 indexes, and rank-c factor indexes derived from a dense one.

An index directory is named by a hash of everything that determines its rows and statistics (model
identity, data sha256, kind, f, c, seed, layers, max_length, dtypes, factor iterations, the labels of
the K-FAC statistics), under one cache root, so any run that needs the same rows finds them instead of
recomputing. A LoRIF index can be made from a
dense (LoGRA-kind) index of the same f and seed without running the model: the power iteration runs
on the stored G̃ (``factorize_dense``) from the same start block, which gives the model path's factors
up to float error, and its K-FAC statistics are the dense index's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import torch

from lorif_ray.config import Config, MethodConfig
from lorif_ray.data import row_table_path
from lorif_ray.math.factorize import default_iterations, effective_rank, factorize_dense, initial_block
from lorif_ray.model.loading import load_model, model_identity
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.stages.index import finish_index, run_index
from lorif_ray.stages.inputs import require, resolve_inputs
from lorif_ray.stages.kronecker_stats import TOTAL_NAME as STATS_NAME
from lorif_ray.store import ShardWriter, atomic_path, file_sha256, iter_batches, open_index
from lorif_ray.store.manifest import FORMAT_VERSION
from lorif_ray.store.schema import BYTES_PER_VALUE

RUNS: Counter = Counter()  # indexes this process actually built: "index" (model ran), "factors_from_dense"


def index_key(cfg: Config, identity: dict, data_sha256: str) -> dict:
    """Everything that determines the stored rows of ``cfg``'s index."""
    kind = cfg.method.store_kind
    key = {"model": identity, "data_sha256": data_sha256, "kind": kind, "seed": cfg.seed,
           "layers": cfg.model.layers, "max_length": cfg.data.max_length, "dtype": cfg.dtype,
           "model_dtype": cfg.model.dtype, "kronecker_stats": kind != "hidden",  # indexes before them: rebuilt
           "store_format": FORMAT_VERSION}  # an index of an older format is refused by name: built anew
    if kind != "hidden":
        key["f"] = cfg.f
    if kind == "factors":
        key.update(c=cfg.c, factor_iters=cfg.factor_iters or default_iterations(cfg.c))
    if kind != "hidden" and cfg.kfac_labels != "training":  # absent = training: the cached indexes stay valid
        key["kfac_labels"] = cfg.kfac_labels
    return key


def key_dir(root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    label = key["kind"] + (f"-f{key['f']}" if "f" in key else "") + (f"-c{key['c']}" if "c" in key else "")
    return Path(root) / f"{label}-{digest}"


def is_complete(directory: Path) -> bool:
    try:
        open_index(directory)
    except Exception:  # missing or incomplete: (re)build it
        return False
    return (directory / "_report.json").exists()


class IndexCache:
    """Finds or builds the index of a config under ``root``.

    Args:
        root: cache root; index dirs are ``<root>/<kind>-f<f>[-c<c>]-<hash>``.
        budget_bytes: a dense index of at most this size may be built (or reused, any size) to derive
            rank-c factor indexes from it; 0 disables the dense route.
    """

    def __init__(self, root: str | Path, budget_bytes: float = 0):
        self.root, self.budget_bytes = Path(root), budget_bytes
        self._identity: dict[str, dict] = {}

    def identity(self, cfg: Config) -> tuple[dict, str]:
        inputs = resolve_inputs(cfg)
        path = str(inputs.model_path)
        if path not in self._identity:
            model, _ = load_model(inputs.model_path, dtype=cfg.model.dtype, device="cpu")
            self._identity[path] = model_identity(model)
        return self._identity[path], file_sha256(require(inputs.train_path, "data.train"))

    def path(self, cfg: Config) -> Path:
        return key_dir(self.root, index_key(cfg, *self.identity(cfg)))

    def ensure(self, cfg: Config) -> tuple[Path, dict]:
        """The index dir of ``cfg`` and how it was obtained: {"source": "cache"|"model"|"dense", ...}."""
        directory = self.path(cfg)
        if is_complete(directory):
            return directory, {"source": "cache", **_report(directory)}
        if cfg.method.store_kind == "factors" and self.budget_bytes > 0:
            dense_cfg = self.dense_config(cfg)
            dense_dir = self.path(dense_cfg)
            if is_complete(dense_dir) or self.dense_bytes(dense_cfg) <= self.budget_bytes:
                dense_dir, dense_info = self.ensure(dense_cfg)
                report = factors_from_dense(cfg, dense_dir, directory)
                RUNS["factors_from_dense"] += 1
                return directory, {"source": "dense", "dense_dir": str(dense_dir), "dense_source": dense_info["source"],
                                   **report}
        report = run_index(replace(cfg, index_dir=str(directory)))
        RUNS["index"] += 1
        return directory, {"source": "model", **report}

    @staticmethod
    def dense_config(cfg: Config) -> Config:
        """The dense (LoGRA-kind, float32) index config of the same model, data, f and seed."""
        return replace(cfg, method=MethodConfig(name="logra"), dtype="float32", c=1, factor_iters=None)

    def dense_bytes(self, dense_cfg: Config) -> float:
        """Payload size of a dense index: N × Σ_layers d1·d2 × 4 bytes (from the layer shapes)."""
        from lorif_ray.model.layers import select_layers
        from lorif_ray.math.capture import linear_dims
        from lorif_ray.math.projection import projected_dims

        inputs = resolve_inputs(dense_cfg)
        model, _ = load_model(inputs.model_path, dtype=dense_cfg.model.dtype, device="cpu")
        dims = sum(d1 * d2 for d1, d2 in (projected_dims(i, o, dense_cfg.f)
                   for i, o in (linear_dims(m) for m in select_layers(model, dense_cfg.model.layers).values())))
        rows = sum(1 for line in Path(inputs.train_path).read_text().splitlines() if line.strip())
        return float(rows * dims * BYTES_PER_VALUE["float32"])


def _report(directory: Path) -> dict:
    return json.loads((directory / "_report.json").read_text())


def factors_from_dense(cfg: Config, dense_dir: Path, out_dir: Path) -> dict:
    """Write the rank-c factor index of ``cfg`` from the dense index at ``dense_dir``, without the model.

    The manifest is the one stage 1 would write for ``cfg`` (same meta), so stages 2–3 use it as is.
    """
    start = time.perf_counter()
    dense = open_index(dense_dir, verify=True)
    meta = json.loads(json.dumps(dense.meta))
    dense_specs = [LayerSpec(**d) for d in meta["layers"]]
    iterations = cfg.factor_iters or default_iterations(cfg.c)
    specs = [replace(s, c=effective_rank(cfg.c, s.d1, s.d2)) for s in dense_specs]
    meta["config"].update(kind="factors", c=cfg.c, factor_iters=iterations)
    meta["layers"] = [asdict(s) for s in specs]
    meta["derived_from"] = {"index": str(dense_dir), "shards": [r.sha256 for r in dense.shards]}
    columns = {}
    for s in specs:
        columns[f"{s.name}.u"] = s.d1 * s.c
        columns[f"{s.name}.v"] = s.d2 * s.c
    writer = ShardWriter(out_dir, kind="factors", columns=columns, dtype=cfg.dtype, shard_size=dense.shard_size,
                         meta=meta)
    dtype = torch.float32  # the model path factorizes in float32 too
    starts = {s.name: initial_block(cfg.seed, s.name, s.d2, s.c, dtype, "cpu") for s in specs}
    offset = 0
    for shard, record in enumerate(dense.shards):
        if writer.is_done(shard):  # resumed after a crash: this shard is already written
            offset += record.rows
            continue
        ids, parts = [], {k: [] for k in columns}
        for batch_ids, cols in iter_batches(dense_dir, [f"{s.name}.g" for s in specs], batch_rows=dense.shard_size,
                                            out_dtype=dtype, manifest=dense, shards=[shard]):
            ids.extend(batch_ids)
            for s in specs:
                g = cols[f"{s.name}.g"].reshape(-1, s.d1, s.d2)  # (n, d1, d2)
                u, v = factorize_dense(g, starts[s.name], iterations)
                parts[f"{s.name}.u"].append(u.reshape(len(batch_ids), -1))
                parts[f"{s.name}.v"].append(v.reshape(len(batch_ids), -1))
        writer.write_shard(shard, ids, {k: torch.cat(v) for k, v in parts.items()})
        offset += len(ids)
    # the K-FAC statistics depend on the model, data, f and seed only: the dense index's are this one's; so is
    # the row table (the same input, row for row), which gives the results their training texts
    shutil.copyfile(dense_dir / STATS_NAME, out_dir / STATS_NAME)
    if row_table_path(dense_dir).is_file():
        with atomic_path(row_table_path(out_dir)) as tmp:
            shutil.copyfile(row_table_path(dense_dir), tmp)
    cfg = replace(cfg, index_dir=str(out_dir))
    return finish_index(cfg, writer, offset, computed=offset, seconds=time.perf_counter() - start,
                        derived_from=str(dense_dir))
