"""Stage 1: per-example projected gradients (rank-c factors, dense rows or hidden states) → Parquet shards.

One driver, ``run_index``, for every way of making rows. Work is cut into deterministic shards of
``shard_size`` examples in input order (``shard_input``: one streaming pass that checks the input, fixes
each shard's row range and writes the row table); the driver builds the meta, reuses a finished index,
takes the index folder's writer lock (``IndexFolder.lock``: one run writes an index at a time), opens the
one ``ShardWriter`` (``IndexFolder.writer``), draws the bar and commits each finished shard's record, so a
re-run after a crash skips it (without reading its rows) and resumes. A *featurize backend*
(``FeaturizeBackend``) makes and writes the shards left and knows nothing of manifests, reuse or bars:
``LocalFeaturize`` (this process), ``lorif_ray.distributed.featurize.RayFeaturize`` (a Ray pool of gradient replicas),
``lorif_ray.eval.index_cache.DenseFactors`` (rank-c factors of a dense index, no model). Every
backend writes a shard as one unit (``FinishedShard.write``: its K-FAC statistics, then its file)
before the driver can commit its record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from lorif_ray.config import Config
from lorif_ray.data import InputShards, TokenizedExample, commit_row_table, discard_row_table, shard_input
from lorif_ray.data import iter_batches as token_batches
from lorif_ray.errors import ConfigError
from lorif_ray.math.capture import check_finite_all
from lorif_ray.model.layers import select_layers
from lorif_ray.model.loading import check_context_length, load_model, model_identity
from lorif_ray.progress import progress_bar
from lorif_ray.stages.featurize import ColumnMaker, Featurizer, LayerSpec
from lorif_ray.stages.inputs import TokenizedShards, require, resolve_inputs
from lorif_ray.store import IndexFolder, Manifest, ShardRecord, ShardWriter
from lorif_ray.store.schema import BYTES_PER_VALUE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexLayout:
    """What a backend's rows are: the manifest's ``kind``, ``columns`` {name: width} and ``meta``."""

    kind: str
    columns: dict[str, int]
    meta: dict


@dataclass
class FinishedShard:
    """One shard as a backend made it: ``ids`` (n), store ``columns`` {column: (n, width)} and its K-FAC
    ``statistics`` {layer: KroneckerStats} (None: the index collects none, or already holds them)."""

    index: int
    ids: list[str]
    columns: dict[str, torch.Tensor]
    statistics: dict | None = None

    def write(self, writer: ShardWriter) -> ShardRecord:
        """Write the shard as one unit, its statistics and then its Parquet file (``writer.write_file``), and return
        the record for the driver to commit: the one place stage 1 writes a shard, for every backend, so a
        committed record always has its statistics."""
        if self.statistics is not None:
            IndexFolder(writer.directory).write_shard_statistics(
                self.index, {layer: stats.tensors() for layer, stats in self.statistics.items()})
        return writer.write_file(self.index, self.ids, self.columns)


@contextmanager
def quiet_transformers():
    """Silence transformers' own progress bars and warnings (not ours) for the duration of a stage step;
    the previous verbosity and bar setting come back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def build_featurizer(cfg: Config, model, kind: str | None = None, layer_names: list[str] | None = None,
                     factor_iters: int | None = None, statistics: bool = False) -> Featurizer:
    """The featurizer of this config (``layer_names`` and ``factor_iters`` pin those of an existing index;
    ``statistics``: it also sums the K-FAC statistics of what it captures, for stage 1)."""
    if layer_names is None:
        layers = select_layers(model, cfg.model.layer_patterns)
    else:
        layers = {name: model.get_submodule(name) for name in layer_names}
    return Featurizer(model, layers, kind=kind or cfg.method.store_kind, f=cfg.f, c=cfg.c, seed=cfg.seed,
                      factor_iters=factor_iters or cfg.factor_iters, statistics=statistics,
                      statistics_labels=cfg.kfac_labels)


