"""Row sources of an index (lorif_ray.stages.rows): streamed and resident rows of a run of shards are the same
blocks at the same global rows (resident ones held in the storage dtype), and a new source is one class that
the Gram pass and the scorer both read."""

import numpy as np
import torch

from lorif_ray.math.rsvd import GramPass
from lorif_ray.stages.curvature import load_curvature
from lorif_ray.stages.inputs import layer_specs, query_config
from lorif_ray.stages.query import prepare_query, score_blocks
from lorif_ray.stages.queries import featurize_queries
from lorif_ray.outputs.query_outputs import TopK
from lorif_ray.stages.rows import ParquetRows, ResidentRows, layer_rows, rows_bytes
from lorif_ray.store import CurvatureFolder, IndexFolder
from lorif_ray.store.schema import TORCH_STORAGE_DTYPES


class Segments:
    """A row source over consecutive row sources (an index's shard runs, or an index and an appended segment):
    the blocks of each in turn — all a new source needs is ``layout``, ``device``, ``offset``, ``passes`` and
    ``blocks()``."""

    def __init__(self, parts):
        self.parts, self.layout, self.device, self.offset = parts, parts[0].layout, parts[0].device, parts[0].offset
        self.passes = 0

    def blocks(self):
        self.passes += 1
        for part in self.parts:
            yield from part.blocks()


def _dense(source) -> dict[str, torch.Tensor]:
    """{layer: (n, D)} of one pass over a source."""
    parts = [source.layout.layer_blocks(block) for block in source.blocks()]
    return {name: torch.cat([p[name].dense() for p in parts]) for name in parts[0]}


def test_streamed_and_resident_rows_of_a_shard_run_are_the_same_blocks(baseline):
    cfg = baseline["cfg"]
    index = IndexFolder(cfg.index_path)
    manifest = index.manifest()
    specs, shards = layer_specs(manifest), [3, 4]
    options = dict(dtype=torch.float64, shards=shards, batch_rows=7, block_rows=7)
    streamed = layer_rows(index, manifest, specs, resident=False, **options)
    resident = layer_rows(index, manifest, specs, resident=True, **options)
    assert isinstance(streamed, ParquetRows) and isinstance(resident, ResidentRows)
    stored = TORCH_STORAGE_DTYPES[manifest.dtype]
    assert resident.block.factors[0][0].dtype == stored and stored != torch.float64
    assert resident.nbytes() == rows_bytes(manifest, specs, stored, shards)
    blocks = {name: list(source.blocks()) for name, source in (("streamed", streamed), ("resident", resident))}
    assert [(b.offset, len(b)) for b in blocks["streamed"]] == [(30, 7), (37, 3), (40, 7), (47, 1)]  # per shard
    assert [(b.offset, len(b)) for b in blocks["resident"]] == [(30, 7), (37, 7), (44, 4)]
    ids = index.ids(manifest, shards=shards)
    for parts in blocks.values():
        assert [i for b in parts for i in b.ids] == ids and all(b.factors[0][0].dtype == torch.float64 for b in parts)
    want, got = _dense(streamed), _dense(resident)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_a_new_row_source_serves_the_gram_pass_and_the_scorer(baseline):
    """Shards 0-2 streamed, 3-4 resident, chained by ``Segments``: the Gram pass and the scores of the index."""
    cfg = query_config(baseline["cfg"], IndexFolder(baseline["cfg"].index_path).manifest())
    index = IndexFolder(cfg.index_path)
    manifest = index.manifest()
    specs = layer_specs(manifest)
    curvature = load_curvature(CurvatureFolder(cfg.curvature_path), cfg, manifest, "cpu", torch.float64)
    options = dict(dtype=torch.float64, batch_rows=7, block_rows=7, curvature=curvature)
    parts = Segments([layer_rows(index, manifest, specs, shards=[0, 1, 2], resident=False, **options),
                      layer_rows(index, manifest, specs, shards=[3, 4], resident=True, **options)])
    whole = layer_rows(index, manifest, specs, resident=True, **options)
    gen = torch.Generator().manual_seed(0)
    q = {s.name: torch.randn(s.dim, 3, generator=gen, dtype=torch.float64) for s in specs}
    expected = GramPass(whole)(applies=q)
    for name, value in GramPass(parts)(applies=q).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-10)
    query = prepare_query(manifest, featurize_queries(cfg, manifest).columns, curvature, route="recompute",
                          normalize=False)
    reference = np.load(f"{cfg.output_dir}/scores.npy")  # the baseline's run_query
    scores = torch.cat([query.scores(block) for block in parts.blocks()], dim=1).numpy()
    assert np.abs(scores - reference).max() <= 1e-5 * np.abs(reference).max()
    ends, alone = TopK(len(scores), 5, "cpu"), TopK(len(scores), 5, "cpu")
    score_blocks(query, parts.blocks(), ends)
    score_blocks(query, whole.blocks(), alone)
    assert torch.equal(ends.index, alone.index) and torch.equal(ends.low_index, alone.low_index)
    assert parts.passes == 3
