"""The planner's layout and actor memory: hand computations on a tiny GPT-2, checked against the code's
own rules (shard groups, resident rows, routes) and against what the fitting code really allocates."""

import sys
from dataclasses import replace

import pytest
import torch

from lorif_ray.config import MethodConfig, ModelConfig, PrecisionConfig
from lorif_ray.distributed.gram import shard_groups
from lorif_ray.math.curvature import FitSettings, Woodbury
from lorif_ray.math.rsvd import GramPass, TensorRows
from lorif_ray.footprint import GIB, SHARD_RECORD_BYTES, id_bytes
from lorif_ray.plan import make_plan
from lorif_ray.plan_report import format_plan, memory_row
from lorif_ray.stages.rows import RESIDENT_FRACTION, rows_bytes
from lorif_ray.store.manifest import Manifest, ShardRecord
from tests.conftest import tiny_gpt2
from tests.plan.helpers import plan_job

N, SHARD, R, P = 10_000, 1024, 16, 4
# tiny GPT-2 (n_embd 32, 2 blocks), f=4: c_attn 8×24, attn.c_proj 8×8, c_fc 8×32, mlp.c_proj 32×8 per block
DIMS = [192, 64, 256, 256] * 2
WIDTHS = [8 + 24, 8 + 8, 8 + 32, 32 + 8] * 2  # c(d1+d2), c = 1
K = R + P  # every layer has D > r + p: all by the randomized SVD


def tiny(**kwargs):
    options = {"model": ModelConfig(arch=tiny_gpt2().config.to_dict()), "method": MethodConfig("lorif"), "f": 4,
               "c": 1, "r": R, "oversample": P, "num_examples": N, "num_queries": 8, "shard_size": SHARD,
               "num_gpus": 2, "cluster.gram_actors": 4, "cluster.query_actors": 2}
    return plan_job(**{**options, **kwargs})


@pytest.fixture(scope="module")
def plan():
    return make_plan(tiny())


