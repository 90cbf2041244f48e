"""The capacity planner: the paper's storage tables, the Featurizer's shapes, the TP search, the job."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lorif_ray.config import MethodConfig, ModelConfig, PrecisionConfig
from lorif_ray.errors import ConfigError
from lorif_ray.model.layers import select_layers
from lorif_ray.plan import GIB, make_plan
from lorif_ray.plan_report import format_plan
from lorif_ray.stages.featurize import Featurizer
from tests.conftest import tiny_gpt2, tiny_llama
from tests.plan.helpers import plan_job

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20
GPT2_N = 232_585  # WikiText-103 sequences of 512 tokens (paper, App. A)


def model_conf(name: str) -> ModelConfig:
    """A conf/model/*.yaml file as a ModelConfig."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(ROOT / f"conf/model/{name}.yaml")))


def plan(model: ModelConfig, method: str, f: int, c: int = 1, **kwargs):
    return make_plan(plan_job(model=model, method=MethodConfig(method), f=f, c=c, dtype="bfloat16", **kwargs))


# Paper Tables 2-4 (16-bit values, every linear layer of each block): model, method, f, c, printed
# storage per example (MiB, 2 decimals; RepSim in KiB), printed total for GPT-2 (GiB, 1 decimal; N = 232,585)
# or None. Rows whose totals disagree with their own per-example figure are listed in the report only.
PAPER_ROWS = [
    ("gpt2_small", "graddot", 8, 1, "2.53", "574.9"),
    ("gpt2_small", "logra", 8, 1, "2.53", "574.9"),
    ("gpt2_small", "lorif", 4, 16, "1.12", "255.5"),
    ("gpt2_small", "lorif", 4, 32, "2.25", None),  # printed total 511.0 GiB; 2.25 MiB × N = 511.05
    ("gpt2_small", "logra", 16, 1, "0.63", "143.7"),
    ("gpt2_small", "lorif", 4, 1, "0.07", None),  # printed total 16.6 GiB; 0.07 MiB × N gives 16.0
    ("gpt2_small", "lorif", 16, 1, "0.02", None),  # printed total 4.1 GiB; 0.02 MiB × N gives 4.0
    ("olmo3_7b", "logra", 128, 1, "0.75", None),  # N printed as 2.2M only
    ("olmo3_7b", "lorif", 128, 1, "0.04", None),
    ("olmo3_7b", "lorif", 16, 1, "0.30", None),
    ("apertus_70b", "logra", 512, 1, "0.50", None),  # N printed as 3.8M only
    ("apertus_70b", "lorif", 256, 1, "0.09", None),
    ("apertus_70b", "lorif", 64, 1, "0.37", None),
]


@pytest.mark.parametrize("model,method,f,c,per_example_mib,total_gib", PAPER_ROWS)
def test_storage_matches_the_paper(model, method, f, c, per_example_mib, total_gib):
    p = plan(model_conf(model), method, f, c, num_examples=GPT2_N)
    assert f"{p.bytes_per_example / MIB:.2f}" == per_example_mib
    if total_gib is not None:
        assert f"{p.index_bytes / GIB:.1f}" == total_gib


def test_repsim_storage_matches_the_paper():
    p = plan(model_conf("gpt2_small"), "repsim", 4, num_examples=GPT2_N)
    assert p.bytes_per_example == 1.5 * 1024  # "1.5 KiB"
    assert f"{p.index_bytes / MIB:.1f}" == "340.7"


@pytest.mark.parametrize("num_queries,cheaper", [(1000, "query side"), (8192, "recompute g'_t")])
def test_the_query_compute_takes_the_cheaper_curvature_route(num_queries, cheaper):
    """GPT-2 small f=4 r=4096: the query side (D per pair) beats recomputing g'_t (r·D per example) for
    fewer queries than r, not for more; stored g'_t (r per pair) is cheapest; the routes' counts are exact."""
    p = plan(model_conf("gpt2_small"), "lorif", 4, 1, num_examples=GPT2_N, num_queries=num_queries)
    routes = p.curvature_flops
    assert min(routes["recompute g'_t"], routes["query side"]) == routes[cheaper]
    assert routes["stored g'_t"] < routes[cheaper]
    dims = [s.dim for s in p.specs]
    assert routes["stored g'_t"] == sum(2.0 * GPT2_N * num_queries * min(4096, d) for d in dims)
    assert routes["query side"] == sum(2.0 * min(4096, d) * d * num_queries + 2.0 * GPT2_N * num_queries * d
                                       for d in dims)


def test_gpt2_small_parameter_count_is_the_throughput_reference():
    p = plan(model_conf("gpt2_small"), "lorif", 4)
    assert p.params == p.config.ref_params == 124_439_808
    assert [s.name for s in p.specs[:4]] == [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert len(p.specs) == 48


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("method,f,c", [("lorif", 4, 2), ("lorif", 2, 100), ("logra", 8, 1), ("repsim", 4, 1)])
def test_shapes_equal_the_featurizers(build, method, f, c):
    """Planner on the meta device == Featurizer on the real model: layers, (I, O, d1, d2, c), columns."""
    model = build(dtype=torch.float32)
    kind = MethodConfig(method).store_kind
    featurizer = Featurizer(model, select_layers(model), kind=kind, f=f, c=c, seed=0)
    p = plan(ModelConfig(arch=model.config.to_dict()), method, f, c)
    assert p.specs == featurizer.specs
    assert p.columns == featurizer.columns
    assert p.params == sum(q.numel() for q in model.parameters())


def test_tp_search_returns_the_smallest_fitting_size():
    llama = model_conf("llama_70b")
    totals = {m.tp: m.total for m in plan(llama, "lorif", 64, batch_size=1, headroom=0.0).memory}
    assert list(totals) == [1, 2, 4, 8]
    assert all(totals[a] > totals[b] for a, b in ((1, 2), (2, 4), (4, 8)))
    for budget, expected in ((totals[1] + 1, 1), ((totals[1] + totals[2]) / 2, 2), (totals[4], 4),
                             ((totals[8] + totals[4]) / 2, 8), (totals[8] - 1, None)):
        p = plan(llama, "lorif", 64, batch_size=1, headroom=0.0, gpu_memory_gib=budget / GIB)
        assert p.tp_size == expected, (budget, totals)
    weights = plan(llama, "lorif", 64, tp_size=4).memory
    block_linears = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672)  # sharded; the rest replicated
    assert [m.tp for m in weights] == [4] and weights[0].weights == 2 * (block_linears // 4 + 70_553_706_496 - block_linears)


@pytest.mark.parametrize("model,kwargs,message", [
    (ModelConfig(arch={"model_type": "not_a_model"}), {}, "not_a_model"),
    (ModelConfig(arch={"hidden_size": 64}), {}, "model_type"),
    (None, {"tp_size": 3}, "tp_size=3"),
    (None, {"precision": PrecisionConfig(math="float16")}, "precision.math='float16'"),
    (None, {"driver_device": "tpu"}, "driver_device='tpu'"),
    (None, {"cluster.gram_actors": 0}, r"cluster.\*_actors"),
    (None, {"curvature": "kfc"}, "curvature='kfc'"),
])
def test_bad_input_raises_config_error(model, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        plan(model or model_conf("gpt2_small"), "lorif", 4, **kwargs)
    with pytest.raises(ConfigError, match="method="):
        plan_job(method=MethodConfig("lorf"))


def test_max_length_is_capped_at_the_models_positions():
    """Every example counts as data.max_length tokens (conf/plan.yaml: 512), at most the model's positions."""
    assert plan(model_conf("gpt2_small"), "lorif", 4, max_length=4096).config.data.max_length == 1024
    assert plan(model_conf("gpt2_small"), "lorif", 4, max_length=256).config.data.max_length == 256


def test_embedded_default_reads_the_recipe():
    p = plan(ModelConfig(), "lorif", 4)
    assert (p.model_type, p.num_blocks, len(p.specs), p.config.data.max_length) == ("gpt2", 2, 8, 64)
    text = format_plan(p)
    assert "- exact: bytes per example" in text and "- estimate: TP size: 1" in text


def test_the_job_prints_a_plan_for_each_large_model(tmp_path):
    result = subprocess.run(
        [sys.executable, "jobs/plan.py", "-m", "model=llama_70b,olmo3_7b,apertus_70b", "f=4", "c=1", "r=4096",
         "num_examples=1000000", "gpu_memory_gib=80", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    for model_type, params in (("llama", "70,553,706,496"), ("olmo3", "7,298,011,136"), ("apertus", "70,599,864,480")):
        assert f"model: {model_type}, {params} parameters" in out
    assert out.count("- estimate: stage 1 (index)") == 3 and out.count("- exact: index size") == 3
    assert out.count("| actor (count) | holds | dtype | where | bytes |") == 3
    assert out.count("| driver, stage 2 (1) | records of the index's 977 shards") == 3
    assert "| model.layers.*.mlp.up_proj | 80 | 8192 | 43008 | 2048 | 10752 | 1 | column | 1,024,000 |" in out
