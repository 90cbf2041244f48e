"""The index folder: stage 1's artifact, opened from the folder's path.

``IndexFolder`` alone names every file of it (kronfluence's way: ``writer`` / ``read_*`` / ``*exists`` beside
the fit) and runs the checks of ``lorif_ray.store.integrity`` (through ``lorif_ray.store.shards``) on each:

- ``<index>/_manifest.json`` (+ ``_shards.jsonl`` while stage 1 runs): what the rows hold, how they were made
  (its ``meta``: the ``IndexSettings``) and the record of every shard (``lorif_ray.store.manifest``);
- ``<index>/shard-XXXXX.parquet``: the rows, shard i holding rows [i·shard_size, (i+1)·shard_size)
  (``lorif_ray.store.shards``: written by the ``ShardWriter`` that ``writer`` makes, read by ``batches``/``ids``);
- ``<index>/_kronecker/shard-XXXXX.safetensors`` and their total ``<index>/_kronecker.safetensors``: the K-FAC
  statistics Ã, S̃ per layer (below);
- ``<index>/_rows.parquet``: the row table (``lorif_ray.data.row_table``: each row's id and place in the input);
- ``<index>/_report.json``: stage 1's report (timing, bytes per example).

The K-FAC statistics. Stage 1 sums each shard's statistics while it featurizes the shard and writes them to
``_kronecker/shard-XXXXX.safetensors`` *before* the shard's record is committed (the leading "_" keeps the
folder a Parquet dataset). ``fold_statistics`` adds the files of committed shards into
``_kronecker.safetensors``, whose metadata lists the shards it holds, and only then deletes them: a crash
between the two leaves files whose shard is already listed, which the next fold skips. So every shard counts
exactly once, whichever shards a resumed run skips or recomputes (statistics are deterministic). A committed
shard has its statistics, or it is not done: the writer asks ``has_statistics`` (the shard is in the total, or
its own file is there and intact) before it counts a shard as finished, so a shard whose statistics were lost
is recomputed by the next run. An index derived from a dense one takes that index's total instead
(``adopt_statistics``). Every file carries a CRC-32 per tensor, checked whenever it is read. The store holds
them as {layer: {field: tensor}} (fields summed one by one); ``lorif_ray.math.kronecker.KroneckerStats`` is
made of them by its callers. Size: (d1² + d2²) float64 per layer per file (256 KiB per layer at
d1 = d2 = 128), so the files of a large model are folded every ``FOLD_EVERY`` shards.

Example:
    >>> index = IndexFolder(cfg.index_path)
    >>> with index.lock():
    ...     writer = index.writer(kind="factors", columns=columns, dtype="float16", shard_size=1024, meta=meta)
    >>> manifest = IndexFolder.open(cfg.index_path).manifest()
    >>> for ids, columns in index.batches(["transformer.h.0.mlp.c_fc.u"], manifest=manifest): ...
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lorif_ray.errors import (ConfigError, CorruptArtifactError, CorruptShardError, IndexMismatchError,
                              IndexNotFoundError, LorifError, MissingShardError)
from lorif_ray.store.artifacts import (atomic_path, file_sha256, load_tensors, remove_stale_temporaries, save_tensors,
                                       write_json)
from lorif_ray.store.folder import ArtifactFolder
from lorif_ray.store.integrity import contained
from lorif_ray.store.locks import lock_name, writer_lock
from lorif_ray.store.manifest import MANIFEST_NAME, Manifest, ShardRecord
from lorif_ray.store.schema import ID_COLUMN, arrow_to_tensor
from lorif_ray.store.shards import (LOCK_NAME, REPAIR_HINT, ShardWriter, config_diff, shard_batches, shard_path, some,
                                    verify_shards)

log = logging.getLogger(__name__)

INDEX_WRITER = ("index", "stage 1 (jobs/index.py)")  # the folder's writer lock (``IndexFolder.lock``)
REPORT_NAME = "_report.json"
ROWS_NAME = "_rows.parquet"  # the row table; "_": ``pyarrow.parquet.read_table(index)`` reads the shards only
ROWS_PENDING_PREFIX = "_rows.pending-"  # a row table the input's plan wrote, not yet committed
STATISTICS_NAME = "_kronecker.safetensors"  # the folded K-FAC statistics
STATISTICS_DIR = "_kronecker"  # per-shard files; "_": dataset readers skip it (format 1 used "kronecker/")
FOLD_EVERY = 16  # unfolded shard files stage 1 lets accumulate before folding them
STATISTICS_REBUILD = ("re-run stage 1 (jobs/index.py) with the same config: it recomputes the shards whose "
                      "statistics are lost")
# (path, size, mtime_ns) of a statistics file -> the shards it holds (checked whole), so stage 1 reads each once
_CHECKED: dict[tuple, frozenset] = {}


@dataclass(frozen=True)
class IndexSettings:
    """Everything that shaped an index's rows, as its manifest records them (the query side featurizes its
    queries with these): one object over the manifest's ``kind``, ``dtype``, ``columns`` and ``meta``.

    ``layers`` are the attributed layers' ``LayerSpec`` fields (dicts, in manifest order); ``row_settings`` the
    config values that change rows (``f``, ``c``, ``seed``, ``factor_iters``, ``max_length``, ``layers``
    patterns, ``model_dtype``) with the storage ``dtype``.
    """

    kind: str
    dtype: str
    shard_size: int
    columns: dict
    layers: list
    model: dict
    data: dict
    config: dict
    kronecker_stats: bool  # stage 1 collected the K-FAC statistics (``_kronecker.safetensors``)
    kfac_labels: str  # which labels they were summed for ("training" when the key is absent: older indexes)

    @classmethod
    def of(cls, manifest: Manifest) -> "IndexSettings":
        meta = manifest.meta
        return cls(manifest.kind, manifest.dtype, manifest.shard_size, dict(manifest.columns), meta.get("layers", []),
                   meta.get("model", {}), meta.get("data", {}), meta.get("config", {}),
                   bool(meta.get("kronecker_stats")), meta.get("kfac_labels", "training"))

    @property
    def layer_names(self) -> list[str]:
        return [layer["name"] for layer in self.layers]

    @property
    def row_settings(self) -> dict:
        """{setting: value} of what shaped the rows: the manifest's ``meta["config"]`` and the storage ``dtype``."""
        return {**self.config, "dtype": self.dtype}


