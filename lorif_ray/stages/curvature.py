"""Stage 2: per-layer curvature from the index — V_r, σ², λ (LoRIF), (GᵀG + λI)⁻¹ (LoGRA), or none.

Rows of G are rebuilt from the stored factors batch by batch (only that layer's columns are read);
G is never materialized. A curvature file made with the same settings from the same index is reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from lorif_ray.config import Config
from lorif_ray.errors import ConfigError, IndexMismatchError, LorifError
from lorif_ray.math.influence import LayerCurvature, exact_inverse
from lorif_ray.math.rsvd import GramApply, eigh_spectrum, gram_apply_from_batches, gram_from_batches, randomized_spectrum
from lorif_ray.model.loading import resolve_device
from lorif_ray.stages.featurize import LayerSpec, blocks_from_columns
from lorif_ray.stages.inputs import math_dtype
from lorif_ray.store import Manifest, iter_batches, load_tensors, open_index, save_tensors

CURVATURE_KIND = {"lorif": "woodbury", "logra": "inverse", "graddot": "identity", "repsim": "none"}
NEEDS_STORE = {"lorif": "factors", "logra": "dense", "graddot": "dense", "repsim": "hidden"}


def layer_specs(manifest: Manifest) -> list[LayerSpec]:
    return [LayerSpec(**d) for d in manifest.meta["layers"]]


def check_method_matches_index(method: str, manifest: Manifest, index_dir) -> None:
    if manifest.kind != NEEDS_STORE[method]:
        raise IndexMismatchError(f"method={method} needs an index of {NEEDS_STORE[method]!r} rows, but {index_dir} "
                                 f"holds {manifest.kind!r} rows; use another output_dir/index_dir or method")


def curvature_meta(cfg: Config, manifest: Manifest) -> dict:
    """What determines the curvature: the method's settings and the index it was computed from."""
    return {
        "method": cfg.method.name,
        "config": {"r": cfg.r, "damping": cfg.damping, "damping_scale": cfg.damping_scale,
                   "oversample": cfg.oversample, "svd_power_iters": cfg.svd_power_iters, "seed": cfg.seed},
        "index": {"model": manifest.meta["model"], "config": manifest.meta["config"],
                  "shards": [r.sha256 for r in manifest.shards]},
    }


def prepare_curvature(cfg: Config) -> tuple[Manifest, dict, bool]:
    """Open and verify the index; the curvature's metadata; whether a saved file already matches it."""
    manifest = open_index(cfg.index_path, verify=True)
    check_method_matches_index(cfg.method.name, manifest, cfg.index_path)
    meta = curvature_meta(cfg, manifest)
    reusable = cfg.curvature_path.exists() and load_tensors(cfg.curvature_path)[1].get("method_meta") == meta
    return manifest, meta, reusable


def curvature_layers(cfg: Config, manifest: Manifest, device=None) -> tuple[str, list[LayerSpec], torch.device,
                                                                         torch.dtype]:
    """The method's curvature kind, the layers that need one, and the device and dtype to compute in."""
    kind = CURVATURE_KIND[cfg.method.name]
    specs = layer_specs(manifest) if kind not in ("identity", "none") else []
    device = resolve_device(device or cfg.model.device)
    return kind, specs, device, math_dtype(device)


def run_curvature(cfg: Config) -> dict:
    """Compute and save the curvature of every layer at ``cfg.curvature_path``; returns a report dict."""
    manifest, meta, reusable = prepare_curvature(cfg)
    if reusable:
        return {"reused": True, "path": str(cfg.curvature_path)}
    kind, specs, device, dtype = curvature_layers(cfg, manifest)
    results = {}
    start = time.perf_counter()
    for spec in tqdm(specs, desc="stage 2: curvature", unit="layer", disable=not cfg.progress):
        def rows(spec=spec):
            columns = [f"{spec.name}.{c}" for c in (("u", "v") if manifest.kind == "factors" else ("g",))]
            for _, cols in iter_batches(cfg.index_path, columns, batch_rows=cfg.query.train_batch_rows,
                                        out_dtype=dtype, device=device, manifest=manifest):
                yield blocks_from_columns([spec], manifest.kind, cols)[spec.name].dense()

        gram = lambda rows=rows, dim=spec.dim: gram_from_batches(rows(), dim, dtype=torch.float64, device=device)  # noqa: E731
        results[spec.name] = layer_curvature(cfg, kind, spec, gram_apply_from_batches(rows), gram, dtype, device)
    return save_curvature(cfg, meta, kind, results, time.perf_counter() - start)


