"""Capacity planner: index size, curvature size, memory of every process and stage times of a run, from a
model's shape alone (no weights, no Ray).

The planner takes the run's own ``Config`` plus what a plan assumes beyond it (``Workload``: the number of
examples and queries, the GPUs and memory, reference throughputs); the job's schema is the two together
(``PlanJob``). It owns no memory model: each allocating part declares its footprint as a function of the
settings it runs with (``lorif_ray.footprint``) — the featurizer's device tensors and a tensor-parallel rank's
slices (``stages.featurize.featurizer_footprint``, ``model.tensor_parallel.rank_dims``), each curvature
(``Curvature.row_request``, ``fit_numbers``, ``saved_numbers``), the gradient and writer actors and stage 1's driver (``distributed.featurize``), the Gram worker and its driver
(``distributed.gram``), the query worker and its driver (``distributed.query_pool``) — and the planner composes
them with the model's shapes (the model built on the meta device, ``model.tensor_parallel.meta_model``) and the
layout the code would choose: stage 2's layer groups (``stages.curvature.layer_groups``), rows resident or
streamed (``stages.rows``), stage 3's route (``math.scoring.choose_route``). ``lorif_ray.plan_report`` formats it.

    python jobs/plan.py model=llama_70b f=4 c=1 r=4096 num_examples=1000000 gpu_memory_gib=80

    >>> plan = make_plan(PlanJob(model=ModelConfig(arch={"model_type": "gpt2"}), r=4096, dtype="bfloat16"))  # doctest: +SKIP
    >>> plan.bytes_per_example  # doctest: +SKIP
    73728
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from torch import nn

from lorif_ray.config import Config, setting
from lorif_ray.distributed import featurize as ray_featurize
from lorif_ray.distributed import gram as ray_gram
from lorif_ray.distributed import query_pool
from lorif_ray.errors import ConfigError
from lorif_ray.footprint import GIB, Footprint, largest_footprint
from lorif_ray.math.curvature import Curvature
from lorif_ray.math.factorize import default_iterations, effective_rank
from lorif_ray.math.projection import projected_dims
from lorif_ray.math.scoring import choose_route
from lorif_ray.model.layers import layer_shapes, select_layers
from lorif_ray.model.loading import DTYPES
from lorif_ray.model.shapes import model_config
from lorif_ray.model.tensor_parallel import is_row_parallel, meta_model, rank_dims
from lorif_ray.precision import Precision
from lorif_ray.stages import curvature as stage2
from lorif_ray.stages.featurize import LayerSpec, featurizer_footprint
from lorif_ray.stages.rows import RESIDENT_FRACTION, row_bytes
from lorif_ray.store.schema import BYTES_PER_VALUE, store_columns

log = logging.getLogger(__name__)

REFERENCE_PROVENANCE = (
    "measured ceiling on one H100: GPT-2 small shapes, random weights, bf16 autocast, B=16, T=512, "
    "plain forward+backward = 249 examples/s"
)
H2D_PROVENANCE = "measured pinned host->device copy on one H100 = 54 GB/s"
DEVICES = ("cpu", "cuda")
# short names of the job's command line for Config keys (jobs/plan.py): batch_size=4 is data.batch_size=4
SHORTHANDS = {"batch_size": "data.batch_size", "max_length": "data.max_length", "tp_size": "cluster.tp_size"}


@dataclass
class Workload:
    """What a plan assumes beyond the run's Config: the data's size, the hardware, the reference throughputs."""

    # every example counted as full (an upper bound): T = data.max_length, capped at the model's positions
    num_examples: int = setting(1_000_000, "N, training examples indexed")
    num_queries: int = setting(1000, "Nq, queries scored in one batch against all N")
    num_gpus: int = setting(8, "GPUs sharing stages 1 and 3 (perfect scaling assumed)")
    gpu_memory_gib: float = setting(80.0, "memory of one GPU (GiB)")
    headroom: float = setting(0.1, "fraction of GPU memory kept free (CUDA context, allocator, NCCL buffers)")
    # Stage-1 throughput reference (REFERENCE_PROVENANCE). Parameter count: all parameters of
    # GPT-2 small incl. token and position embeddings, the tied LM head counted once (124,439,808).
    ref_examples_per_s: float = setting(249.0, "stage-1 reference throughput (examples/s, REFERENCE_PROVENANCE)")
    ref_params: int = setting(124_439_808, "parameters of the reference model")
    ref_tokens_per_example: int = setting(512, "tokens per example of the reference")
    h2d_gb_per_s: float = setting(54.0, "stage-3 index reads per GPU, host to device (GB/s, H2D_PROVENANCE)")
    driver_device: str = setting("cpu", "where the driver runs: cpu (a Ray head without a GPU: float64 math) | cuda")
    actor_device: str = setting("cuda", "where Gram and query actors run (one GPU each): cuda | cpu (host memory)")
    host_memory_gib: float = setting(512.0, "RAM of one node: the budget of the driver, writers and CPU actors")


def check_workload(w: Workload) -> None:
    """Raise ConfigError naming the first invalid value of ``w``."""
    checks = [
        (min(w.num_examples, w.num_queries, w.num_gpus) >= 1, "num_examples, num_queries and num_gpus must be >= 1"),
        (w.gpu_memory_gib > 0, f"gpu_memory_gib={w.gpu_memory_gib}: must be > 0"),
        (0 <= w.headroom < 1, f"headroom={w.headroom}: must be in [0, 1)"),
        (min(w.ref_examples_per_s, w.ref_params, w.ref_tokens_per_example, w.h2d_gb_per_s) > 0,
         "ref_examples_per_s, ref_params, ref_tokens_per_example and h2d_gb_per_s must be > 0"),
        (w.driver_device in DEVICES and w.actor_device in DEVICES,
         f"driver_device={w.driver_device!r}, actor_device={w.actor_device!r}: choose from {DEVICES}"),
        (w.host_memory_gib > 0, f"host_memory_gib={w.host_memory_gib}: must be > 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


@dataclass
class PlanJob(Config, Workload):
    """The schema of jobs/plan.py (conf/plan.yaml, ``plan_schema``): the run's Config and the plan's Workload."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_workload(self)