def index_meta(cfg: Config, featurizer: Featurizer, identity: dict, data_sha256: str, num_examples: int) -> dict:
    """Everything that determines the stored rows (a resumed run must match it exactly); ``identity``
    is ``model_identity`` of the unsharded model. Checks the projection widths first."""
    check_projection_widths(featurizer.specs, cfg.f, featurizer.kind)
    warn_clamped_rank(featurizer.specs, cfg.c, featurizer.kind)
    meta = {
        "config": {"kind": featurizer.kind, "f": cfg.f, "c": cfg.c, "seed": cfg.seed,
                   "factor_iters": featurizer.iterations, "max_length": cfg.data.max_length,
                   "layers": cfg.model.layer_patterns, "model_dtype": cfg.model.dtype},
        "model": identity,
        "layers": [asdict(s) for s in featurizer.specs],
        "data": {"sha256": data_sha256, "num_examples": num_examples},
        "kronecker_stats": featurizer.statistics is not None,  # <index>/_kronecker.safetensors (stage 2's K-FAC)
    }
    if cfg.data.columns.renamed():  # the columns read shape the rows; absent = the default names (older indexes)
        meta["data"]["columns"] = cfg.data.columns.renamed()
    if featurizer.statistics is not None and featurizer.statistics_labels != "training":
        meta["kfac_labels"] = featurizer.statistics_labels  # absent = training (indexes before the key stay valid)
    return meta


def train_input(cfg: Config) -> tuple[Path, Path]:
    """(model path, training input) of a config; ``data.max_length`` is checked against the model's
    context first (its config file only)."""
    inputs = resolve_inputs(cfg)
    check_context_length(inputs.model_path, cfg.data.max_length)
    return inputs.model_path, require(inputs.train_path, "data.train")


def shards_left(plan: InputShards, writer: ShardWriter) -> list[int]:
    """The shards of ``plan`` the index has not committed yet, in order (a re-run reads no other)."""
    return [shard for shard in range(len(plan.ranges)) if not writer.is_done(shard)]


def check_projection_widths(specs: list[LayerSpec], f: int, kind: str) -> None:
    """Warn about layers narrower than ``f`` on a side (d = I/f or O/f is then clamped to 1).

    Raises:
        ConfigError: every layer is narrower than ``f`` on both sides (d1 = d2 = 1 everywhere: one
            number per layer would be stored).
    """
    if kind == "hidden":
        return
    narrow = [s for s in specs if s.in_features < f or s.out_features < f]
    if not narrow:
        return
    widths = ", ".join(f"{s.name} ({s.in_features}x{s.out_features})" for s in narrow[:10])
    more = f" and {len(narrow) - 10} more" if len(narrow) > 10 else ""
    if all(s.in_features < f and s.out_features < f for s in specs):
        largest = max(max(s.in_features, s.out_features) for s in specs)
        raise ConfigError(f"f={f} is larger than both widths (in x out) of every layer: {widths}{more}; every "
                          f"projection would collapse to d1 = d2 = 1. Use f <= {largest}")
    logger.warning("f=%d is larger than a width (in x out) of %d of %d layers: %s%s; their projection keeps "
                   "d = 1 on that side (d1 = in/f, d2 = out/f, at least 1)", f, len(narrow), len(specs), widths, more)


def warn_clamped_rank(specs: list[LayerSpec], c: int, kind: str) -> None:
    """Log once the layers where ``c`` exceeds min(d1, d2): they store rank min(d1, d2) (exact factors), which
    the manifest records as that layer's ``c``."""
    clamped = [s for s in specs if kind == "factors" and s.c < c]
    if clamped:
        used = ", ".join(f"{s.name} (c={s.c})" for s in clamped[:10]) + (" ..." if len(clamped) > 10 else "")
        logger.warning("c=%d is larger than min(d1, d2) of %d of %d layers; they store the rank used instead (exact "
                       "factors), recorded as each layer's c in the manifest: %s", c, len(clamped), len(specs), used)


def reuse_finished_index(cfg: Config, index: IndexFolder, layout: IndexLayout, num_examples: int) -> dict | None:
    """The report of an ``index`` that is already complete, intact (its K-FAC statistics too) and made with this
    config; None when work is left. Takes no lock and writes nothing (read-only storage is fine), except where it
    can: a lost ``_report.json`` is restored and stale temporaries are removed."""
    manifest = index.finished(kind=layout.kind, columns=layout.columns, dtype=cfg.dtype, shard_size=cfg.shard_size,
                              meta=layout.meta, num_rows=num_examples)
    if manifest is None:
        return None
    logger.info("stage 1: the index at %s is complete and intact; nothing to compute", index.path)
    index.remove_stale_temporaries()
    report = reused_report(cfg, index, manifest)
    if not index.report_exists():  # lost after finalize (a crash): restore it if we can
        try:
            index.write_report(report)
        except OSError as e:
            logger.info("cannot restore %s (%s); the index is complete without it", index.report_path, e)
    return report


