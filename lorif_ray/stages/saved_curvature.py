"""The saved curvature (``<output_dir>/curvature/``): what made it, saving, loading, checking.

Every layer's ``Curvature`` (``lorif_ray.math.curvature``) is its own file ``<layer>.safetensors``, written
as soon as the layer is solved, so no process ever holds the curvature of every layer (V_r is D·r numbers
per layer: 253 GiB at 70B f=64 r=4096). ``_curvature.json`` is written last and removed when stage 2
starts: it holds the per-layer info (kind, λ, r), the ``method_meta`` that determines the curvature (the
method's curvature and its fit settings, the precision policy, the index) and its digest
``curvature_id``, which every layer file and the stored g'_t carry. A query is scored only by a curvature
whose ``method_meta`` equals what its own config asks for: any differing key is named and refused. A
stage 2 that stopped part-way keeps its finished layer files, and a re-run with the same settings fits
only the others.

Integrity (format 2): every layer file records a CRC-32 per tensor and of its meta (``save_tensors``),
checked whenever it is read; the header carries the CRC-32 of its own content (``integrity.seal``); the
per-layer info used to score (λ, r) is the layer file's own, checked against the header's. A re-run of
stage 2 checks every finished layer file whole and refits the corrupt ones. Format 1 (no checksums) is
refused by name: stage 2 rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Iterable

import torch

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError, CorruptArtifactError, IndexMismatchError
from lorif_ray.math.curvature import Curvature, curvature_class
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.store import (Manifest, contained, load_tensors, read_sealed_json, remove_stale_temporaries,
                             save_tensors, seal, write_json)

log = logging.getLogger(__name__)

HEADER_NAME = "_curvature.json"
FORMAT_VERSION = 2  # of the header and layer files: 1 had no checksums
REBUILD = "re-run stage 2 (jobs/curvature.py) with the same config: it checks every layer file and refits corrupt ones"
CURVATURE_WRITER = ("curvature", "stage 2 (jobs/curvature.py)")  # ``writer_lock(cfg.curvature_path, *CURVATURE_WRITER)``

# the config keys that change each curvature (its fit settings); RepSim ("none") has no curvature
FIT_KEYS = {"woodbury": ("r", "damping", "damping_scale", "oversample", "svd_power_iters", "seed"),
            "exact": ("damping", "damping_scale"), "kfac": ("damping", "damping_scale"),
            "ekfac": ("damping", "damping_scale"), "identity": (), "none": ()}


def curvature_meta(cfg: Config, manifest: Manifest) -> dict:
    """What determines the curvature: the method's curvature and fit settings, the policy, the index."""
    kind = cfg.curvature_kind
    fitted = bool(FIT_KEYS[kind])
    settings = {key: getattr(cfg, key) for key in FIT_KEYS[kind]}
    if "damping_scale" in settings and settings["damping_scale"] is None:  # the curvature's default, as a number
        settings["damping_scale"] = curvature_class(kind).default_damping_scale
    return {
        "method": cfg.method.name,
        "curvature": kind,
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


def curvature_id(meta: dict) -> str:
    """The digest of what determines a curvature."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def layer_path(directory, name: str) -> Path:
    """``<directory>/<layer>.safetensors``, checked to stay inside ``directory`` (layer names come from the
    manifest)."""
    return contained(directory, f"{name}.safetensors", source=f"layer {name!r} of the curvature in {directory}")


class CurvatureWriter:
    """Writes a curvature layer by layer into ``directory`` (removing a previous header and stale temporaries
    first). Call under the curvature folder's writer lock (``CURVATURE_WRITER``).

    Example:
        >>> writer = CurvatureWriter(cfg.curvature_path, meta)
        >>> if not writer.done("transformer.h.0.mlp.c_fc"):
        ...     writer.write("transformer.h.0.mlp.c_fc", curvature)
        >>> writer.finish({"precision": ...})        # after every layer
    """

    def __init__(self, directory, meta: dict):
        self.directory, self.meta, self.id = Path(directory), meta, curvature_id(meta)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / HEADER_NAME).unlink(missing_ok=True)
        remove_stale_temporaries(self.directory)
        self.layers: dict[str, dict] = {}

    def done(self, name: str) -> bool:
        """Whether a previous run already wrote this layer for the same curvature, intact (every tensor checked
        against its checksum); it is then adopted. A corrupt file is logged and refitted."""
        info = _layer_info(layer_path(self.directory, name), self.id)
        if info is None:
            return False
        self.layers[name] = info
        return True

    def write(self, name: str, curvature: Curvature) -> None:
        """The layer's file, atomically, tied to this curvature."""
        self.layers[name] = curvature.info()
        tensors = {field: t for field, t in curvature.tensors().items() if t is not None}
        save_tensors(layer_path(self.directory, name), tensors,
                     {"curvature_id": self.id, "info": self.layers[name], "format_version": FORMAT_VERSION})

    def finish(self, extra: dict | None = None) -> dict[str, dict]:
        """Write the header (last, sealed): the curvature is complete. Returns the per-layer info."""
        write_json(self.directory / HEADER_NAME, seal({"method_meta": self.meta, "kind": self.meta["curvature"],
                                                       "layers": self.layers, "curvature_id": self.id,
                                                       "format_version": FORMAT_VERSION, **(extra or {})}))
        return self.layers


def _layer_info(path: Path, curvature: str) -> dict | None:
    """The info of a layer file of curvature ``curvature`` whose every tensor matches its checksum; None (logged)
    if the file is missing, of another curvature or format, or corrupt."""
    if not path.exists():
        return None
    try:
        meta = load_tensors(path, rebuild=REBUILD)[1]
    except (CorruptArtifactError, IndexMismatchError) as error:
        log.warning("%s", error)
        return None
    if meta.get("curvature_id") != curvature or meta.get("format_version") != FORMAT_VERSION:
        return None
    return meta["info"]


def corrupt_layers(path, header: dict) -> list[str]:
    """The layers of a saved curvature whose files are missing, of another curvature or not intact (each file
    read whole and checked: stage 2 does this before it reuses a curvature)."""
    return [name for name in header["layers"] if _layer_info(layer_path(path, name), header["curvature_id"]) is None]


def curvature_header(path) -> dict:
    """The saved curvature's header (kind, per-layer info, ``method_meta``, ``curvature_id``)."""
    header = contained(path, HEADER_NAME, source=f"the curvature folder {path}")
    if not header.exists():
        raise ConfigError(f"no curvature at {path}; run stage 2 (jobs/curvature.py) first")
    return read_sealed_json(header, FORMAT_VERSION, REBUILD, older=" (before checksums)")


def curvature_exists(path) -> bool:
    return (Path(path) / HEADER_NAME).exists()


def check_curvature(cfg: Config, manifest: Manifest, header: dict | None = None) -> dict:
    """The header of ``cfg.curvature_path``, after checking that this config asks for exactly that curvature.

    Raises:
        ConfigError: there is no curvature file.
        IndexMismatchError: it was made with other settings, another policy or from another index
            (the differing keys are named).
    """
    header = header or curvature_header(cfg.curvature_path)
    diff = meta_diff(header.get("method_meta", {}), curvature_meta(cfg, manifest))
    if diff:
        raise IndexMismatchError(f"{cfg.curvature_path} was made with other settings than this config asks for "
                                 f"({', '.join(diff)} differ): re-run stage 2 with this config, or query with the "
                                 "curvature's settings")
    return header


def ranks(header: dict) -> dict[str, int]:
    """{layer: r} of the layers with a low-rank term, from a curvature header."""
    return {name: info["rank"] for name, info in header.get("layers", {}).items() if info.get("rank")}


def load_curvature(cfg: Config, manifest: Manifest, device, dtype, *, vectors: bool | Iterable[str] = True
                   ) -> dict[str, Curvature]:
    """The saved curvature of every layer ({} for RepSim), checked against the config (``check_curvature``).

    Args:
        vectors: which layers' V_r to read: all (True), none (False: λ and σ² only, enough to score
            against stored g'_t), or the named layers. V_r is most of the curvature (D·r per layer), and
            tensors not asked for are never read.
    """
    header = check_curvature(cfg, manifest)
    if header["kind"] == "none":
        return {}
    wanted_vectors = vectors if isinstance(vectors, bool) else set(vectors)
    kind = curvature_class(header["kind"])
    out = {}
    for spec in layer_specs(manifest):
        with_vectors = wanted_vectors if isinstance(wanted_vectors, bool) else spec.name in wanted_vectors
        path = layer_path(cfg.curvature_path, spec.name)
        if spec.name not in header["layers"] or not path.exists():
            raise CorruptArtifactError(f"the curvature at {cfg.curvature_path} has no layer {spec.name!r} ({path}); "
                                       f"{REBUILD}")
        tensors, meta = load_tensors(path, device=device, names=lambda field: with_vectors or field != "vectors",
                                     rebuild=REBUILD)
        if meta.get("curvature_id") != header["curvature_id"]:
            raise IndexMismatchError(f"{path} belongs to another curvature than {cfg.curvature_path}; re-run stage 2")
        if meta.get("info") != header["layers"][spec.name]:
            raise CorruptArtifactError(f"{path} says {meta.get('info')}, the header {header['layers'][spec.name]} "
                                       f"(one of them is corrupt); {REBUILD}")
        out[spec.name] = kind.from_saved(tensors, meta["info"]).to(dtype=dtype)
    return out


def read_curvature(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Every tensor of a saved curvature as {"<layer>.<field>": tensor}, and its header (tools and tests)."""
    header, tensors = curvature_header(path), {}
    for name in header["layers"]:
        layer_file = layer_path(path, name)
        if layer_file.exists():
            tensors.update({f"{name}.{field}": t for field, t in load_tensors(layer_file, rebuild=REBUILD)[0].items()})
    return tensors, header
