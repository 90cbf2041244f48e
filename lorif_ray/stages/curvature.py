"""Stage 2: the curvature of every layer from the index, and optionally the stored g'_t of every row.

One driver, ``run_curvature``, for every placement of the rows. Layers are fitted in groups: the fitting
of each layer (a ``Curvature.steps`` generator, ``lorif_ray.math.curvature``) asks for GᵀG Q or GᵀG,
and one pass over the rows (``GramPass``) answers every layer of the group, so a streamed index is read
once per pass, not once per layer per pass. A *Gram backend* gives each group's pass: in this process
``LocalGram`` (the group's row source, ``lorif_ray.stages.rows.layer_rows``: resident on the device when the
rows fit, else streamed from Parquet); on Ray
``lorif_ray.distributed.gram.RayGram``, whose actors each run the same pass over their shard group
and return partial sums. Where the rows live changes the speed, never the numbers
(tests/stages/test_paths.py). Each layer's curvature is written as soon as its group is solved
(``CurvatureWriter``), so the driver holds one group's D×k iterates at a time, never the whole curvature.
Every file is named, written and read by the folder's store class (``lorif_ray.store.CurvatureFolder``).

With ``query.store_coordinates`` every low-rank layer's g'_t = V_rᵀ g_t is written for every row
(``CoordinateWriter``), in ``precision.coordinates``, by one more pass per group. A curvature made with the
same settings from the same index is reused once every file of it has been read and checked against its
checksums; one interrupted part-way (or with corrupt layer files) keeps its intact layers and refits the
others. One run writes a curvature folder at a time (its writer lock, ``CurvatureFolder.lock``).

What a curvature is made of (``curvature_meta``: the method's curvature and fit settings, the policy, the
index) is compared with what a config asks for before it is used (``check_curvature``, ``load_curvature``):
any differing key is named and refused.

The progress bar counts rows over every pass of every group, per row block (on Ray, as the Gram actors
report them); its total is known up front, as each curvature says how many passes it asks for
(``Curvature.row_passes``).
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

import torch

from lorif_ray.config import Config
from lorif_ray.errors import CorruptArtifactError, IndexMismatchError
from lorif_ray.math.curvature import Curvature, FitSettings, fit_layers
from lorif_ray.math.kronecker import KroneckerStats
from lorif_ray.math.rsvd import GramPass
from lorif_ray.model.loading import resolve_device
from lorif_ray.precision import Precision, warn_if_unsafe
from lorif_ray.progress import progress_bar
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.stages.inputs import check_method_matches_index, layer_specs
from lorif_ray.stages.rows import layer_rows
from lorif_ray.store import CurvatureFolder, IndexFolder, Manifest
from lorif_ray.store.curvature_folder import write_rows

log = logging.getLogger(__name__)

GROUP_BYTES = 1 << 30  # the driver's iterates of one group of layers (Q and GᵀG Q, D×k each, or D×D)

def curvature_meta(cfg: Config, manifest: Manifest) -> dict:
    """What determines the curvature: the method's curvature and fit settings, the policy, the index."""
    curvature = Curvature.of(cfg.curvature_kind)
    settings = {key: getattr(cfg, key) for key in curvature.fit_keys}  # the keys that change the fit
    if "damping_scale" in settings and settings["damping_scale"] is None:  # the curvature's default, as a number
        settings["damping_scale"] = curvature.default_damping_scale
    fitted = bool(curvature.fit_keys)
    return {
        "method": cfg.method.name,
        "curvature": curvature.kind,
        "config": settings,
        "precision": {"math": cfg.precision.math, "matmul": cfg.precision.matmul} if fitted else {},
        "index": {"model": manifest.meta["model"], "config": manifest.meta["config"],
                  "shards": [r.sha256 for r in manifest.shards]},
    }


def meta_diff(saved: dict, expected: dict) -> list[str]:
    """Dotted keys whose values differ between two ``curvature_meta`` dicts."""
    out = []
    for key in sorted(set(saved) | set(expected)):
        a, b = saved.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "index":
            out += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(key)
    return out