def register_plan_config() -> None:
    """Register PlanJob with Hydra's ConfigStore as ``plan_schema`` (called by jobs/plan.py)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="plan_schema", node=PlanJob)


def expand_shorthands(overrides: list[str]) -> list[str]:
    """The command line with ``SHORTHANDS`` spelled as their Config keys (``batch_size=4`` → ``data.batch_size=4``)."""
    out = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        out.append(f"{SHORTHANDS[key]}={value}" if sep and key in SHORTHANDS else arg)
    return out


# ---------------------------------------------------------------- shapes and stage-1 estimates


def plan_layers(layers: dict[str, nn.Module], kind: str, f: int, c: int) -> list[LayerSpec]:
    """LayerSpecs as the Featurizer records them (c = effective rank, 0 unless kind is "factors")."""
    specs = []
    for name, (in_features, out_features) in layer_shapes(layers).items():
        d1, d2 = projected_dims(in_features, out_features, f)
        specs.append(LayerSpec(name, in_features, out_features, d1, d2,
                               effective_rank(c, d1, d2) if kind == "factors" else 0))
    return specs


def tp_sizes(config) -> list[int]:
    """Powers of two dividing both the attention heads and the key/value heads, ascending."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return [1 << k for k in range(heads.bit_length()) if heads % (1 << k) == 0 and kv_heads % (1 << k) == 0]


@dataclass(frozen=True)
class Memory:
    """Estimated GPU memory of one tensor-parallel rank during stage 1, in bytes."""

    tp: int
    weights: int
    activations: int
    projections: int
    captured: int
    store: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.projections + self.captured + self.store


