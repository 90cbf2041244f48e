"""The K-FAC statistics of an index (Ã, S̃ per layer, ``lorif_ray.math.kronecker.KroneckerStats``) on disk.

Stage 1 sums each shard's statistics while it featurizes the shard and writes them to
``<index>/_kronecker/shard-XXXXX.safetensors`` *before* the shard's record is committed (the leading "_"
keeps the index folder a Parquet dataset). ``fold_stats`` adds the files of committed shards into
``<index>/_kronecker.safetensors``, whose metadata lists the shards it holds, and only then deletes them:
a crash between the two leaves files whose shard is already listed, which the next fold skips. So every
shard counts exactly once, whichever shards a resumed run skips or recomputes (statistics are
deterministic, so a recomputed shard's equal the folded ones). Stage 1 folds as it goes (``FOLD_EVERY``
files) and at the end; stage 2 reads the total (``read_stats``), which must cover every shard. Every backend
of stage 1 writes a shard's file through ``lorif_ray.stages.index.FinishedShard.write`` (the statistics
first); an index derived from a dense one takes that index's total instead (``adopt_stats``).

A committed shard has its statistics, or it is not done: stage 1's writer asks ``has_stats`` (the shard is
in the total, or its own file is on disk and intact) before it counts a shard as finished, so a shard whose
statistics were lost (a second run into the same index, a deleted file, a corrupt total) is recomputed by
the next run instead of leaving an index that stage 2 refuses. Every file carries a CRC-32 per tensor,
checked whenever it is read (``lorif_ray.store.load_tensors``).

Size: (d1² + d2²) float64 per layer per file; 256 KiB per layer at d1 = d2 = 128 (70B at f=64), so the
unfolded files of a large model are folded every ``FOLD_EVERY`` shards rather than kept until the end.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Iterable

from lorif_ray.errors import CorruptArtifactError, IndexMismatchError
from lorif_ray.math.kronecker import KroneckerStats
from lorif_ray.store import atomic_path, contained, load_tensors, remove_stale_temporaries, save_tensors

log = logging.getLogger(__name__)

TOTAL_NAME = "_kronecker.safetensors"
SHARDS_DIR = "_kronecker"  # per-shard files; "_": dataset readers skip it (format 1 used "kronecker/")
FOLD_EVERY = 16  # unfolded shard files stage 1 lets accumulate before folding them
REBUILD = "re-run stage 1 (jobs/index.py) with the same config: it recomputes the shards whose statistics are lost"
# (path, size, mtime_ns) of a statistics file -> the shards it holds (checked whole), so stage 1 reads each once
_CHECKED: dict[tuple, frozenset] = {}


def shard_stats_path(index_path: str | Path, shard: int) -> Path:
    return Path(index_path) / SHARDS_DIR / f"shard-{shard:05d}.safetensors"


def _total_path(index_path: str | Path) -> Path:
    return contained(index_path, TOTAL_NAME, source=f"the index {index_path}")


def _flatten(stats: dict[str, KroneckerStats]) -> dict:
    return {f"{layer}/{key}": t for layer, s in stats.items() for key, t in s.tensors().items()}


def _unflatten(tensors: dict) -> dict[str, KroneckerStats]:
    layers: dict[str, dict] = {}
    for name, tensor in tensors.items():
        layer, key = name.rsplit("/", 1)
        layers.setdefault(layer, {})[key] = tensor
    return {layer: KroneckerStats.from_tensors(parts) for layer, parts in layers.items()}


def write_shard_stats(index_path: str | Path, shard: int, stats: dict[str, KroneckerStats]) -> None:
    """One shard's statistics {layer: KroneckerStats}, atomically (before the shard's record commits)."""
    save_tensors(shard_stats_path(index_path, shard), _flatten(stats), {"shard": shard})


def adopt_stats(source_index: str | Path, index_path: str | Path) -> None:
    """Give ``index_path`` the folded total of ``source_index`` (an index of the same model, data, f and seed: the
    dense index a factor index is derived from), checked whole first; stage 1 calls it before the index's first
    shard is written, so every shard it commits has its statistics (the total lists all of them)."""
    source = _total_path(source_index)
    load_tensors(source, rebuild=REBUILD)  # a corrupt or missing total is refused here, not copied
    with atomic_path(_total_path(index_path)) as tmp:
        shutil.copyfile(source, tmp)


def folded(index_path: str | Path, *, discard_corrupt: bool = False) -> tuple[dict[str, KroneckerStats], set[int]]:
    """The folded total and the shards it holds ({} and an empty set before the first fold), every tensor checked.

    Args:
        discard_corrupt: a total that does not match its checksums counts as absent (stage 1, which then
            recomputes every shard's statistics); else it raises.

    Raises:
        CorruptArtifactError: the total does not match its checksums (names it and ``REBUILD``).
    """
    path = _total_path(index_path)
    if not path.exists():
        return {}, set()
    try:
        tensors, meta = load_tensors(path, rebuild=REBUILD)
    except (CorruptArtifactError, IndexMismatchError) as error:
        if not discard_corrupt:
            raise
        log.warning("%s: stage 1 sets it aside and recomputes the statistics of every shard", error)
        return {}, set()
    return _unflatten(tensors), set(meta["shards"])


def has_stats(index_path: str | Path, shard: int) -> bool:
    """Whether shard ``shard``'s statistics are on disk: in its own file (its header checked; the fold reads
    and checks its tensors), or in the total (read and checked whole, once while its size and mtime stay the
    same: a corrupt total holds no shard)."""
    return shard in _held(shard_stats_path(index_path, shard)) or shard in _held(_total_path(index_path), total=True)


def stats_check(index_path: str | Path, meta: dict) -> Callable[[int], bool] | None:
    """What else a shard of this index needs to count as done (``ShardWriter(also_done=...)``): its statistics,
    when the index collects them (``meta["kronecker_stats"]``); None otherwise."""
    return (lambda shard: has_stats(index_path, shard)) if meta.get("kronecker_stats") else None


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
            meta = load_tensors(path, names=None if total else (lambda name: False), rebuild=REBUILD)[1]
            held = frozenset(meta["shards"] if total else [meta["shard"]])
        except (CorruptArtifactError, IndexMismatchError, KeyError, TypeError) as error:
            log.warning("%s: the shards it holds count as lacking their statistics", error)
            held = frozenset()
        _CHECKED[key] = held
    return _CHECKED[key]


def _shard_files(index_path: str | Path) -> dict[int, Path]:
    return {int(p.stem.split("-")[1]): p for p in (Path(index_path) / SHARDS_DIR).glob("shard-*.safetensors")}


def fold_stats(index_path: str | Path, is_committed: Callable[[int], bool]) -> int:
    """Add the statistics files of committed shards not yet in the total to it, then delete every file the
    total holds; returns the shards added. Called by the one process that commits shards (stage 1, which
    holds the index's writer lock); a corrupt total is replaced (its shards are no longer done)."""
    remove_stale_temporaries(Path(index_path) / SHARDS_DIR)
    total, shards = folded(index_path, discard_corrupt=True)
    files = _shard_files(index_path)
    new, corrupt = [], []
    for shard in sorted(s for s in files if is_committed(s) and s not in shards):
        try:
            tensors, _ = load_tensors(files[shard], rebuild=REBUILD)
        except (CorruptArtifactError, IndexMismatchError) as error:
            corrupt.append((shard, error))
            continue
        new.append(shard)
        for layer, part in _unflatten(tensors).items():
            total[layer] = total[layer] + part if layer in total else part
    if new:
        save_tensors(_total_path(index_path), _flatten(total), {"shards": sorted(shards | set(new))})
    for shard, path in files.items():
        if shard in shards or shard in new or shard in dict(corrupt):
            path.unlink(missing_ok=True)  # a corrupt file goes too: its shard is then not done, and is redone
    if corrupt:
        raise CorruptArtifactError(f"{corrupt[0][1]} (removed; statistics of shards {[s for s, _ in corrupt]} were "
                                   "corrupt)")
    return len(new)


def fold_now_and_then(index_path: str | Path, is_committed: Callable[[int], bool]) -> None:
    """``fold_stats`` once ``FOLD_EVERY`` shard files have accumulated (stage 1, after each commit)."""
    if len(_shard_files(index_path)) >= FOLD_EVERY:
        fold_stats(index_path, is_committed)


def read_stats(index_path: str | Path, shards: Iterable[int], layers: Iterable[str]) -> dict[str, KroneckerStats]:
    """{layer: KroneckerStats} of the whole index, for stage 2.

    Raises:
        IndexMismatchError: the index has no statistics (made before they were collected) or they do not
            cover exactly its shards, or a layer is missing.
        CorruptArtifactError: the statistics do not match their checksums (re-running stage 1 rebuilds them).
    """
    total, held = folded(index_path)
    shards = set(shards)
    if not total:
        raise IndexMismatchError(f"the index at {index_path} holds no K-FAC statistics ({TOTAL_NAME}; an index made "
                                 "before stage 1 collected them): build it again in a fresh index_dir")
    if held != shards:
        raise IndexMismatchError(f"the K-FAC statistics of {index_path} cover {len(held & shards)} of its "
                                 f"{len(shards)} shards; re-run stage 1 to finish them")
    missing = [layer for layer in layers if layer not in total]
    if missing:
        raise IndexMismatchError(f"the K-FAC statistics of {index_path} lack layers {missing[:5]}")
    return total
