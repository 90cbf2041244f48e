"""The curvature file (``<output_dir>/curvature.safetensors``): what made it, saving, loading, checking.

Every layer's ``Curvature`` (``lorif_ray.math.curvature``) is saved as ``<layer>.<field>`` tensors; the
header holds the per-layer info (kind, λ, r), the ``method_meta`` that determines the file (the method's
curvature and its fit settings, the precision policy, the index) and its digest ``curvature_id``, which
stored g'_t are tied to. A query is scored only by a curvature whose ``method_meta`` equals what its own
config asks for: any differing key (r, damping, precision, the index …) is named and refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import torch

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.math.curvature import Curvature, curvature_class
from lorif_ray.stages.inputs import layer_specs
from lorif_ray.store import Manifest, load_tensors, save_tensors

# the config keys that change each curvature (its fit settings); RepSim ("none") has no curvature
FIT_KEYS = {"woodbury": ("r", "damping", "damping_scale", "oversample", "svd_power_iters", "seed"),
            "exact": ("damping", "damping_scale"), "identity": (), "none": ()}


def curvature_meta(cfg: Config, manifest: Manifest) -> dict:
    """What determines the curvature: the method's curvature and fit settings, the policy, the index."""
    kind = cfg.method.curvature
    fitted = bool(FIT_KEYS[kind])
    return {
        "method": cfg.method.name,
        "curvature": kind,
        "config": {key: getattr(cfg, key) for key in FIT_KEYS[kind]},
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


def save_curvature(path, meta: dict, curvatures: dict[str, Curvature], extra: dict | None = None) -> dict:
    """Write every layer's curvature with what made it; returns the per-layer info."""
    tensors, layers = {}, {}
    for name, curvature in curvatures.items():
        layers[name] = curvature.info()
        tensors.update({f"{name}.{field}": t for field, t in curvature.tensors().items() if t is not None})
    # curvature_id names what determines this file for what is derived from it (stored g'_t): matched by
    # reading the header instead of hashing up to D·r numbers per layer
    curvature_id = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    save_tensors(path, tensors, {"method_meta": meta, "kind": meta["curvature"], "layers": layers,
                                 "curvature_id": curvature_id, **(extra or {})})
    return layers


def curvature_header(path) -> dict:
    """The saved curvature's header (kind, per-layer info, ``method_meta``, ``curvature_id``), read alone."""
    if not Path(path).exists():
        raise ConfigError(f"no curvature at {path}; run stage 2 (jobs/curvature.py) first")
    return load_tensors(path, names=lambda name: False)[1]


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
            against stored g'_t), or the named layers. V_r is most of the file (D·r per layer), and
            tensors not asked for are never read.
    """
    header = check_curvature(cfg, manifest)
    if header["kind"] == "none":
        return {}
    wanted_vectors = vectors if isinstance(vectors, bool) else set(vectors)

    def wanted(tensor: str) -> bool:
        layer, field = tensor.rsplit(".", 1)
        return field != "vectors" or (wanted_vectors if isinstance(wanted_vectors, bool) else layer in wanted_vectors)

    tensors, meta = load_tensors(cfg.curvature_path, device=device, names=wanted)
    kind = curvature_class(header["kind"])
    out = {}
    for spec in layer_specs(manifest):
        info = meta["layers"].get(spec.name, {"kind": kind.kind, "damping": 0.0, "rank": 0})
        prefix = f"{spec.name}."
        fields = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)}
        out[spec.name] = kind.from_saved(fields, info).to(dtype=dtype)
    return out
