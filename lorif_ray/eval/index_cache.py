"""Content-addressed stage-1 indexes, and rank-c factor indexes derived from a dense one.

An index directory is named by a hash of everything that determines its rows and statistics (model
identity, data sha256, kind, f, c, seed, layers, max_length, dtypes, factor iterations, the labels of
the K-FAC statistics), under one cache root, so any run that needs the same rows finds them instead of
recomputing. A LoRIF index can be made from a
dense (LoGRA-kind) index of the same f and seed without running the model (``DenseFactors``, a featurize
backend of ``run_index``): the power iteration runs on the stored G̃ (``factorize_dense``) from the same
start block, which gives the model path's factors up to float error, and its K-FAC statistics are the
dense index's.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from lorif_ray.config import Config, MethodConfig
from lorif_ray.errors import IndexMismatchError
from lorif_ray.math.factorize import default_iterations, effective_rank, factorize_dense, initial_block
from lorif_ray.model.loading import load_model, model_identity
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.stages.index import FeaturizeBackend, FinishedShard, IndexLayout, run_index
from lorif_ray.stages.inputs import require, resolve_inputs
from lorif_ray.store import IndexFolder, ShardRecord, file_sha256
from lorif_ray.store.manifest import FORMAT_VERSION
from lorif_ray.store.schema import BYTES_PER_VALUE, dense_column, factor_columns, store_columns

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
    index = IndexFolder(directory)
    return index.complete() and index.report_exists()


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
            return directory, {"source": "cache", **IndexFolder(directory).read_report()}
        if cfg.method.store_kind == "factors" and self.budget_bytes > 0:
            dense_cfg = self.dense_config(cfg)
            dense_dir = self.path(dense_cfg)
            if is_complete(dense_dir) or self.dense_bytes(dense_cfg) <= self.budget_bytes:
                dense_dir, dense_info = self.ensure(dense_cfg)
                report = run_index(replace(cfg, index_dir=str(directory)),
                                   partial(DenseFactors, dense_dir=dense_dir))
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


class DenseFactors(FeaturizeBackend):
    """The featurize backend that derives ``cfg``'s rank-c factor index from the dense index at ``dense_dir``,
    without the model: each shard's factors come from the power iteration on its stored G̃ (``factorize_dense``).

    The manifest is the one stage 1 would write for ``cfg`` (same meta, plus ``derived_from``), so stages 2–3
    use it as is. The K-FAC statistics depend on the model, data, f and seed only: the dense index's total
    (covering every shard) becomes this index's before its first shard is written (``adopt_statistics``).

    Raises (``open``):
        IndexMismatchError: the dense index was made from another training input than ``data.train``, or with
            another ``shard_size``.
    """

    label = "stage 1: index (from dense rows)"

    def __init__(self, cfg: Config, dense_dir: Path):
        super().__init__(cfg)
        self.dense_dir = Path(dense_dir)
        self.dense_index = IndexFolder(dense_dir)

    def open(self, plan, model_path) -> IndexLayout:
        cfg = self.cfg
        self.dense = dense = self.dense_index.manifest(verify=True)
        made = (dense.meta["data"]["sha256"], dense.num_rows, dense.shard_size)
        wanted = (plan.sha256, plan.num_rows, cfg.shard_size)
        if made != wanted:
            raise IndexMismatchError(f"the dense index {self.dense_dir} was made from another input or shard_size "
                                     f"(sha256, rows, shard_size: {made} vs {wanted}); build it again from {plan.path}")
        meta = json.loads(json.dumps(dense.meta))
        dense_specs = [LayerSpec(**d) for d in meta["layers"]]
        self.iterations = cfg.factor_iters or default_iterations(cfg.c)
        self.specs = [replace(s, c=effective_rank(cfg.c, s.d1, s.d2)) for s in dense_specs]
        meta["config"].update(kind="factors", c=cfg.c, factor_iters=self.iterations)
        meta["layers"] = [asdict(s) for s in self.specs]
        meta["derived_from"] = {"index": str(self.dense_dir), "shards": [r.sha256 for r in dense.shards]}
        return IndexLayout("factors", store_columns("factors", self.specs), meta)

    def shards(self, plan, todo, writer, on_rows) -> Iterator[ShardRecord]:
        IndexFolder(writer.directory).adopt_statistics(self.dense_index)
        dtype = torch.float32  # the model path factorizes in float32 too
        specs, iterations = self.specs, self.iterations
        starts = {s.name: initial_block(self.cfg.seed, s.name, s.d2, s.c, dtype, "cpu") for s in specs}
        for shard in todo:
            ids, parts = [], {k: [] for k in writer.manifest.columns}
            for batch_ids, cols in self.dense_index.batches([dense_column(s.name) for s in specs],
                                                            batch_rows=self.dense.shard_size, out_dtype=dtype,
                                                            manifest=self.dense, shards=[shard]):
                ids.extend(batch_ids)
                for s in specs:
                    g = cols[dense_column(s.name)].reshape(-1, s.d1, s.d2)  # (n, d1, d2)
                    u, v = factorize_dense(g, starts[s.name], iterations)
                    u_column, v_column = factor_columns(s.name)
                    parts[u_column].append(u.reshape(len(batch_ids), -1))
                    parts[v_column].append(v.reshape(len(batch_ids), -1))
                if on_rows:
                    on_rows(len(batch_ids))
            yield FinishedShard(shard, ids, {k: torch.cat(v) for k, v in parts.items()}).write(writer)

    def info(self) -> dict:
        return {"derived_from": str(self.dense_dir)}