def collects_statistics(meta: dict) -> bool:
    """Whether an index of this ``meta`` collects K-FAC statistics (a shard is then done only with them)."""
    return bool(meta.get("kronecker_stats"))


class IndexFolder(ArtifactFolder):
    """An index folder (``cfg.index_path``): its manifest, shards, K-FAC statistics, row table and report.

    ``IndexFolder(path)`` names the folder (it need not exist yet: stage 1 writes it); ``IndexFolder.open(path)``
    is a folder that holds an index (its manifest is there). Holds nothing but its path: it pickles to Ray
    actors as that, and every read reads the files as they are now.
    """

    def missing(self) -> Exception:
        """``open``'s error: no manifest there (run stage 1 first)."""
        return IndexNotFoundError(f"no index at {self.path}: {self.manifest_path} does not exist")

    # naming

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    @property
    def report_path(self) -> Path:
        return self.path / REPORT_NAME

    @property
    def row_table_path(self) -> Path:
        return self.path / ROWS_NAME

    @property
    def statistics_dir(self) -> Path:
        return self.path / STATISTICS_DIR

    @property
    def statistics_path(self) -> Path:
        """The folded total, checked to stay inside the folder."""
        return contained(self.path, STATISTICS_NAME, source=f"the index {self.path}")

    def shard_statistics_path(self, shard: int) -> Path:
        return self.statistics_dir / f"shard-{shard:05d}.safetensors"

    def strays(self) -> list[str]:
        """What a folder without a manifest holds that stage 1 does not write before its manifest (such a folder
        must hold nothing else: a typo in ``index_dir`` never points stage 1 at a user's own folder); [] if the
        folder is missing or holds an index."""
        if not self.path.is_dir() or self.exists():
            return []
        entries = (MANIFEST_NAME, REPORT_NAME, LOCK_NAME, lock_name(INDEX_WRITER[0]), STATISTICS_DIR, ROWS_NAME)
        leftovers = (f".{ROWS_NAME.split('.')[0]}.", ROWS_PENDING_PREFIX)  # a row table stage 1 had not committed
        return [name for name in sorted(p.name for p in self.path.iterdir())
                if name not in entries and not name.startswith(leftovers)]

    # the manifest and the settings

    def exists(self) -> bool:
        """Whether an index (complete or not) is here: its manifest is."""
        return self.manifest_path.is_file()

    def complete(self) -> bool:
        """Whether a finished index is here (``manifest`` opens it: finalized, every shard file there)."""
        try:
            self.manifest()
        except LorifError:  # missing, incomplete or damaged: (re)build it
            return False
        return True

    def manifest(self, *, verify: bool = False, expect_complete: bool = True) -> Manifest:
        """The manifest, every shard file checked to be there with its recorded size (``verify``: and SHA-256:
        reads all bytes).

        Raises:
            IndexNotFoundError: no manifest, or (``expect_complete``) an index stage 1 did not finish.
            MissingShardError: a shard file is not on disk.
            CorruptShardError: a shard file's size (or, with ``verify``, its SHA-256) differs from its record.
        """
        directory = self.path
        manifest = Manifest.load(directory)
        if expect_complete and not manifest.complete:
            raise IndexNotFoundError(
                f"the index at {directory} is incomplete ({len(manifest.shards)} shards written, not finalized): "
                "stage 1 did not finish; re-run it to resume"
            )
        for record in manifest.shards:
            path = shard_path(directory, record)
            if not path.is_file():
                raise MissingShardError(f"shard {record.index} of {directory} is missing: {path}")
            size = path.stat().st_size
            if size != record.bytes:
                raise CorruptShardError(f"shard {path} has {size} bytes; the manifest says {record.bytes}: "
                                        f"{REPAIR_HINT}")
            if verify:
                digest = file_sha256(path)
                if digest != record.sha256:
                    raise CorruptShardError(
                        f"shard {path} has SHA-256 {digest}; the manifest says {record.sha256}: {REPAIR_HINT}"
                    )
        return manifest

    @property
    def settings(self) -> IndexSettings:
        """What shaped the rows (``IndexSettings``), from the manifest (the shard files are not read).

        Raises:
            IndexNotFoundError / CorruptShardError: no manifest here, or a corrupt one.
        """
        return IndexSettings.of(Manifest.load(self.path))

    # writing

    def lock(self):
        """The folder's one-writer lock (``writer_lock``): held by stage 1 while it writes."""
        return writer_lock(self.path, *INDEX_WRITER)

    def writer(self, *, kind: str, columns: dict[str, int], dtype: str, shard_size: int, meta: dict) -> ShardWriter:
        """The ``ShardWriter`` of this index (created, or resumed after checking it was made with the same
        settings; stale temporaries removed); a shard counts as done only with its K-FAC statistics when
        ``meta`` collects them. Call under ``lock``."""
        writer = ShardWriter(self.path, kind=kind, columns=columns, dtype=dtype, shard_size=shard_size, meta=meta,
                             also_done=self.has_statistics if collects_statistics(meta) else None)
        remove_stale_temporaries(self.statistics_dir)
        return writer

    def finished(self, *, kind: str, columns: dict[str, int], dtype: str, shard_size: int, meta: dict,
                 num_rows: int) -> Manifest | None:
        """The manifest if this folder already holds exactly this index, complete and intact; else None.

        Read only: takes no lock and writes nothing, so a finished index on read-only storage can be re-used.
        Every shard is checked as ``ShardWriter.is_done`` checks it (SHA-256, footer, meta, and its K-FAC
        statistics when ``meta`` collects them); None means there is work left (or a config that differs): open
        a ``writer`` to do it or to report the difference.
        """
        if not self.exists():
            return None
        try:
            existing = Manifest.load(self.path)
            wanted = Manifest(kind=kind, columns=dict(columns), dtype=dtype, shard_size=shard_size,
                              meta=json.loads(json.dumps(meta)))
        except (CorruptShardError, ConfigError, IndexMismatchError, TypeError, ValueError):
            return None
        expected = -(-num_rows // shard_size)
        if (config_diff(existing, wanted) or not existing.complete or existing.num_rows != num_rows
                or [s.index for s in existing.shards] != list(range(expected))):
            return None
        checked = verify_shards(self.path, existing.shards, existing)
        if len(checked) != len(existing.shards) or not all(checked.values()):
            return None
        if collects_statistics(meta) and not all(self.has_statistics(s.index) for s in existing.shards):
            return None
        return existing

    def remove_stale_temporaries(self) -> None:
        """Remove what killed writers left (in the folder and its statistics); on read-only storage they stay
        (hidden from readers by their leading ".")."""
        for folder in (self.path, self.statistics_dir):
            try:
                remove_stale_temporaries(folder)
            except OSError as e:
                log.info("cannot remove stale temporaries in %s (%s)", folder, e)

    def write_report(self, report: dict) -> None:
        write_json(self.report_path, report)

    def read_report(self) -> dict:
        """``_report.json`` ({} if it is missing or unreadable: the index is complete without it)."""
        try:
            return json.loads(self.report_path.read_text())
        except (OSError, ValueError):
            return {}

    def report_exists(self) -> bool:
        return self.report_path.exists()

    # reading rows

    def batches(self, columns: list[str] | None = None, *, batch_rows: int = 1024,
                out_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                manifest: Manifest | None = None, shards: Iterable[int] | None = None
                ) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """Streams rows of the index in shard order, reading only the requested columns; batches never span
        shards (each holds at most ``batch_rows`` rows of one shard).

        Args:
            columns: column names to read; None reads all, in manifest order.
            batch_rows: maximum rows per batch.
            out_dtype, device: of the returned tensors.
            manifest: the index's manifest, if already opened; by default ``manifest()``.
            shards: shard indices to read, in this order (e.g. those one worker owns); None reads all.

        Yields:
            (ids, {column: (n, width) tensor}) with n <= batch_rows. Tensors may share memory with the decoded
            batch; nothing else holds it. Every read is checked (``shard_batches``: footer, meta, page CRCs, rows).

        Raises:
            ConfigError: an unknown column (lists the available ones) or shard index.
            MissingShardError: a shard file is missing.
            CorruptShardError: a shard whose schema or row count disagrees with the manifest, or that pyarrow
                cannot read.
        """
        if batch_rows < 1:
            raise ConfigError(f"batch_rows must be >= 1, got {batch_rows}")
        if manifest is None:
            manifest = self.manifest()
        if columns is None:
            columns = list(manifest.columns)
        unknown = [c for c in columns if c not in manifest.columns]
        if unknown:
            raise ConfigError(f"unknown columns {unknown} in {self.path}; available: {list(manifest.columns)}")
        for record in _select_shards(manifest, shards):
            for batch in shard_batches(self.path, manifest, record, columns, batch_rows):
                ids = batch.column(ID_COLUMN).to_pylist()
                yield ids, {c: arrow_to_tensor(batch.column(c), manifest.dtype, out_dtype, device) for c in columns}

    def ids(self, manifest: Manifest | None = None, *, shards: Iterable[int] | None = None) -> list[str]:
        """Example ids of the index (or of the given shards), in order; reads only the ``example_id`` column."""
        if manifest is None:
            manifest = self.manifest()
        ids: list[str] = []
        for record in _select_shards(manifest, shards):
            for batch in shard_batches(self.path, manifest, record, [], batch_rows=1 << 16):
                ids.extend(batch.column(ID_COLUMN).to_pylist())
        return ids

    def ids_of_rows(self, manifest: Manifest, rows: Iterable[int]) -> dict[int, str]:
        """{global row: example id} of the given rows, reading the ``example_id`` column of their shards only (the
        ids of a top-k, without the index's N ids)."""
        rows = sorted(set(int(r) for r in rows))
        out = {}
        for shard in sorted({r // manifest.shard_size for r in rows}):
            start = shard * manifest.shard_size
            ids = self.ids(manifest, shards=[shard])
            out.update({r: ids[r - start] for r in rows if start <= r < start + len(ids)})
        return out

    # the K-FAC statistics

    def write_shard_statistics(self, shard: int, statistics: dict[str, dict[str, torch.Tensor]]) -> None:
        """One shard's statistics {layer: {field: tensor}}, atomically (before the shard's record commits)."""
        save_tensors(self.shard_statistics_path(shard), _flatten(statistics), {"shard": shard})

    def adopt_statistics(self, source: "IndexFolder") -> None:
        """Take the folded total of ``source`` (an index of the same model, data, f and seed: the dense index a
        factor index is derived from), checked whole first; called before the first shard is written, so every
        shard committed has its statistics."""
        load_tensors(source.statistics_path, rebuild=STATISTICS_REBUILD)  # a corrupt or missing total: refused
        with atomic_path(self.statistics_path) as tmp:
            shutil.copyfile(source.statistics_path, tmp)

    def folded_statistics(self, *, discard_corrupt: bool = False
                          ) -> tuple[dict[str, dict[str, torch.Tensor]], set[int]]:
        """The folded total {layer: {field: tensor}} and the shards it holds ({} and an empty set before the first
        fold), every tensor checked.

        Args:
            discard_corrupt: a total that does not match its checksums counts as absent (stage 1, which then
                recomputes every shard's statistics); else it raises.

        Raises:
            CorruptArtifactError: the total does not match its checksums.
        """
        path = self.statistics_path
        if not path.exists():
            return {}, set()
        try:
            tensors, meta = load_tensors(path, rebuild=STATISTICS_REBUILD)
        except (CorruptArtifactError, IndexMismatchError) as error:
            if not discard_corrupt:
                raise
            log.warning("%s: stage 1 sets it aside and recomputes the statistics of every shard", error)
            return {}, set()
        return _unflatten(tensors), set(meta["shards"])

    def has_statistics(self, shard: int) -> bool:
        """Whether shard ``shard``'s statistics are on disk: in its own file (its header checked; the fold reads
        and checks its tensors), or in the total (read and checked whole, once while its size and mtime stay the
        same: a corrupt total holds no shard)."""
        return shard in _held(self.shard_statistics_path(shard)) or shard in _held(self.statistics_path, total=True)

    def _shard_statistics_files(self) -> dict[int, Path]:
        return {int(p.stem.split("-")[1]): p for p in self.statistics_dir.glob("shard-*.safetensors")}

    def fold_statistics(self, is_committed: Callable[[int], bool]) -> int:
        """Add the statistics files of committed shards not yet in the total to it, then delete every file the
        total holds; returns the shards added. Called by the one process that commits shards (stage 1, under
        ``lock``); a corrupt total is replaced (its shards are no longer done).

        Raises:
            CorruptArtifactError: a shard's file was corrupt (removed: its shard is then redone).
        """
        remove_stale_temporaries(self.statistics_dir)
        total, shards = self.folded_statistics(discard_corrupt=True)
        files = self._shard_statistics_files()
        new, corrupt = [], []
        for shard in sorted(s for s in files if is_committed(s) and s not in shards):
            try:
                tensors, _ = load_tensors(files[shard], rebuild=STATISTICS_REBUILD)
            except (CorruptArtifactError, IndexMismatchError) as error:
                corrupt.append((shard, error))
                continue
            new.append(shard)
            for layer, part in _unflatten(tensors).items():
                total[layer] = ({field: total[layer][field] + t for field, t in part.items()}
                                if layer in total else part)
        if new:
            save_tensors(self.statistics_path, _flatten(total), {"shards": sorted(shards | set(new))})
        for shard, path in files.items():
            if shard in shards or shard in new or shard in dict(corrupt):
                path.unlink(missing_ok=True)  # a corrupt file goes too: its shard is then not done, and is redone
        if corrupt:
            raise CorruptArtifactError(f"{corrupt[0][1]} (removed; statistics of shards {[s for s, _ in corrupt]} "
                                       "were corrupt)")
        return len(new)

    def fold_now_and_then(self, is_committed: Callable[[int], bool]) -> None:
        """``fold_statistics`` once ``FOLD_EVERY`` shard files have accumulated (stage 1, after each commit)."""
        if len(self._shard_statistics_files()) >= FOLD_EVERY:
            self.fold_statistics(is_committed)

    def read_statistics(self, shards: Iterable[int], layers: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
        """{layer: {field: tensor}} of the whole index, for stage 2.

        Raises:
            IndexMismatchError: the index has no statistics (made before they were collected) or they do not
                cover exactly its shards, or a layer is missing.
            CorruptArtifactError: the statistics do not match their checksums (re-running stage 1 rebuilds them).
        """
        total, held = self.folded_statistics()
        shards = set(shards)
        if not total:
            raise IndexMismatchError(f"the index at {self.path} holds no K-FAC statistics ({STATISTICS_NAME}; an index "
                                     "made before stage 1 collected them): build it again in a fresh index_dir")
        if held != shards:
            raise IndexMismatchError(f"the K-FAC statistics of {self.path} cover {len(held & shards)} of its "
                                     f"{len(shards)} shards; re-run stage 1 to finish them")
        missing = [layer for layer in layers if layer not in total]
        if missing:
            raise IndexMismatchError(f"the K-FAC statistics of {self.path} lack layers {missing[:5]}")
        return total


def _select_shards(manifest: Manifest, shards: Iterable[int] | None) -> list[ShardRecord]:
    if shards is None:
        return manifest.shards
    records = {s.index: s for s in manifest.shards}
    shards = list(shards)
    unknown = [i for i in shards if i not in records]
    if unknown:
        raise ConfigError(f"no shards {some(unknown)} in the index; it has {len(records)} shards")
    return [records[i] for i in shards]


def _flatten(statistics: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{layer}/{field}": t for layer, fields in statistics.items() for field, t in fields.items()}


def _unflatten(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict] = {}
    for name, tensor in tensors.items():
        layer, field = name.rsplit("/", 1)
        layers.setdefault(layer, {})[field] = tensor
    return layers


def _held(path: Path, total: bool = False) -> frozenset:
    """The shards a statistics file holds (empty if it is missing or corrupt): the total read and checked whole,
    a shard's file by its header only (it is read whole once, by the fold)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return frozenset()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        try:
            meta = load_tensors(path, names=None if total else (lambda name: False), rebuild=STATISTICS_REBUILD)[1]
            held = frozenset(meta["shards"] if total else [meta["shard"]])
        except (CorruptArtifactError, IndexMismatchError, KeyError, TypeError) as error:
            log.warning("%s: the shards it holds count as lacking their statistics", error)
            held = frozenset()
        _CHECKED[key] = held
    return _CHECKED[key]
