"""Each part's declared footprint against what it really holds on a small run: the curvatures' saved tensors and
row requests, the featurizer's device tensors of a batch (exact), and the measured peak memory of a curvature fit
(within a stated tolerance)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorif_ray.math.curvature import Curvature, FitSettings
from lorif_ray.math.kronecker import batch_stats
from lorif_ray.math.rsvd import GramOperator, TensorRows
from lorif_ray.model.layers import select_layers
from lorif_ray.stages.featurize import DEVICE_BYTES, Featurizer, featurizer_footprint
from tests.conftest import tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]
FITTED = [cls for cls in Curvature.registered().values() if cls.scores_gradients]


def _layer(d1=4, d2=3, n=40, tokens=5, seed=0):
    """(rows (n, D), K-FAC statistics) of one layer from per-token pairs (x̃, δ̃)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, d1, generator=gen, dtype=torch.float64)
    delta = torch.randn(n, tokens, d2, generator=gen, dtype=torch.float64)
    rows = torch.einsum("nti,ntj->nij", x, delta).reshape(n, d1 * d2)
    return rows, batch_stats(x, delta, torch.ones(n, tokens, dtype=torch.bool))


@pytest.mark.parametrize("cls", FITTED, ids=lambda c: c.kind)
@pytest.mark.parametrize("rank,oversample", [(3, 2), (12, 10)])  # a sketch, and the whole spectrum (r + p ≥ D)
def test_each_curvature_saves_and_asks_what_it_declares(cls, rank, oversample):
    d1, d2 = 4, 3
    rows, stats = _layer(d1, d2)
    settings = FitSettings(rank=rank, oversample=oversample, power_iters=1)
    fitted = cls.fit(GramOperator(TensorRows(rows)), d1 * d2, "layer", settings, stats)
    assert sum(t.numel() for t in fitted.tensors().values()) == cls.saved_numbers(d1, d2, settings)
    steps = cls.steps(d1 * d2, "layer", settings)
    request = next(steps, None)
    if cls.needs_stats:  # the statistics come first, without a pass over the rows
        assert request == ("stats", "layer")
        try:
            request = steps.send(stats)
        except StopIteration:
            request = None
    kind, size = cls.row_request(d1, d2, settings)
    if kind == "none":
        assert request is None and not cls.reads_rows
    elif kind == "apply":
        assert request[0] == "apply" and tuple(request[1].shape) == (d1 * d2, size)
        assert cls.fit_numbers(d1, d2, settings) == 2 * request[1].numel()  # Q and GᵀG Q
    else:
        assert request[0] == kind and size == d1 * d2 and cls.reads_rows


def test_the_featurizers_device_tensors_of_a_batch_are_the_declared_ones():
    """Projections, captured (A, B) and the store columns of a batch, as ``featurizer_footprint`` counts them."""
    model = tiny_gpt2(dtype=torch.float32)
    featurizer = Featurizer(model, select_layers(model), kind="factors", f=4, c=2, seed=0)
    n, t = 3, 16
    batch = {"input_ids": torch.randint(0, 61, (n, t)), "attention_mask": torch.ones(n, t, dtype=torch.long)}
    batch["labels"] = batch["input_ids"].clone()
    ids = [f"e{i}" for i in range(n)]
    declared = featurizer_footprint(featurizer.specs, "factors", tokens=n * t, shard_rows=n)
    nbytes = lambda ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    projections = nbytes(x for p in featurizer.projections.values() for x in (p.p_in, p.p_out))
    assert projections == declared["projections"]
    captured = featurizer.capture(ids, batch)
    assert nbytes(x for pair in captured.values() for x in pair) == declared["captured"]
    columns = featurizer(ids, batch)
    assert all(c.dtype.itemsize == DEVICE_BYTES for c in columns.values())
    assert nbytes(columns.values()) == declared["store"]


PEAK = """
import json, sys, torch
torch.set_num_threads(1)
from lorif_ray.math.curvature import Curvature, FitSettings, fit_layers


def status(key):  # kB
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])


d = int(sys.argv[1])
g = torch.randn(64, d, dtype=torch.float64)
gram = g.T @ g  # the Gram pass's answer, made before the fit
del g
open("/proc/self/clear_refs", "w").write("5")  # the peak RSS (VmHWM) starts again from now
base = status("VmRSS:")
fitted = fit_layers({"l": Curvature.of("exact").steps(d, "l", FitSettings())}, lambda **k: {"l": gram})
print(json.dumps({"extra": (status("VmHWM:") - base) * 1024}))
"""


def test_a_curvature_fits_within_its_declared_final_step():
    """The stage-2 driver's final step for an exact inverse (``distributed.gram.driver_footprint``: eigenvectors,
    their scaled copy and the result, 3·8·D² bytes beside the given GᵀG) against the peak RSS a fit adds in a
    fresh process (Linux VmHWM, reset just before; D = 1536): within 0.6-1.4× (measured 1.20×: eigh's LAPACK
    workspace and allocator rounding on top)."""
    from lorif_ray.config import Config, MethodConfig
    from lorif_ray.distributed.gram import driver_footprint
    from lorif_ray.stages.featurize import LayerSpec

    d = 1536
    spec = LayerSpec("l", 0, 0, d, 1, 0)
    held = driver_footprint(Config(method=MethodConfig("logra")), [spec], [spec], workers=1, shards=1,
                            math=torch.float64, where="host")
    declared = sum(h.bytes for h in held if h.what.startswith("[final] eigenvectors"))
    assert declared == 3 * 8 * d * d
    out = subprocess.run([sys.executable, "-c", PEAK, str(d)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])["extra"]
    assert 0.6 * declared <= measured <= 1.4 * declared, (measured / declared, measured, declared)


def test_the_writer_actors_declared_shard_is_a_real_shards_columns(baseline):
    """A pool member's declared payload (store columns in float32, then their storage-dtype copy) against the
    columns of the baseline index's first shard as the store reads them back."""
    from lorif_ray.distributed.featurize import writer_actor_footprint
    from lorif_ray.store import IndexFolder
    from lorif_ray.store.schema import STORAGE_DTYPES, TORCH_STORAGE_DTYPES

    cfg = baseline["cfg"]
    index = IndexFolder(cfg.index_path)
    manifest = index.manifest()
    first = manifest.shards[0]
    columns = {}
    for _, batch in index.batches(manifest=manifest, shards=[first.index]):
        for name, values in batch.items():
            columns.setdefault(name, []).append(values)
    columns = {name: torch.cat(parts) for name, parts in columns.items()}
    held = writer_actor_footprint(cfg, [], manifest.columns, rows=first.rows)
    shard, stored = (h for h in held if "store columns" in h.what or "storage dtype" in h.what)
    assert manifest.dtype in STORAGE_DTYPES
    assert shard.bytes == sum(v.to(torch.float32).nbytes for v in columns.values())
    assert stored.bytes == sum(v.to(TORCH_STORAGE_DTYPES[manifest.dtype]).nbytes for v in columns.values())