def check_curvature(folder: CurvatureFolder, cfg: Config, manifest: Manifest, header: dict | None = None) -> dict:
    """The header of ``folder``, after checking that this config asks for exactly that curvature.

    Raises:
        ConfigError: there is no curvature file.
        IndexMismatchError: it was made with other settings, another policy or from another index
            (the differing keys are named).
    """
    header = header or folder.header()
    diff = meta_diff(header.get("method_meta", {}), curvature_meta(cfg, manifest))
    if diff:
        raise IndexMismatchError(f"{folder.path} was made with other settings than this config asks for "
                                 f"({', '.join(diff)} differ): re-run stage 2 with this config, or query with the "
                                 "curvature's settings")
    return header


def load_curvature(folder: CurvatureFolder, cfg: Config, manifest: Manifest, device, dtype, *,
                   vectors: bool | Iterable[str] = True) -> dict[str, Curvature]:
    """The saved curvature of every layer ({} for RepSim), checked against the config (``check_curvature``).

    Args:
        vectors: which layers' V_r to read: all (True), none (False: λ and σ² only, enough to score
            against stored g'_t), or the named layers. V_r is most of the curvature (D·r per layer), and
            tensors not asked for are never read.
    """
    return read_curvature(folder, check_curvature(folder, cfg, manifest), manifest, device, dtype, vectors=vectors)


def read_curvature(folder: CurvatureFolder, header: dict, manifest: Manifest, device, dtype, *,
                   vectors: bool | Iterable[str] = True) -> dict[str, Curvature]:
    """The saved curvature of every layer of ``manifest`` ({} for RepSim), from a header already checked
    (``check_curvature``, or ``lorif_ray.stages.score``'s check for live rows); ``vectors`` as ``load_curvature``."""
    kind = Curvature.of(header["kind"])
    if not kind.scores_gradients:
        return {}
    wanted = vectors if isinstance(vectors, bool) else set(vectors)
    out = {}
    for spec in layer_specs(manifest):
        with_vectors = wanted if isinstance(wanted, bool) else spec.name in wanted
        tensors, info = folder.read_layer(spec.name, header, device,
                                          names=lambda field: with_vectors or field != "vectors")
        out[spec.name] = kind.from_saved(tensors, info).to(dtype=dtype)
    return out


class LayerGram(GramPass):
    """The Gram pass over some layers' rows in this process (all rows, or a Ray actor's shard group, from global
    row ``rows.offset``), which can also write those rows' g'_t."""

    def write_coordinates(self, vectors: dict[str, torch.Tensor], paths: dict[str, str], dtype: str,
                          block_rows: int) -> dict[str, dict[int, int]]:
        """g'_t = V_rᵀ g_t of these rows into their rows of each layer's file (one pass); returns each layer's
        {block: CRC-32} of the blocks of ``block_rows`` rows written (``write_rows``)."""
        return {name: write_rows(paths[name], self.rows.offset, values, dtype, block_rows)
                for name, values in self.project(vectors).items()}


class LocalGram:
    """The Gram backend of one process: a group's rows resident on ``device`` when they fit, else streamed.

    Args:
        resident: force (True) or forbid (False) resident rows; None = when they fit.
    """

    def __init__(self, cfg: Config, manifest: Manifest, precision: Precision, device, resident: bool | None = None):
        self.cfg, self.manifest, self.precision, self.device = cfg, manifest, precision, device
        self.resident = resident

    def layers(self, specs: list[LayerSpec], on_rows=None) -> LayerGram:
        """The pass over these layers' rows; ``on_rows`` gets each row block's size, on every pass."""
        rows = layer_rows(IndexFolder(self.cfg.index_path), self.manifest, specs, dtype=self.precision.math,
                          device=self.device, batch_rows=self.cfg.query.train_batch_rows, resident=self.resident)
        gram = LayerGram(rows, self.precision.matmul)
        gram.on_rows = on_rows
        return gram

    def close(self) -> None:
        pass


def fit_settings(cfg: Config, dtype: torch.dtype, device, rows: int | None = None) -> FitSettings:
    """The ``FitSettings`` of ``cfg``'s curvature, fitted in ``dtype`` on ``device`` over ``rows`` rows (N)."""
    return FitSettings(rank=cfg.r, damping=cfg.damping, damping_scale=cfg.damping_scale, oversample=cfg.oversample,
                       power_iters=cfg.svd_power_iters, seed=cfg.seed, dtype=dtype, device=device, rows=rows)