def rank_memory(cfg: PlanJob, model: nn.Module, specs: list[LayerSpec], tokens_per_example: int, tp: int) -> Memory:
    """Estimated stage-1 memory of one of ``tp`` ranks: the model's weights and activations (estimates from its
    shapes), and the featurizer's device tensors (``featurizer_footprint``)."""
    kind = cfg.method.store_kind
    size = DTYPES[cfg.model.dtype].itemsize
    tokens = cfg.data.batch_size * tokens_per_example
    num_blocks, vocab = model.config.num_hidden_layers, model.config.vocab_size
    block_linears = select_layers(model)  # all of them, attributed or not
    sharded = sum(p.numel() for m in block_linears.values() for p in m.parameters())
    weights = size * (sharded // tp + sum(p.numel() for p in model.parameters()) - sharded)
    # Inputs and outputs of every linear in the blocks, per token.
    linear_io = sum(sum(rank_dims(name, i, o, tp)) for name, (i, o) in layer_shapes(block_linears).items())
    device = featurizer_footprint(specs, kind, tokens=tokens, shard_rows=min(cfg.shard_size, cfg.num_examples),
                                  hidden_size=model.config.hidden_size, tp=tp)
    if kind == "hidden":  # no_grad forward: one block live, all hidden states kept, logits
        activations = tokens * size * (linear_io // num_blocks + (num_blocks + 1) * model.config.hidden_size + vocab)
    else:  # saved for backward in every block, one block's gradients in flight; logits + float32 upcast + gradient
        activations = tokens * (linear_io * size * (num_blocks + 1) // num_blocks + vocab * (size + 8))
    return Memory(tp, weights, activations, device["projections"], device["captured"], device["store"])


def stage1_flops(cfg: PlanJob, params: int, specs: list[LayerSpec], t: int) -> float:
    """FLOPs of one example in stage 1: model pass + projections + factorization or dense G̃."""
    kind = cfg.method.store_kind
    if kind == "hidden":
        return 2.0 * params * t  # forward only
    flops = 6.0 * params * t  # forward + backward
    flops += sum(2.0 * t * (s.in_features * s.d1 + s.out_features * s.d2) for s in specs)  # X P_in, δY P_out
    if kind == "dense":
        return flops + sum(2.0 * t * s.dim for s in specs)  # G̃ = AᵀB
    return flops + sum(default_iterations(cfg.c) * 4.0 * t * s.c * (s.d1 + s.d2) for s in specs)  # Aᵀ(B v), B(A u)


def score_flops(cfg: PlanJob, specs: list[LayerSpec], hidden_size: int) -> float:
    """FLOPs of scoring Nq queries against all N examples (paper §3.3 operation counts; a truncating curvature's
    term by the cheaper route without stored g'_t, see ``curvature_flops``)."""
    n, nq = cfg.num_examples, cfg.num_queries
    curvature = Curvature.of(cfg.curvature_kind)
    if not curvature.scores_gradients:  # RepSim: one dot product of hidden states per pair
        return 2.0 * hidden_size * n * nq
    pairs = 2.0 * n * nq
    if curvature.truncates:  # g'_q = V_rᵀ g_q of the queries, c²(d1+d2) per pair for term 1, and the curvature term
        routes = curvature_flops(cfg, specs)
        return sum(2.0 * min(cfg.r, s.dim) * s.dim * nq + pairs * s.c**2 * (s.d1 + s.d2) for s in specs) \
            + min(routes["recompute g'_t"], routes["query side"])
    if curvature.preconditions:  # H⁻¹ g_q for each query, then pairwise dot products
        return sum(2.0 * s.dim**2 * nq + pairs * s.dim for s in specs)
    return sum(pairs * s.dim for s in specs)


def curvature_flops(cfg: PlanJob, specs: list[LayerSpec]) -> dict[str, float]:
    """A truncating curvature's term of one batch by route (``lorif_ray.math.scoring``): recompute g'_t = V_rᵀ g_t
    of all N examples (r·D each) then r per pair; the query side, h_q = V_r(w ⊙ g'_q) (r·D per query) then D per
    pair; stored g'_t, r per pair. Empty for other curvatures."""
    if not Curvature.of(cfg.curvature_kind).truncates:
        return {}
    n, nq = cfg.num_examples, cfg.num_queries
    out = {"recompute g'_t": 0.0, "query side": 0.0, "stored g'_t": 0.0}
    for s in specs:
        r = min(cfg.r, s.dim)
        out["recompute g'_t"] += 2.0 * r * s.dim * n + 2.0 * n * nq * r
        out["query side"] += 2.0 * r * s.dim * nq + 2.0 * n * nq * s.dim
        out["stored g'_t"] += 2.0 * n * nq * r
    return out


# ---------------------------------------------------------------- stages 2 and 3: layout


@dataclass(frozen=True)
class Layout:
    """What the code decides for these shapes on a Ray cluster.

    Attributes:
        driver, actor: the precision policy resolved on the driver's and on the Gram/query actors' device.
        shards: index shards (N / shard_size, rounded up).
        gram_actors, query_actors: actors that get shards (at most one per shard).
        gram_rows, query_rows: rows of the largest shard group of each (the first one).
        groups: stage 2's layer groups (``stages.curvature.layer_groups``), [] without a fitted curvature.
        reads_rows: whether the curvature is fitted from the rows (by Gram actors; ``Curvature.reads_rows``).
        resident: per group, whether its rows are resident in that Gram actor (``stages.rows.layer_rows``:
            rows ≤ RESIDENT_FRACTION of the device's memory) rather than streamed once per pass.
        resident_bytes: per group, those rows' bytes in the actor's math dtype (``stages.rows.row_bytes``).
        route: stage 3's curvature-term route for a batch of ``num_queries`` (``choose_route``).
    """

    driver: Precision
    actor: Precision
    shards: int
    gram_actors: int
    query_actors: int
    gram_rows: int
    query_rows: int
    groups: list[list[LayerSpec]]
    reads_rows: bool
    resident: list[bool]
    resident_bytes: list[int]
    route: str


def largest_group_rows(num_examples: int, shard_size: int, actors: int) -> tuple[int, int]:
    """(actors that get shards, rows of the largest shard group) as ``distributed.gram.shard_groups`` splits the
    shards: contiguous groups, the first ``shards % actors`` one shard larger."""
    shards = -(-num_examples // shard_size)
    workers = min(actors, shards)
    size, extra = divmod(shards, workers)
    return workers, min((size + (1 if extra else 0)) * shard_size, num_examples)


def device_bytes(cfg: PlanJob, device: str) -> float:
    """Total memory of one actor's device (``stages.rows.device_memory``): the GPU's, or the node's RAM."""
    return (cfg.gpu_memory_gib if device == "cuda" else cfg.host_memory_gib) * GIB


def plan_layout(cfg: PlanJob, specs: list[LayerSpec]) -> Layout:
    """Stage 2's layer groups and where their rows live, stage 3's route, the actors' shard groups."""
    actor = Precision.of(cfg, cfg.actor_device)
    gram_actors, gram_rows = largest_group_rows(cfg.num_examples, cfg.shard_size, cfg.cluster.gram_actors)
    query_actors, query_rows = largest_group_rows(cfg.num_examples, cfg.shard_size, cfg.cluster.query_actors)
    curvature = Curvature.of(cfg.curvature_kind)
    fitted = curvature.fit_keys  # nothing fitted: no groups
    groups = stage2.layer_groups(specs, cfg, rows=cfg.num_examples) if fitted else []
    reads_rows = bool(groups) and curvature.reads_rows
    sizes = [row_bytes(cfg.method.store_kind, g, gram_rows, actor.math) for g in groups if reads_rows]
    threshold = RESIDENT_FRACTION * device_bytes(cfg, cfg.actor_device)
    low_rank = [min(cfg.r, s.dim) for s in specs] if curvature.truncates else []
    route = choose_route(cfg.num_queries, low_rank, stored=cfg.query.store_coordinates,
                         train_self=cfg.query.normalize)
    return Layout(Precision.of(cfg, cfg.driver_device), actor, -(-cfg.num_examples // cfg.shard_size),
                  gram_actors, query_actors, gram_rows, query_rows, groups, reads_rows,
                  [b <= threshold for b in sizes], sizes, route)


# ---------------------------------------------------------------- the plan: the parts' footprints composed


@dataclass
class Plan:
    """Shapes, exact sizes and estimates of one configuration (``lorif_ray.plan_report`` for the formulas)."""

    config: PlanJob  # with data.max_length the planned T
    model_type: str
    params: int  # all parameters, tied weights once
    num_blocks: int
    specs: list[LayerSpec]  # attributed layers
    columns: dict[str, int]  # store layout, values per example
    row_parallel: dict[str, bool]  # attributed layer -> AutoTP shards its input
    memory: list[Memory]  # per candidate TP size, ascending (only cluster.tp_size when it is not 1)
    stage1_flops_per_example: float
    score_flops: float  # one query batch (Nq queries x N examples), a truncating term by its cheaper route
    curvature_flops: dict[str, float]  # the truncating term of that batch by route
    layout: Layout  # stage 2's layer groups and rows, stage 3's route, dtypes per process
    actors: list[Footprint] = field(default_factory=list)  # every process kind's footprint (``footprints``)

    def actor(self, kind: str) -> Footprint:
        """The footprint of one process kind, by the start of its name ("driver, stage 2", "Gram actor", ...)."""
        found = [a for a in self.actors if a.kind.startswith(kind)]
        if len(found) != 1:
            raise KeyError(f"{kind!r}: actor kinds are {[a.kind for a in self.actors]}")
        return found[0]

    @property
    def bytes_per_example(self) -> int:
        return sum(self.columns.values()) * BYTES_PER_VALUE[self.config.dtype]

    @property
    def index_bytes(self) -> int:
        return self.bytes_per_example * self.config.num_examples

    def curvature_bytes(self, spec: LayerSpec) -> int:
        """The saved curvature of one layer, in the dtype stage 2 writes it (the driver's math dtype)."""
        settings = stage2.fit_settings(self.config, self.layout.driver.math, "cpu", self.config.num_examples)
        return self.layout.driver.math.itemsize * Curvature.of(self.config.curvature_kind).saved_numbers(
            spec.d1, spec.d2, settings)

    def iterate_bytes(self, spec: LayerSpec) -> int:
        """The driver's rSVD iterate Q of one layer (D×k, its math dtype); 0 for a layer fitted otherwise."""
        settings = stage2.fit_settings(self.config, self.layout.driver.math, "cpu", self.config.num_examples)
        kind, k = Curvature.of(self.config.curvature_kind).row_request(spec.d1, spec.d2, settings)
        return spec.dim * k * self.layout.driver.math.itemsize if kind == "apply" else 0

    @property
    def usable_bytes(self) -> float:
        return self.config.gpu_memory_gib * GIB * (1 - self.config.headroom)

    @property
    def tp_size(self) -> int | None:
        """The smallest TP size whose estimated memory fits the usable GPU memory; None = none fits."""
        return next((m.tp for m in self.memory if m.total <= self.usable_bytes), None)

    @property
    def achieved_flops_per_s(self) -> float:
        """Of one GPU: 6 × ref_params × ref_tokens × ref_examples_per_s."""
        cfg = self.config
        return 6 * cfg.ref_params * cfg.ref_tokens_per_example * cfg.ref_examples_per_s

    @property
    def stage1_gpu_seconds(self) -> float:
        return self.config.num_examples * self.stage1_flops_per_example / self.achieved_flops_per_s

    @property
    def stage3_read_seconds(self) -> float:
        cfg = self.config
        return self.index_bytes / (cfg.h2d_gb_per_s * 1e9 * cfg.num_gpus)

    @property
    def stage3_compute_seconds(self) -> float:
        return self.score_flops / (self.achieved_flops_per_s * self.config.num_gpus)


def where_of(device: str) -> str:
    return "GPU" if device == "cuda" else "host"


def budget_of(plan: Plan, where: str) -> float:
    return plan.usable_bytes if where == "GPU" else plan.config.host_memory_gib * GIB


def stage1_footprints(plan: Plan) -> list[Footprint]:
    """Stage 1's driver, one TP rank at the chosen size (the largest tried when none fits: ``rank_memory``) and a
    member of the factorization pool, as ``distributed.featurize`` declares them."""
    cfg, layout = plan.config, plan.layout
    m = next((m for m in plan.memory if m.tp == plan.tp_size), plan.memory[-1])
    rows = min(cfg.shard_size, cfg.num_examples)
    gradient = ray_featurize.gradient_actor_footprint(cfg, plan.specs, plan.columns, rows=rows, weights=m.weights,
                                                      activations=m.activations, projections=m.projections,
                                                      captured=m.captured, store=m.store)
    writer = ray_featurize.writer_actor_footprint(cfg, plan.specs, plan.columns, rows=rows)
    return [Footprint("driver, stage 1", 1, "host", budget_of(plan, "host"),
                      ray_featurize.driver_footprint(layout.shards)),
            Footprint(f"gradient actor (one TP rank, TP = {m.tp})", cfg.num_gpus, "GPU", plan.usable_bytes, gradient),
            Footprint("writer actor", cfg.cluster.writer_actors, "host", budget_of(plan, "host"), writer)]


def footprints(plan: Plan) -> list[Footprint]:
    """Every process kind of a Ray run, in stage order (stage-2/3 kinds only where the method has them): the
    parts' own footprints, at their largest layer group."""
    cfg, layout = plan.config, plan.layout
    out = stage1_footprints(plan)
    if layout.groups:
        where = where_of(cfg.driver_device)
        held = largest_footprint((ray_gram.driver_footprint(cfg, group, plan.specs, workers=layout.gram_actors,
                                                            shards=layout.shards, math=layout.driver.math, where=where,
                                                            num_rows=cfg.num_examples)
                                  for group in layout.groups), where)
        out.append(Footprint("driver, stage 2", 1, where, budget_of(plan, "host") if where == "host"
                             else cfg.gpu_memory_gib * GIB, held))
    if layout.reads_rows:
        where = where_of(cfg.actor_device)
        held = largest_footprint((ray_gram.worker_footprint(
            cfg, group, rows=layout.gram_rows, shards=layout.shards, resident_bytes=size if resident else None,
            precision=layout.actor, driver_math=layout.driver.math, where=where, num_rows=cfg.num_examples)
            for group, resident, size in zip(layout.groups, layout.resident, layout.resident_bytes)), where)
        out.append(Footprint("Gram actor", layout.gram_actors, where, budget_of(plan, where), held))
    values, where = sum(plan.columns.values()), where_of(cfg.actor_device)
    driver = query_pool.driver_footprint(cfg, plan.specs, values=values, num_examples=cfg.num_examples,
                                         shards=layout.shards, workers=layout.query_actors,
                                         num_queries=cfg.num_queries, route=layout.route, math=layout.actor.math)
    worker = query_pool.worker_footprint(cfg, plan.specs, values=values, rows=layout.query_rows, shards=layout.shards,
                                         workers=layout.query_actors, num_queries=cfg.num_queries, route=layout.route,
                                         precision=layout.actor, where=where, num_rows=cfg.num_examples)
    return out + [Footprint("driver, stage 3", 1, "host", budget_of(plan, "host"), tuple(driver)),
                  Footprint("query actor", layout.query_actors, where, budget_of(plan, where), tuple(worker))]


def make_plan(cfg: PlanJob) -> Plan:
    """Shapes, sizes and footprints for ``cfg``; raises ConfigError for an unknown model or a bad TP size."""
    config = model_config(cfg.model)
    positions = getattr(config, "max_position_embeddings", None) or cfg.data.max_length
    if cfg.data.max_length > positions:
        log.info("data.max_length=%d exceeds the model's %d positions: planned at %d tokens",
                 cfg.data.max_length, positions, positions)
        cfg = replace(cfg, data=replace(cfg.data, max_length=positions))
    model = meta_model(config, cfg.model.dtype)
    specs = plan_layers(select_layers(model, cfg.model.layers), cfg.method.store_kind, cfg.f, cfg.c)
    candidates = tp_sizes(config)
    if cfg.cluster.tp_size != 1:  # a TP size asked for; 1 (the default) tries every size
        if cfg.cluster.tp_size not in candidates:
            raise ConfigError(f"cluster.tp_size={cfg.cluster.tp_size} must be a power of two dividing the attention "
                              f"heads ({config.num_attention_heads}) and key/value heads: one of {candidates}")
        candidates = [cfg.cluster.tp_size]
    params = sum(p.numel() for p in model.parameters())
    t = cfg.data.max_length
    plan = Plan(
        config=cfg, model_type=config.model_type, params=params, num_blocks=config.num_hidden_layers, specs=specs,
        columns=store_columns(cfg.method.store_kind, specs, config.hidden_size),
        row_parallel={s.name: is_row_parallel(s.name) for s in specs},
        memory=[rank_memory(cfg, model, specs, t, tp) for tp in candidates],
        stage1_flops_per_example=stage1_flops(cfg, params, specs, t),
        score_flops=score_flops(cfg, specs, config.hidden_size),
        curvature_flops=curvature_flops(cfg, specs),
        layout=plan_layout(cfg, specs),
    )
    plan.actors = footprints(plan)
    return plan