def fake_manifest(num_rows: int = N, shard_size: int = SHARD) -> Manifest:
    shards = [ShardRecord(i, f"shard-{i:06d}.parquet", min(shard_size, num_rows - i * shard_size), "0" * 64, 0)
              for i in range(-(-num_rows // shard_size))]
    return Manifest(kind="factors", columns={}, dtype="bfloat16", shard_size=shard_size, num_rows=num_rows,
                    shards=shards)


def test_the_layout_follows_the_stages_rules(plan):
    layout = plan.layout
    assert [s.dim for s in plan.specs] == DIMS
    assert (layout.driver.math, layout.actor.math, layout.actor.matmul) == (torch.float64, torch.float32, torch.float32)
    assert [len(g) for g in layout.groups] == [8]  # 2·D·k float64 numbers of all 8 layers fit GROUP_BYTES
    # 10 shards over 4 Gram actors: [3, 3, 2, 2] shards (distributed.curvature.shard_groups), the first 3,072 rows
    manifest = fake_manifest()
    first = shard_groups(manifest, 4)[0]
    assert (layout.shards, layout.gram_actors, layout.gram_rows) == (10, 4, 3 * SHARD)
    assert layout.resident_bytes == [3 * SHARD * sum(WIDTHS) * 4]
    assert layout.resident_bytes[0] == rows_bytes(manifest, layout.groups[0], torch.float32, first)
    assert layout.resident == [True]
    assert (layout.query_actors, layout.query_rows) == (2, 5 * SHARD)
    assert layout.route == "query"  # 8 queries < r = 16, nothing stored, no I(t, t)


@pytest.mark.parametrize("kwargs,route", [({}, "query"), ({"num_queries": R}, "recompute"),
                                          ({"query.normalize": True}, "recompute"), ({"query.store_coordinates": True}, "stored"),
                                          ({"method": MethodConfig("logra")}, "none")])
def test_the_route_is_the_one_stage_3_chooses(kwargs, route):
    assert make_plan(tiny(**kwargs)).layout.route == route


def test_rows_are_resident_up_to_a_quarter_of_the_actors_memory(plan):
    rows = plan.layout.resident_bytes[0]
    at_limit = make_plan(tiny(gpu_memory_gib=rows / RESIDENT_FRACTION / GIB))
    below = make_plan(tiny(gpu_memory_gib=(rows - 4) / RESIDENT_FRACTION / GIB))
    assert (at_limit.layout.resident, below.layout.resident) == ([True], [False])
    gram = below.actor("Gram actor")
    assert gram.bytes_of("rows of the group") == 0
    assert gram.bytes_of("one streamed batch") == SHARD * sum(WIDTHS) * 4  # batches never span a shard
    on_cpu = make_plan(tiny(actor_device="cpu", host_memory_gib=(rows - 4) / RESIDENT_FRACTION / GIB))
    assert on_cpu.layout.resident == [False] and on_cpu.layout.actor.math == torch.float64


def test_iterate_bytes_equal_what_the_fit_allocates(plan):
    """The D×k iterate the planner counts is the Q that Woodbury's fit yields, in the driver's dtype."""
    settings = FitSettings(rank=R, oversample=P, dtype=plan.layout.driver.math, device="cpu")
    for spec in plan.specs[:4]:
        kind, q = next(Woodbury.steps(spec.dim, spec.name, settings))
        assert kind == "apply" and q.dtype == torch.float64
        assert q.numel() * q.element_size() == plan.iterate_bytes(spec) == spec.dim * K * 8
    # r + p ≥ D: the layer is fitted from its D×D Gram matrix instead, and has no iterate
    wide = make_plan(tiny(r=62))
    small = wide.specs[1]
    assert small.dim == 64 and next(Woodbury.steps(64, small.name, replace(settings, rank=62)))[0] == "gram"
    assert wide.iterate_bytes(small) == 0


def test_a_gram_actor_accumulates_in_the_dtype_of_the_q_it_receives(plan):
    """GramPass keeps GᵀG Q in the received Q's dtype (the driver's float64), whatever its matmul dtype."""
    rows, q = torch.randn(50, 192), torch.randn(192, K, dtype=torch.float64)
    out = GramPass(TensorRows({"a": rows}), matmul_dtype=torch.float32)(applies={"a": q})["a"]
    assert out.dtype == plan.layout.driver.math
    gram = plan.actor("Gram actor")
    assert gram.bytes_of("GᵀG Q accumulated") == out.numel() * out.element_size() * sum(DIMS) // 192
    assert gram.bytes_of("Q (D×k per layer) in the matmul dtype") == 4 * K * sum(DIMS)
    held = {h.what: h for h in gram.held}
    assert held[next(w for w in held if "accumulated" in w)].dtype == "float64"


def test_the_stage_2_driver_gathers_every_partial_at_once(plan):
    driver = plan.actor("driver, stage 2")
    iterate = 8 * K * sum(DIMS)  # Q of all 8 layers (one group), float64 on a CPU driver
    fitted = 8 * sum(d * R + R for d in DIMS)  # V_r (D×r) + r values, saved in float64
    assert driver.bytes_of("rSVD iterate Q") == iterate
    assert driver.bytes_of("GᵀG Q from each of 4 Gram actors") == 4 * iterate
    assert driver.bytes_of("fitted curvature") == fitted
    gather = 4 * iterate + iterate  # the partials and their sum (Q's put is in the object store)
    final = iterate + 3 * 8 * 256 * K + fitted  # Z, B / Vᵀ / V of the largest layer, the fitted group
    assert driver.peak_phase() == "gather"
    assert driver.peak() == 10 * SHARD_RECORD_BYTES + iterate + max(gather, final)
    assert driver.peak("object store") == iterate
    assert sum(plan.curvature_bytes(s) for s in plan.specs) == fitted
    on_gpu = make_plan(tiny(driver_device="cuda")).actor("driver, stage 2")
    assert on_gpu.where == "GPU" and on_gpu.bytes_of("rSVD iterate Q") == iterate // 2  # float32


def test_the_query_actor_holds_its_rows_in_the_math_dtype_and_the_routes_terms(plan):
    actor, rows, nq, nt = plan.actor("query actor"), 5 * SHARD, 8, 2048
    values, dense = sum(WIDTHS), sum(DIMS)
    assert actor.bytes_of("its rows, resident") == rows * values * 4  # float32, stored as bfloat16
    assert actor.bytes_of("h_q = V_r(w ⊙ g'_q) of every layer, received") == nq * dense * 4
    assert actor.bytes_of("dense rows vec(u vᵀ) of one block") == nt * dense * 4
    vectors = [h for h in actor.held if h.what.startswith("V_r of its share")][0].bytes
    assert 4 * sum(d * R for d in DIMS) / 2 <= vectors < 4 * sum(d * R for d in DIMS)
    stored = make_plan(tiny(**{"query.store_coordinates": True}, precision=PrecisionConfig(coordinates="bfloat16")))
    assert stored.actor("query actor").bytes_of("stored g'_t") == rows * R * 8 * 4  # held in float32
    recompute = make_plan(tiny(num_queries=R)).actor("query actor")
    assert recompute.bytes_of("every layer's V_r") == 2 * 4 * sum(d * R for d in DIMS)
    logra = make_plan(tiny(method=MethodConfig("logra"))).actor("query actor")
    assert logra.bytes_of("every layer's (GᵀG + λI)⁻¹") == 4 * sum(d * d for d in DIMS)


def test_the_stage_3_driver_holds_the_query_terms_and_the_top_k(plan):
    driver = plan.actor("driver, stage 3")
    assert driver.bytes_of("ids of the top-k rows") == 8 * 10 * id_bytes() == 80 * (sys.getsizeof("e" * 16) + 8)
    assert plan.actor("query actor").bytes_of("its example ids") == 5 * SHARD * id_bytes()  # ResidentIndex.ids
    assert driver.bytes_of("the query batch's columns") == 8 * sum(WIDTHS) * 4
    assert driver.bytes_of("g'_q and h_q") == 8 * (8 * R + sum(DIMS)) * 4
    assert driver.peak_phase() == "scatter"


def test_a_shard_record_fits_its_estimate():
    record = ShardRecord(3_700, "shard-003700.parquet", 1024, "f" * 64, 400_000_000)
    size = sys.getsizeof(record) + sys.getsizeof(record.__dict__) + sum(sys.getsizeof(v) for v in vars(record).values())
    assert size + 2 * (sys.getsizeof(3_700) + 8) <= SHARD_RECORD_BYTES  # + its to-do list and queue entries


def test_stage_1_actors_hold_a_shard(plan):
    values = sum(WIDTHS)
    gradient = plan.actor("gradient actor")
    assert plan.memory[0].store == SHARD * values * 4  # every batch's columns stay on the device until the shard ends
    assert gradient.bytes_of("the shard's store columns, returned") == SHARD * values * 4
    writer = plan.actor("writer actor")
    assert writer.peak() == SHARD * values * (4 + 2) and writer.peak("object store") == 4 * SHARD * values * 4
    unfused = make_plan(tiny(**{"cluster.fused": False})).actor("writer actor")
    assert unfused.bytes_of("captured (A, B)") == SHARD * 32 * sum(d1 + d2 for d1, d2 in [(8, 24), (8, 8), (8, 32),
                                                                                            (32, 8)] * 2) * 4


def test_format_plan_prints_the_layout_and_the_memory_table(plan):
    text = format_plan(plan)
    assert "| actor (count) | holds | dtype | where | bytes |" in text
    for kind in ("driver, stage 1 (1)", "gradient actor", "writer actor (1)", "driver, stage 2 (1)", "Gram actor (4)",
                 "driver, stage 3 (1)", "query actor (2)"):
        assert f"| {kind}" in text
    assert "- layout: stage 3: route \"query\"" in text and "1 layer groups" in text
    assert "| curvature (float64) |" in text
    assert memory_row(plan, "tiny").startswith("| tiny | 1, 1 resident / 0 streamed | query | ")


def test_kronecker_curvatures_hold_their_statistics_and_bases():
    """K-FAC is fitted in the driver from stage 1's statistics (no Gram actors); EK-FAC adds one pass whose
    Λ* (d1×d2, float64) every Gram actor returns."""
    shapes = [(8, 24), (8, 8), (8, 32), (32, 8)] * 2
    stats = 8 * sum(d1 * d1 + d2 * d2 for d1, d2 in shapes)
    kfac = make_plan(tiny(curvature="kfac"))
    assert not kfac.layout.reads_rows and [a.kind for a in kfac.actors if a.kind.startswith("Gram")] == []
    assert kfac.actor("driver, stage 2").bytes_of("K-FAC statistics") == stats
    assert sum(kfac.curvature_bytes(s) for s in kfac.specs) == stats + 8 * sum(DIMS)
    assert kfac.actor("query actor").bytes_of("every layer's bases") == (stats + 8 * sum(DIMS)) // 2  # float32
    ekfac = make_plan(tiny(curvature="ekfac"))
    assert ekfac.layout.reads_rows and ekfac.layout.route == "none"
    assert ekfac.actor("Gram actor").bytes_of("Λ* (d1×d2) accumulated") == 8 * sum(DIMS)
    assert ekfac.actor("driver, stage 2").bytes_of("Λ* (d1×d2) from each of 4") == 5 * 8 * sum(DIMS)