def reused_report(cfg: Config, index: IndexFolder, manifest: Manifest) -> dict:
    """``finish_index``'s report of a complete index this run reuses, from its manifest (nothing written):
    ``reused`` true, nothing computed now, and the timing of the run that built it from its ``_report.json``
    (``seconds``, ``examples_per_second``, ``built_examples``: what that run computed; None where no report
    records them)."""
    specs = [LayerSpec(**layer) for layer in manifest.meta["layers"]]
    report = storage_report(manifest, specs, manifest.kind, cfg.dtype)
    original = index.read_report()
    if original.get("reused"):  # restored by a reuse (after a crash lost it): the builder's timing, if it had it
        built = {key: original.get(key) for key in ("seconds", "examples_per_second", "built_examples")}
    else:
        built = {"seconds": original.get("seconds"), "examples_per_second": original.get("examples_per_second"),
                 "built_examples": original.get("computed")}
    report.update(examples=manifest.num_rows, computed=0, index_dir=str(index.path),
                  skipped_shards=len(manifest.shards), reused=True, **built)
    return report


def shard_chunks(examples: list, shard_size: int) -> list[list]:
    """Examples in memory cut like ``shard_input`` cuts an input file: shard i holds [i·size, (i+1)·size)."""
    return [examples[i:i + shard_size] for i in range(0, len(examples), shard_size)]


def featurize_chunk(featurizer: Featurizer, chunk: list[TokenizedExample], batch_size: int, pad_token_id: int,
                    on_batch: Callable[[int], None] | None = None) -> tuple[list[str], dict[str, torch.Tensor]]:
    """One shard's ids and store columns {column: (n, width)} on the CPU (fused capture + factorization);
    ``on_batch`` gets each batch's example count (a progress bar's ``update``).

    The host waits for the device once per shard, not per batch: the batches' columns stay on the
    device and their NaN/Inf checks run together at the end (errors name the same layer and examples).
    """
    ids, parts, masks = [], [], []
    for batch_ids, batch in token_batches(chunk, batch_size, pad_token_id):
        columns, batch_masks = featurizer.unchecked(batch_ids, batch)
        parts.append({k: v.detach() for k, v in columns.items()})
        masks.append(batch_masks)
        ids.extend(batch_ids)
        if on_batch:
            on_batch(len(batch_ids))
    check_finite_all([(name, torch.cat([m[i][1] for m in masks])) for i, (name, _) in enumerate(masks[0])], ids)
    return ids, {k: torch.cat([p[k] for p in parts]).cpu() for k in featurizer.columns}


