"""Stage 1: per-example projected gradients (rank-c factors, dense rows or hidden states) → Parquet shards.

Work is cut into deterministic shards of ``shard_size`` examples in input order; each finished
shard is recorded in the manifest, so a re-run after a crash skips it and resumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.data import iter_batches as token_batches
from lorif_ray.errors import DataError
from lorif_ray.model.layers import select_layers
from lorif_ray.model.loading import load_model, model_identity
from lorif_ray.stages.featurize import Featurizer
from lorif_ray.stages.inputs import require, resolve_inputs, tokenized
from lorif_ray.store import ShardWriter, file_sha256, write_json
from lorif_ray.store.schema import BYTES_PER_VALUE

def build_featurizer(cfg: Config, model, kind: str | None = None, layer_names: list[str] | None = None,
                     factor_iters: int | None = None) -> Featurizer:
    """The featurizer of this config (``layer_names`` and ``factor_iters`` pin those of an existing index)."""
    if layer_names is None:
        layers = select_layers(model, cfg.model.layers)
    else:
        layers = {name: model.get_submodule(name) for name in layer_names}
    return Featurizer(model, layers, kind=kind or cfg.method.store_kind, f=cfg.f, c=cfg.c, seed=cfg.seed,
                      factor_iters=factor_iters or cfg.factor_iters)


def index_meta(cfg: Config, featurizer: Featurizer, model, data_sha256: str, num_examples: int) -> dict:
    """Everything that determines the stored rows (a resumed run must match it exactly)."""
    return {
        "config": {"kind": featurizer.kind, "f": cfg.f, "c": cfg.c, "seed": cfg.seed,
                   "factor_iters": featurizer.iterations, "max_length": cfg.data.max_length,
                   "layers": cfg.model.layers, "model_dtype": cfg.model.dtype},
        "model": model_identity(model),
        "layers": [asdict(s) for s in featurizer.specs],
        "data": {"sha256": data_sha256, "num_examples": num_examples},
    }


def run_index(cfg: Config) -> dict:
    """Build (or resume) the index of ``data.train`` at ``cfg.index_path``; returns a report dict."""
    inputs = resolve_inputs(cfg)
    train_path = require(inputs.train_path, "data.train")
    model, tokenizer = load_model(inputs.model_path, dtype=cfg.model.dtype, device=cfg.model.device)
    examples = tokenized(train_path, tokenizer, cfg.data.max_length)
    if not examples:
        raise DataError(f"{train_path} holds no training examples")
    featurizer = build_featurizer(cfg, model)
    meta = index_meta(cfg, featurizer, model, file_sha256(train_path), len(examples))
    writer = ShardWriter(cfg.index_path, kind=featurizer.kind, columns=featurizer.columns, dtype=cfg.dtype,
                         shard_size=cfg.shard_size, meta=meta)
    num_shards = math.ceil(len(examples) / cfg.shard_size)
    if cfg.progress:
        payload = sum(featurizer.columns.values()) * BYTES_PER_VALUE[cfg.dtype]
        print(f"stage 1: {len(examples)} examples x {payload / 1024:.2f} KiB ({featurizer.kind}, {cfg.dtype}) "
              f"= {len(examples) * payload / 2**20:.1f} MiB to store in {cfg.index_path}")
    start, computed, skipped = time.perf_counter(), 0, 0
    with tqdm(total=len(examples), unit="ex", desc="stage 1: index", disable=not cfg.progress) as bar:
        for shard in range(num_shards):
            chunk = examples[shard * cfg.shard_size:(shard + 1) * cfg.shard_size]
            if writer.is_done(shard):
                skipped += 1
                bar.update(len(chunk))
                continue
            ids, parts = [], []
            for batch_ids, batch in token_batches(chunk, cfg.data.batch_size, tokenizer.pad_token_id):
                parts.append({k: v.detach().cpu() for k, v in featurizer(batch_ids, batch).items()})
                ids.extend(batch_ids)
                bar.update(len(batch_ids))
            writer.write_shard(shard, ids, {k: torch.cat([p[k] for p in parts]) for k in featurizer.columns})
            computed += len(chunk)
    seconds = time.perf_counter() - start
    manifest = writer.finalize(len(examples))
    report = storage_report(manifest, featurizer, cfg.dtype)
    report.update(examples=len(examples), computed=computed, skipped_shards=skipped, seconds=seconds,
                  examples_per_second=computed / seconds if computed else None, index_dir=str(cfg.index_path))
    write_json(cfg.index_path / "_report.json", report)
    return report


def storage_report(manifest, featurizer: Featurizer, dtype: str) -> dict:
    """Stored bytes per example: the payload c(d1+d2)·size per layer, and the files' overhead over it."""
    size = BYTES_PER_VALUE[dtype]
    per_layer, shapes = {}, {}
    for s in featurizer.specs if featurizer.kind != "hidden" else []:
        floats = s.c * (s.d1 + s.d2) if featurizer.kind == "factors" else s.dim
        per_layer[s.name] = floats * size
        formula = f"{s.c}x({s.d1}+{s.d2})" if featurizer.kind == "factors" else f"{s.d1}x{s.d2}"
        shapes[formula] = shapes.get(formula, 0) + 1
    payload = manifest.payload_bytes_per_row() * manifest.num_rows
    total = manifest.total_bytes()
    return {
        "kind": featurizer.kind,
        "dtype": dtype,
        "payload_bytes_per_example": manifest.payload_bytes_per_row(),
        "bytes_per_example": total / manifest.num_rows,
        "overhead_fraction": (total - payload) / payload,
        "total_bytes": total,
        "bytes_per_example_per_layer": per_layer,
        "layer_shapes": shapes,  # "c x (d1+d2)" (or "d1 x d2") → number of layers of that shape
    }