def save_curvature(cfg: Config, meta: dict, kind: str, results: dict[str, LayerCurvature], seconds: float) -> dict:
    """Write every layer's curvature with the settings that made it; returns the stage report."""
    tensors, layers = {}, {}
    for name, curvature in results.items():
        layers[name] = {"kind": kind, "damping": curvature.damping,
                        "rank": 0 if curvature.values is None else int(curvature.values.numel())}
        for field in ("vectors", "values", "inverse"):
            value = getattr(curvature, field)
            if value is not None:
                tensors[f"{name}.{field}"] = value.cpu()
    # curvature_id names what determines this file (index and settings) for what is derived from it
    # (stored g'_t): matched by reading the header instead of hashing up to D·r numbers per layer
    curvature_id = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    save_tensors(cfg.curvature_path, tensors, {"method_meta": meta, "kind": kind, "layers": layers,
                                               "curvature_id": curvature_id})
    return {"reused": False, "path": str(cfg.curvature_path), "seconds": seconds, "layers": layers}


def layer_curvature(cfg: Config, kind: str, spec: LayerSpec, gram_apply: GramApply, gram: Callable[[], torch.Tensor],
                    dtype, device) -> LayerCurvature:
    """Curvature of one layer, given GᵀG Q (one pass over G per call) and the D×D GᵀG (one pass).

    Both come from streamed rows in one process or from partial sums reduced across workers.
    """
    dim = spec.dim
    if kind == "inverse":
        gram_matrix = gram()
        damping = cfg.damping or cfg.damping_scale * float(gram_matrix.trace()) / dim  # 0.1 × mean of all eigenvalues
        _check_damping(damping, spec)
        return LayerCurvature(kind, damping, inverse=exact_inverse(gram_matrix, damping).to(dtype))
    rank = min(cfg.r, dim)
    if rank + cfg.oversample >= dim:  # the whole spectrum is as cheap as a sketch of it
        spectrum = eigh_spectrum(gram(), rank, cfg.oversample)
    else:
        spectrum = randomized_spectrum(gram_apply, dim, rank, oversample=cfg.oversample,
                                       power_iters=cfg.svd_power_iters, seed=cfg.seed, name=spec.name,
                                       dtype=dtype, device=device)
    damping = cfg.damping or spectrum.damping(cfg.damping_scale)
    _check_damping(damping, spec)
    return LayerCurvature(kind, damping, spectrum.vectors.to(dtype), spectrum.values.to(dtype))


def _check_damping(damping: float, spec: LayerSpec) -> None:
    if not damping > 0:
        raise LorifError(f"layer {spec.name}: every stored gradient is zero, so the damping rule gives λ = 0; "
                         "set damping explicitly or leave the layer out (model.layers)")


def curvature_header(path) -> dict:
    """The saved curvature's metadata (kind, per-layer damping and rank, ``curvature_id``), read from the
    file's header only."""
    if not Path(path).exists():
        raise ConfigError(f"no curvature at {path}; run stage 2 (jobs/curvature.py) first")
    return load_tensors(path, names=lambda name: False)[1]


def load_curvature(cfg: Config, manifest: Manifest, device, dtype, *, vectors: bool | Iterable[str] = True
                   ) -> dict[str, LayerCurvature]:
    """The saved curvature of every layer, checked against the index and method.

    Args:
        vectors: which layers' V_r to read: all (True), none (False: damping and σ² only, enough to score
            against stored g'_t), or the named layers. V_r is most of the file (D·r per layer), and
            tensors not asked for are never read.
    """
    if not cfg.curvature_path.exists():
        raise ConfigError(f"no curvature at {cfg.curvature_path}; run stage 2 (jobs/curvature.py) first")
    wanted_vectors = vectors if isinstance(vectors, bool) else set(vectors)

    def wanted(tensor: str) -> bool:
        layer, field = tensor.rsplit(".", 1)
        return field != "vectors" or (wanted_vectors if isinstance(wanted_vectors, bool) else layer in wanted_vectors)

    tensors, meta = load_tensors(cfg.curvature_path, device=device, names=wanted)
    saved = meta.get("method_meta", {})
    expected = curvature_meta(cfg, manifest)
    if saved.get("index") != expected["index"] or saved.get("method") != expected["method"]:
        raise IndexMismatchError(f"{cfg.curvature_path} was computed for method={saved.get('method')} from another "
                                 f"index than {cfg.index_path}; re-run stage 2")
    kind = meta["kind"]
    out = {}
    for spec in layer_specs(manifest):
        if kind == "identity":
            out[spec.name] = LayerCurvature("identity")
            continue
        info = meta["layers"][spec.name]
        get = lambda field: tensors.get(f"{spec.name}.{field}")  # noqa: E731
        out[spec.name] = LayerCurvature(kind, info["damping"], get("vectors"), get("values"), get("inverse")).to(dtype=dtype)
    return out