def layer_groups(specs: list[LayerSpec], cfg: Config, budget: int | None = None,
                 rows: int | None = None) -> list[list[LayerSpec]]:
    """Consecutive layers fitted together: what the driver holds for them (``Curvature.fit_numbers``, float64,
    over ``rows`` rows) within ``budget`` bytes (default ``GROUP_BYTES``); a larger layer is a group of its own."""
    budget = GROUP_BYTES if budget is None else budget
    curvature, settings = Curvature.of(cfg.curvature_kind), fit_settings(cfg, torch.float64, "cpu", rows)
    groups, current, used = [], [], 0
    for spec in specs:
        size = 8 * curvature.fit_numbers(spec.d1, spec.d2, settings)
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(spec)
        used += size
    return groups + ([current] if current else [])


def prepare_curvature(cfg: Config, folder: CurvatureFolder) -> tuple[Manifest, dict, bool]:
    """Open the index (its files' sizes checked; their contents as they are read); the curvature's
    metadata; whether the curvature in ``folder`` (and, if asked, stored g'_t) already matches it."""
    manifest = IndexFolder(cfg.index_path).manifest()
    check_method_matches_index(cfg, manifest)
    meta = curvature_meta(cfg, manifest)
    return manifest, meta, reusable_curvature(cfg, folder, meta)


def reusable_curvature(cfg: Config, folder: CurvatureFolder, meta: dict) -> bool:
    """Whether the curvature in ``folder`` (and, if asked, the stored g'_t) was made for ``meta`` and every file
    of it is intact (each read whole and checked); what is not is logged, and stage 2 rebuilds it."""
    if not folder.exists():
        return False
    try:
        header = folder.header()
        if header.get("method_meta") != meta:
            return False
        corrupt = folder.corrupt_layers(header)
        if corrupt:
            log.warning("stage 2: layers %s of %s are missing or corrupt: refitting them", corrupt, folder.path)
            return False
        if stores_coordinates(cfg):
            if not folder.coordinates_match(cfg.precision.coordinates):
                return False
            folder.stored_coordinates().verify()
    except (CorruptArtifactError, IndexMismatchError) as error:
        log.warning("stage 2: %s", error)
        return False
    return True


def group_passes(group: list[LayerSpec], cfg: Config, settings: FitSettings) -> int:
    """Passes over a group's rows: the most any of its layers' fits asks for (they run in lockstep), and one
    more to write g'_t."""
    fit = max(Curvature.of(cfg.curvature_kind).row_passes(s.dim, settings) for s in group)
    return fit + int(stores_coordinates(cfg))


def stores_coordinates(cfg: Config) -> bool:
    """Whether stage 2 writes g'_t: asked for, and the curvature has a low-rank term."""
    return cfg.query.store_coordinates and Curvature.of(cfg.curvature_kind).truncates


def reused_curvature_report(folder: CurvatureFolder) -> dict:
    """The report of a saved curvature this run reuses: its kind and the timing the run that fitted it recorded
    (``seconds`` None for a curvature saved before headers kept it)."""
    header = folder.header()
    return {"reused": True, "path": str(folder.path), "kind": header.get("kind"),
            "seconds": header.get("seconds"), "layers": header.get("layers", {}),
            "precision": header.get("precision")}


def clamped_ranks(cfg: Config, specs: list[LayerSpec], folder: CurvatureFolder) -> dict:
    """{"r": {"asked": r, "used": {layer: D}}} of the Woodbury layers narrower than ``r`` (their curvature keeps
    r = D, the whole spectrum), logged once; {} when none is (or the curvature has no r)."""
    if not Curvature.of(cfg.curvature_kind).truncates:
        return {}
    used = {s.name: s.dim for s in specs if cfg.r > s.dim}
    if not used:
        return {}
    shown = ", ".join(f"{name} (r={dim})" for name, dim in list(used.items())[:10]) + (" ..." if len(used) > 10 else "")
    log.warning("r=%d is larger than D of %d of %d layers; they keep r = D (the whole spectrum), recorded under "
                "'clamped' in %s: %s", cfg.r, len(used), len(specs), folder.header_path, shown)
    return {"r": {"asked": cfg.r, "used": used}}