def capture_chunk(featurizer: Featurizer, chunk: list[TokenizedExample], batch_size: int, pad_token_id: int,
                  on_batch: Callable[[int], None] | None = None
                  ) -> list[tuple[list[str], dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """One shard's captured (A, B) pairs per batch, on the CPU (for a separate factorization step);
    ``on_batch`` gets each batch's example count."""
    out = []
    for batch_ids, batch in token_batches(chunk, batch_size, pad_token_id):
        captured = featurizer.capture(batch_ids, batch)
        out.append((batch_ids, {k: (a.detach().cpu(), b.detach().cpu()) for k, (a, b) in captured.items()}))
        if on_batch:
            on_batch(len(batch_ids))
    return out


def columns_of_captured(maker: ColumnMaker, captured: list) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``capture_chunk``'s output → (ids, store columns), exactly as ``featurize_chunk`` makes them."""
    ids, parts = [], []
    for batch_ids, pairs in captured:
        parts.append({k: v.cpu() for k, v in maker(batch_ids, pairs).items()})
        ids.extend(batch_ids)
    return ids, {k: torch.cat([p[k] for p in parts]) for k in maker.columns}


def announce(cfg: Config, index: IndexFolder, num_examples: int, columns: dict[str, int], kind: str) -> None:
    """Log the index size before stage 1 starts."""
    payload = sum(columns.values()) * BYTES_PER_VALUE[cfg.dtype]
    logger.info("stage 1: %d examples x %.2f KiB (%s, %s) = %.1f MiB to store in %s", num_examples, payload / 1024,
                kind, cfg.dtype, num_examples * payload / 2**20, index.path)


class FeaturizeBackend:
    """Where stage 1's rows are made; ``run_index`` does the rest (plan, meta, reuse, lock, writer, bar, commit,
    report) the same for every backend. Made with the run's ``Config``; a new way to make rows is a subclass.

    - ``shard_input(train_path, rows_table)``: the input's shards (``InputShards``; default ``shard_input`` in this
      process; it writes the row table ``rows_table``, which the driver commits once the index accepts the input);
    - ``open(plan, model_path)``: load what makes rows (the model, actors) and say what they are (``IndexLayout``);
    - ``shards(plan, todo, writer, on_rows)``: make and write (``FinishedShard.write`` with ``writer``) the shards
      ``todo``, and yield each one's ``ShardRecord`` (the driver commits it); ``on_rows(n)`` (or None) after
      each featurized batch of n rows (rows of a shard that has to be made again are taken back: ``-n``);
    - ``info()``: extra report fields; ``close()``: release what ``open`` took (called even if ``open`` failed).

    ``label`` is the progress bar's name.
    """

    label = "stage 1: index"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def shard_input(self, train_path: Path, rows_table: Path) -> InputShards:
        cfg = self.cfg
        return shard_input(train_path, cfg.shard_size, cfg.data.columns, rows_table)

    def open(self, plan: InputShards, model_path: Path) -> IndexLayout:
        raise NotImplementedError

    def shards(self, plan: InputShards, todo: list[int], writer: ShardWriter,
               on_rows: Callable[[int], None] | None) -> Iterator[ShardRecord]:
        raise NotImplementedError

    def info(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class LocalFeaturize(FeaturizeBackend):
    """Stage 1 in this process: the model loaded once; shard i is written on a background thread while shard i+1
    is featurized (``write_shards``)."""

    def open(self, plan: InputShards, model_path: Path) -> IndexLayout:
        cfg = self.cfg
        with quiet_transformers():
            model, self.tokenizer = load_model(model_path, dtype=cfg.model.dtype, device=cfg.model.device,
                                               adapter=cfg.model.adapter)
        self.featurizer = featurizer = build_featurizer(cfg, model, statistics=True)
        meta = index_meta(cfg, featurizer, model_identity(model), plan.sha256, plan.num_rows)
        return IndexLayout(featurizer.kind, featurizer.columns, meta)

    def shards(self, plan: InputShards, todo: list[int], writer: ShardWriter,
               on_rows: Callable[[int], None] | None) -> Iterator[ShardRecord]:
        cfg, tokenizer = self.cfg, self.tokenizer
        chunks = TokenizedShards(plan, todo, tokenizer, cfg.data.max_length)
        return write_shards(self.featurizer, writer, chunks, cfg.data.batch_size, tokenizer.pad_token_id, on_rows)


def run_index(cfg: Config, make_backend: Callable[[Config], FeaturizeBackend] = LocalFeaturize) -> dict:
    """Build (or resume) the index of ``data.train`` in the folder ``cfg.index_path``; returns a report dict.

    Args:
        make_backend: ``(cfg) →`` the ``FeaturizeBackend`` that makes the rows; default ``LocalFeaturize`` (this
            process); ``lorif_ray.distributed.featurize.RayFeaturize`` on Ray, ``index_cache.DenseFactors``
            from a dense index.
    """
    model_path, train_path = train_input(cfg)  # before loading the model
    backend, index = make_backend(cfg), IndexFolder(cfg.index_path)
    try:
        # data errors before model work
        plan = backend.shard_input(train_path, index.row_table_path)
        try:
            return _index(cfg, index, backend, plan, model_path)
        finally:
            discard_row_table(plan.rows_table)  # committed once the index accepted the input; else dropped
    finally:
        backend.close()


def _index(cfg: Config, index: IndexFolder, backend: FeaturizeBackend, plan: InputShards, model_path: Path) -> dict:
    layout = backend.open(plan, model_path)
    reused = reuse_finished_index(cfg, index, layout, plan.num_rows)
    if reused is not None:  # complete and intact: no lock, no shard writes (read-only storage is fine)
        commit_row_table(plan.rows_table)  # a finished index without its row table gets it here (a rename)
        return reused
    with index.lock():
        # creates the index, or checks it was made with this config; a shard is done only with its statistics
        writer = index.writer(kind=layout.kind, columns=layout.columns, dtype=cfg.dtype, shard_size=cfg.shard_size,
                              meta=layout.meta)
        commit_row_table(plan.rows_table)  # the index (new, or checked equal) accepted this input
        announce(cfg, index, plan.num_rows, layout.columns, layout.kind)
        todo = shards_left(plan, writer)
        start, computed = time.perf_counter(), 0
        with progress_bar(plan.num_rows, backend.label, "ex", cfg.progress) as bar:
            bar.update(plan.num_rows - sum(plan.ranges[shard].rows for shard in todo))
            records = backend.shards(plan, todo, writer, bar.update if cfg.progress else None)
            try:
                for record in records:
                    writer.commit(record)
                    index.fold_now_and_then(writer.is_done)
                    computed += record.rows
            finally:
                getattr(records, "close", lambda: None)()  # a generator: its threads, actors' calls end here
        return finish_index(cfg, index, writer, plan.num_rows, computed=computed,
                            skipped_shards=len(plan.ranges) - len(todo), seconds=time.perf_counter() - start,
                            **backend.info())


def write_shards(featurizer: Featurizer, writer: ShardWriter, chunks: Mapping[int, Sequence[TokenizedExample]],
                 batch_size: int, pad_token_id: int, on_batch: Callable[[int], None] | None = None
                 ) -> Iterator[ShardRecord]:
    """Featurize and write shards {index: examples} (e.g. ``TokenizedShards``: each read when its turn
    comes); yields each shard's record (to commit) in order.

    Shard i is written (``FinishedShard.write``: statistics, Parquet encoding, checksum, fsync) on a background
    thread while shard i+1 is computed; at most one shard waits, and a failed write stops the run at the next
    shard with its error (the shards committed before it stay).
    """
    writing = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as background:
        for shard, chunk in chunks.items():
            ids, columns = featurize_chunk(featurizer, chunk, batch_size, pad_token_id, on_batch)
            statistics = featurizer.statistics.pop() if featurizer.statistics is not None else None
            if writing is not None:
                yield writing.result()
            writing = background.submit(FinishedShard(shard, ids, columns, statistics).write, writer)
        if writing is not None:
            yield writing.result()


def finish_index(cfg: Config, index: IndexFolder, writer: ShardWriter, num_examples: int, *, computed: int,
                 seconds: float, **extra) -> dict:
    """Finalize the manifest (every shard present, row counts right), fold the shards' K-FAC statistics
    and write ``_report.json``."""
    manifest = writer.finalize(num_examples)
    index.fold_statistics(writer.is_done)
    specs = [LayerSpec(**layer) for layer in manifest.meta["layers"]]
    report = storage_report(manifest, specs, manifest.kind, cfg.dtype)
    report.update(examples=num_examples, computed=computed, seconds=seconds,
                  examples_per_second=computed / seconds if computed else None, index_dir=str(index.path),
                  reused=False, **extra)
    index.write_report(report)
    return report


def storage_report(manifest, specs: list[LayerSpec], kind: str, dtype: str) -> dict:
    """Stored bytes per example: the payload c(d1+d2)·size per layer, and the files' overhead over it."""
    size = BYTES_PER_VALUE[dtype]
    per_layer, shapes = {}, {}
    for s in specs if kind != "hidden" else []:
        floats = s.c * (s.d1 + s.d2) if kind == "factors" else s.dim
        per_layer[s.name] = floats * size
        formula = f"{s.c}x({s.d1}+{s.d2})" if kind == "factors" else f"{s.d1}x{s.d2}"
        shapes[formula] = shapes.get(formula, 0) + 1
    payload = manifest.payload_bytes_per_row() * manifest.num_rows
    total = manifest.total_bytes()
    return {
        "kind": kind,
        "dtype": dtype,
        "payload_bytes_per_example": manifest.payload_bytes_per_row(),
        "bytes_per_example": total / manifest.num_rows,
        "overhead_fraction": (total - payload) / payload,
        "total_bytes": total,
        "bytes_per_example_per_layer": per_layer,
        "layer_shapes": shapes,  # "c x (d1+d2)" (or "d1 x d2") → number of layers of that shape
    }
