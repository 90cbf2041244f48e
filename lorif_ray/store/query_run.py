"""A query run — what stage 3 writes to ``output_dir`` — as one artifact with one owner: ``QueryRun``.

Files (``FILES``; the record and the first four are always written):

    query_run.json           the run record: format, run id, the files this run wrote, counts, what made it
    topk.parquet             query_id, query_text, rank, train_id, train_text, score (rank 1 = largest score)
    opponents.parquet        the same columns for the bottom-k (rank 1 = the most negative score)
    queries.parquet          one row per query: query_id, query_text, query_prompt, source_id, score_bins
                             (a histogram of the query's scores against every training row, ``SCORE_BINS``)
    report.html              the page of the run (``lorif_ray.outputs.report_page``)
    scores.npy, scores.json  query.full_scores: (queries, N) float32, input order; the ids of both axes
    tokens.parquet           query.per_token: one row per token row: token_id (``<query id>@<position>``),
                             query_id, position, token, best_score, best_train_id, score_on_top_proponent
    topk_per_token.parquet   query.per_token: token_id, query_id, position, token, rank, train_id, train_text, score
    token_scores.npy, .json  query.per_token with full_scores: (token rows, N) float32; their ids
    layer_scores.npy, .json  query.per_layer: (layers, queries, N) float32; layer names and ids
    self_influence.parquet   query.self_influence: train_id, self_influence

Every Parquet file and JSON sidecar carries the run's id (``run_id``) and ``format``. The record is written
last, and committing a run removes the files of an earlier run in the folder that this run did not write, so
a reader never mixes two runs: ``QueryRun.open`` takes only the files the record lists and refuses one that
carries another run's id (a run that stopped part-way) or an older format, by name. The record is sealed
(``store.seal``: a CRC-32 of its own content) and holds the SHA-256 of every table, sidecar and page it lists,
checked when the file is read (a ``QueryRunError`` naming a changed file); the ``.npy`` arrays, memory-mapped
for the caller and as large as queries × N, are not re-hashed on read.

Example:
    >>> run = QueryRun.open("out")  # doctest: +SKIP
    >>> run.table("topk").num_rows, run.has("scores")  # doctest: +SKIP
    (60, False)
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lorif_ray.errors import CorruptArtifactError, QueryRunError
from lorif_ray.store.artifacts import (atomic_path, file_sha256, preallocated_memmap, read_table_meta, temporary_path,
                                       write_json, write_tables)
from lorif_ray.store.integrity import seal, unseal

log = logging.getLogger(__name__)

QUERY_RUN_FORMAT = 2  # 2: texts in the tables, opponents, queries only in scores.npy, token rows apart, the record
RECORD_NAME = "query_run.json"
FILES = {  # name → file, in the order a reader lists them
    "topk": "topk.parquet", "opponents": "opponents.parquet", "queries": "queries.parquet", "report": "report.html",
    "scores": "scores.npy", "scores_ids": "scores.json", "tokens": "tokens.parquet",
    "token_topk": "topk_per_token.parquet", "token_scores": "token_scores.npy", "token_scores_ids": "token_scores.json",
    "layer_scores": "layer_scores.npy", "layer_scores_ids": "layer_scores.json",
    "self_influence": "self_influence.parquet",
}

# queries.parquet's score_bins: counts of a query's scores in signed log bins, the same for every run and worker
# (so parts add exactly). Bin HALF holds |s| < 2^-64; bin HALF + 1 + l holds s in [2^(l/B - 64), 2^((l+1)/B - 64))
# and bin HALF - 1 - l the same magnitudes below zero, l = 0 … HALF - 1 (the last takes every larger |s|).
BINS_PER_OCTAVE = 4
SCORE_OCTAVES = 128  # 2^-64 … 2^64
HALF = SCORE_OCTAVES * BINS_PER_OCTAVE
NUM_SCORE_BINS = 2 * HALF + 1


def score_bin_edges() -> np.ndarray:
    """(NUM_SCORE_BINS, 2) [low, high) of every score bin (the outer two bins reach ±inf)."""
    magnitude = 2.0 ** (np.arange(HALF + 1) / BINS_PER_OCTAVE - SCORE_OCTAVES / 2)  # edges of l = 0 … HALF - 1
    low, high = magnitude[:-1].copy(), magnitude[1:].copy()
    high[-1] = np.inf
    positive = np.stack([low, high], axis=1)
    negative = -positive[::-1, ::-1]
    zero = np.array([[-magnitude[0], magnitude[0]]])
    return np.concatenate([negative, zero, positive])


class QueryRun:
    """The files of one query run in a folder: written through it (``begin`` … ``commit``), read through it
    (``open``). Names are the keys of ``FILES`` (``"topk"``, ``"scores"``, …).

    Attributes:
        directory: the output folder.
        record: the run record (``query_run.json``): format, run_id, created, the files this run wrote (their
            names), the counts ``begin`` was given (queries, tokens, train, top_k, texts) and ``meta``.
    """

    def __init__(self, directory: str | os.PathLike, record: dict):
        self.directory, self.record = Path(directory), record

    # -- writing ---------------------------------------------------------------------------------------------
    @classmethod
    def begin(cls, directory: str | os.PathLike, meta: dict, **facts) -> "QueryRun":
        """A new run in ``directory`` (nothing is written until its files are); ``meta`` (config, score meaning,
        route, precision) goes into every table and sidecar it writes, ``facts`` (counts: queries, tokens, train,
        top_k) into the record."""
        record = {"format": QUERY_RUN_FORMAT, "run_id": uuid.uuid4().hex, "created": time.time(), "files": [],
                  "sha256": {}, **facts, "meta": meta}
        return cls(directory, record)

    @property
    def run_id(self) -> str:
        return self.record["run_id"]

    @property
    def meta(self) -> dict:
        """What made the run (config, index, score meaning, route, precision)."""
        return self.record["meta"]

    def path(self, name: str) -> Path:
        return self.directory / FILES[name]

    def _stamp(self, extra: dict | None = None) -> dict:
        return {**self.meta, **(extra or {}), "format": QUERY_RUN_FORMAT, "run_id": self.run_id}

    def _wrote(self, name: str, digest: str | None = None) -> None:
        """Record a file of the run (with its SHA-256, for those its reader checks)."""
        if FILES[name] not in self.record["files"]:
            self.record["files"].append(FILES[name])
        if digest is not None:
            self.record["sha256"][FILES[name]] = digest

    def write_table(self, name: str, table: pa.Table, meta: dict | None = None) -> None:
        """A Parquet file of the run, atomically, with the run's meta (+ ``meta``) under ``lorif.meta``."""
        self.write_tables(name, table.schema, [table], meta)

    def write_tables(self, name: str, schema: pa.Schema, tables: Iterable[pa.Table], meta: dict | None = None) -> None:
        """``write_table`` of tables written one after another (a file larger than memory)."""
        self._wrote(name, write_tables(self.path(name), schema, tables, self._stamp(meta)))

    def write_json(self, name: str, obj: dict) -> None:
        """A JSON sidecar of the run, with the run's meta."""
        write_json(self.path(name), {**self._stamp(), **obj})
        self._wrote(name, file_sha256(self.path(name)))

    def write_text(self, name: str, text: str) -> None:
        with atomic_path(self.path(name)) as tmp:
            tmp.write_text(text, encoding="utf-8")
        self._wrote(name, file_sha256(self.path(name)))

    @contextmanager
    def arrays(self, shapes: dict[str, tuple[tuple[int, ...], type]], scratch: dict | None = None
               ) -> Iterator[dict[str, str]]:
        """Preallocated ``.npy`` files {name: (shape, dtype)} (a full disk fails here, before any work) under
        temporary names that replace the run's files only when the body succeeds; ``scratch`` {name: (shape,
        dtype)}: temporary files removed afterwards either way. Yields {name: temporary path}."""
        paths = {}
        with ExitStack() as stack:
            for name, (shape, dtype) in {**shapes, **(scratch or {})}.items():
                if name in shapes:
                    tmp = stack.enter_context(atomic_path(self.path(name)))
                else:
                    tmp = temporary_path(self.directory / f"{name}.npy")
                    stack.callback(tmp.unlink, missing_ok=True)
                array = preallocated_memmap(tmp, dtype, shape)
                array.flush()
                del array
                paths[name] = str(tmp)
            yield paths
        for name in shapes:
            self._wrote(name)

    def commit(self) -> dict:
        """Write the record, last; then remove the files of an earlier run here that this run did not write.
        Returns the record."""
        previous = _read_record(self.directory)
        write_json(self.directory / RECORD_NAME, seal(self.record))
        stale = set(FILES.values()) - set(self.record["files"])
        removed = [file for file in sorted(stale) if (self.directory / file).is_file()]
        for file in removed:
            (self.directory / file).unlink()
        if removed:
            log.info("removed %s of the earlier query run in %s (%s)", ", ".join(removed), self.directory,
                     (previous or {}).get("run_id", "a run before query_run.json"))
        return self.record

    # -- reading ---------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: str | os.PathLike) -> "QueryRun":
        """The run recorded in ``directory``.

        Raises:
            QueryRunError: no query run there, one written before the run record (format 1), or another format.
        """
        directory = Path(directory)
        record = _read_record(directory)
        if record is None:
            if (directory / FILES["topk"]).is_file():
                raise QueryRunError(f"{directory} holds a query run of format 1 (topk.parquet without "
                                    f"{RECORD_NAME}, written before lorif-ray kept texts, opponents and a run record): "
                                    "run the query again into this folder (jobs/query.py or Attributor.query; the "
                                    "index and curvature are reused) to rewrite it")
            raise QueryRunError(f"{directory} holds no query run ({RECORD_NAME} missing): run stage 3 "
                                "(jobs/query.py, jobs/attribute.py or Attributor.query) with output_dir there")
        if record.get("format") != QUERY_RUN_FORMAT:
            raise QueryRunError(f"{directory / RECORD_NAME}: query run format {record.get('format')!r}; this version "
                                f"reads format {QUERY_RUN_FORMAT}: run the query again to rewrite it")
        return cls(directory, record)

    def has(self, name: str) -> bool:
        """Whether this run wrote ``name``."""
        return FILES[name] in self.record["files"]

    def _verified(self, name: str) -> Path:
        """The path of one of the run's files, after checking its bytes against the record's SHA-256."""
        path = self.path(name)
        recorded = self.record.get("sha256", {}).get(FILES[name])
        if recorded is not None and (not path.is_file() or file_sha256(path) != recorded):
            state = ("is missing" if not path.is_file() else
                     "does not match the checksum this run recorded (a file of another run, or corrupt)")
            raise QueryRunError(f"{path} {state}: run the query again into {self.directory} (the index and curvature "
                                "are reused)")
        return path

    def _check(self, name: str, meta: dict) -> None:
        if meta.get("run_id") != self.run_id:
            raise QueryRunError(f"{self.path(name)} belongs to another query run than {self.directory / RECORD_NAME}"
                                " (a run stopped part-way, or files were copied in): run the query again")

    def table(self, name: str, columns: list[str] | None = None) -> pa.Table | None:
        """A Parquet file of the run (None: this run did not write it), checked to be this run's."""
        if not self.has(name):
            return None
        path = self._verified(name)
        self._check(name, read_table_meta(path))
        with pq.ParquetFile(path, page_checksum_verification=True) as file:
            return file.read(columns=columns)

    def table_meta(self, name: str) -> dict:
        """The ``lorif.meta`` of one of the run's Parquet files."""
        return read_table_meta(self.path(name))

    def sidecar(self, name: str) -> dict | None:
        """A JSON sidecar of the run (None: not written), checked to be this run's."""
        if not self.has(name):
            return None
        obj = json.loads(self._verified(name).read_text())
        self._check(name, obj)
        return obj

    def array(self, name: str) -> np.ndarray | None:
        """A ``.npy`` file of the run, memory-mapped read-only (None: not written)."""
        if not self.has(name):
            return None
        return np.load(self.path(name), mmap_mode="r")


def _read_record(directory: Path) -> dict | None:
    path = directory / RECORD_NAME
    if not path.is_file():
        return None
    try:
        return unseal(json.loads(path.read_text()), path, "run the query again", error=_CorruptRecord)
    except (OSError, ValueError) as error:
        raise QueryRunError(f"{path}: unreadable run record ({error}); run the query again") from error


class _CorruptRecord(QueryRunError, CorruptArtifactError):
    """A run record that does not match its own checksum."""