def run_curvature(cfg: Config, backend_class=LocalGram) -> dict:
    """Fit and save the curvature of every layer into the folder at ``cfg.curvature_path``; returns the stage
    report.

    Args:
        backend_class: ``(cfg, manifest, precision, device) →`` where the rows are: ``layers(specs, on_rows)``
            gives a ``LayerGram``-like pass over those layers' rows (``on_rows``: the bar's ``update``, called
            per row block of every pass, or None), ``close()`` releases it; default ``LocalGram`` (this process).

    The bar counts rows over all passes of all groups (``group_passes``), or layers when the curvature reads
    no rows (K-FAC, identity).
    """
    folder = CurvatureFolder(cfg.curvature_path)
    manifest, meta, reusable = prepare_curvature(cfg, folder)
    if reusable:
        log.info("stage 2: reusing %s (same settings, same index)", folder.path)
        return reused_curvature_report(folder)
    with folder.lock():
        return _fit_curvature(cfg, folder, manifest, meta, backend_class)


def _fit_curvature(cfg: Config, folder: CurvatureFolder, manifest: Manifest, meta: dict, backend_class) -> dict:
    """``run_curvature``'s work, under the curvature folder's writer lock."""
    warn_if_unsafe(cfg)
    device = resolve_device(cfg.model.device)
    precision = Precision.of(cfg, device)
    kind = Curvature.of(cfg.curvature_kind)
    specs = layer_specs(manifest) if kind.scores_gradients else []
    store = stores_coordinates(cfg)
    writer = folder.writer(meta)
    coordinates = folder.coordinate_writer(manifest.num_rows, cfg.precision.coordinates,
                                           manifest.shard_size) if store else None
    clamped = clamped_ranks(cfg, specs, folder)
    todo = [s for s in specs if store or not writer.done(s.name)]  # g'_t files carry no id: refit them all
    if len(todo) < len(specs):
        log.info("stage 2: %d of %d layers were finished by an earlier run; fitting the others",
                 len(specs) - len(todo), len(specs))
    settings = fit_settings(cfg, precision.math, device, manifest.num_rows)
    stats = None
    if todo and kind.needs_stats:
        stored = IndexFolder(cfg.index_path).read_statistics([r.index for r in manifest.shards], [s.name for s in todo])
        stats = {layer: KroneckerStats.from_tensors(tensors) for layer, tensors in stored.items()}
    reads_rows = bool(todo) and kind.reads_rows
    backend = backend_class(cfg, manifest, precision, device) if reads_rows else None
    groups = layer_groups(todo, cfg, rows=manifest.num_rows)
    if reads_rows:
        total, unit = sum(group_passes(g, cfg, settings) for g in groups) * manifest.num_rows, "row"
    else:
        total, unit = len(todo), "layer"
    start = time.perf_counter()
    try:
        with progress_bar(total, "stage 2: curvature", unit, cfg.progress) as bar:
            on_rows = bar.update if cfg.progress else None
            for number, group in enumerate(groups, 1):
                bar.set_postfix_str(f"layer group {number}/{len(groups)}", refresh=False)
                gram = backend.layers(group, on_rows) if backend is not None else None
                steps = {s.name: kind.steps(s.dim, s.name, settings) for s in group}
                fitted = fit_layers(steps, gram, stats)
                for name, curvature in fitted.items():
                    writer.write(name, curvature)
                if coordinates is not None:
                    paths = {name: coordinates.begin(name, c.rank) for name, c in fitted.items()}
                    checksums = gram.write_coordinates({name: c.low_rank[0] for name, c in fitted.items()}, paths,
                                                       cfg.precision.coordinates, manifest.shard_size)
                    for name in fitted:
                        coordinates.commit(name, checksums[name])
                del gram, fitted
                if not reads_rows:
                    bar.update(len(group))
    finally:
        if backend is not None:
            backend.close()
    seconds = time.perf_counter() - start
    # a reuse reports these seconds
    layers = writer.finish({"precision": precision.describe(), "seconds": seconds,
                            **({"clamped": clamped} if clamped else {})})
    report = {"reused": False, "path": str(folder.path), "kind": kind.kind, "seconds": seconds, "layers": layers,
              "fitted_layers": len(todo), "bytes": folder.layer_bytes(), "precision": precision.describe(),
              **({"clamped": clamped} if clamped else {})}
    if coordinates is not None:
        report["coordinates"] = coordinates.finish()
    return report
