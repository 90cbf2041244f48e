"""Capacity planner: index size, curvature size, GPU memory per rank and stage times from a model's
shape alone (no weights, no Ray).

The model is built on the ``meta`` device from its Hugging Face config, and its layers, projected
shapes and store columns come from the calls stage 1 makes (``select_layers``, ``projected_dims``,
``effective_rank``, the ``Featurizer`` column layout), so the plan cannot drift from the code.
Index and curvature sizes are exact byte counts of the stored values for those shapes; GPU memory and
stage times are estimates, and each printed line says what it is estimated from.

The memory of every actor kind (the driver of each stage, gradient, writer, Gram and query actors) is
counted from the tensors the code holds at once, in the dtype it holds them in (the precision policy
resolved on each process's device, ``lorif_ray.precision``), with the layout the code would choose: stage
2's layer groups (``stages.curvature.layer_groups``), rows resident or streamed (``stages.rows``), stage
3's route (``math.scoring.choose_route``); see ``Layout`` and ``ActorMemory``.

    python jobs/plan.py model=llama_70b f=4 c=1 r=4096 num_examples=1000000 gpu_memory_gib=80

    >>> plan = make_plan(PlanConfig(model=ModelConfig(arch={"model_type": "gpt2"})))  # doctest: +SKIP
    >>> plan.bytes_per_example  # doctest: +SKIP
    73728
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from lorif_ray.config import (COORDINATE_DTYPES, MATH_DTYPES, MATMUL_DTYPES, METHODS, Config,
                              MethodConfig, ModelConfig, PrecisionConfig, setting)
from lorif_ray.errors import ConfigError
from lorif_ray.math.blocks import dense_chunk_rows
from lorif_ray.math.curvature import Curvature, FitSettings
from lorif_ray.math.factorize import default_iterations, effective_rank
from lorif_ray.math.projection import projected_dims
from lorif_ray.math.scoring import choose_route
from lorif_ray.model.layers import layer_shapes, select_layers
from lorif_ray.model.loading import DTYPES
from lorif_ray.model.tensor_parallel import divide_layers
from lorif_ray.precision import Precision
from lorif_ray.stages import curvature as stage2
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.stages.rows import RESIDENT_FRACTION
from lorif_ray.store.schema import BYTES_PER_VALUE, STORAGE_DTYPES, store_columns

GIB = 2**30
PROJECTION_BYTES = 4  # projections, captured A/B and store columns are float32 on the GPU (Featurizer)
# Linears that DeepSpeed AutoTP makes row-parallel (input dim sharded, output all-reduced): its
# all-reduce names in deepspeed/module_inject/auto_tp.py, as lorif_ray/model/tensor_parallel.py
# shards them. Every other linear in the blocks is column-parallel; embeddings, norms and the LM
# head count as replicated.
ROW_PARALLEL_NAMES = ("o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2")

REFERENCE_PROVENANCE = (
    "measured ceiling on one H100: GPT-2 small shapes, random weights, bf16 autocast, B=16, T=512, "
    "plain forward+backward = 249 examples/s"
)
H2D_PROVENANCE = "measured pinned host->device copy on one H100 = 54 GB/s"
DEVICES = ("cpu", "cuda")


@dataclass
class PlanConfig:
    """What to plan for. Registered with Hydra as ``plan_schema`` (conf/plan.yaml)."""

    model: ModelConfig = setting(factory=ModelConfig, help="the model; model.arch (or model.path) gives the shape")
    method: MethodConfig = setting(factory=MethodConfig, help="the attribution method (method=lorif|logra|...)")
    curvature: Optional[str] = setting(None, "stage 2's curvature (Config.curvature); null = the method's")
    f: int = setting(4, "projection factor: d1 = I/f, d2 = O/f")
    c: int = setting(1, "factor rank (LoRIF)")
    r: int = setting(4096, "truncation rank of the curvature (LoRIF)")
    oversample: int = setting(10, "p of the randomized SVD: k = min(r + p, D) columns per layer")
    dtype: str = setting("bfloat16", "storage dtype of the index (the paper stores 16-bit values)")
    # as in conf/config.yaml, resolved per device
    precision: PrecisionConfig = setting(factory=PrecisionConfig, help="precision.coordinates (stored g'_t), "
                                                                       ".math, .matmul")
    # every example counted as full (an upper bound)
    max_length: Optional[int] = setting(None, "tokens per example; null = min(512, the model's max positions)")
    batch_size: int = setting(16, "examples per forward+backward on one replica")
    num_examples: int = setting(1_000_000, "N, training examples indexed")
    num_queries: int = setting(1000, "Nq, queries scored in one batch against all N")
    num_gpus: int = setting(8, "GPUs sharing stages 1 and 3 (perfect scaling assumed)")
    gpu_memory_gib: float = setting(80.0, "memory of one GPU (GiB)")
    headroom: float = setting(0.1, "fraction of GPU memory kept free (CUDA context, allocator, NCCL buffers)")
    tp_size: Optional[int] = setting(None, "tensor-parallel ranks per replica; null = the smallest that fits")
    # Stage-1 throughput reference (REFERENCE_PROVENANCE). Parameter count: all parameters of
    # GPT-2 small incl. token and position embeddings, the tied LM head counted once (124,439,808).
    ref_examples_per_s: float = setting(249.0, "stage-1 reference throughput (examples/s, REFERENCE_PROVENANCE)")
    ref_params: int = setting(124_439_808, "parameters of the reference model")
    ref_tokens_per_example: int = setting(512, "tokens per example of the reference")
    h2d_gb_per_s: float = setting(54.0, "stage-3 index reads per GPU, host to device (GB/s, H2D_PROVENANCE)")
    # What shapes the memory of stages 2 and 3 (the run config's keys of the same names)
    shard_size: int = setting(1024, "examples per shard")
    train_batch_rows: int = setting(2048, "query.train_batch_rows: rows per Gram-pass batch and per scoring block")
    store_coordinates: bool = setting(False, "query.store_coordinates: stage 2 stores g'_t, stage 3 scores "
                                             "against them")
    normalize: bool = setting(False, "query.normalize (never the query-side route)")
    top_k: int = setting(10, "query.top_k")
    fused: bool = setting(True, "cluster.fused: gradient actors factorize; false ships captured (A, B) to the "
                                "writers")
    writer_actors: int = setting(1, "cluster.writer_actors")
    inflight_per_actor: int = setting(2, "cluster.inflight_per_actor")
    gram_actors: Optional[int] = setting(None, "cluster.gram_actors; null = num_gpus (one per GPU)")
    query_actors: Optional[int] = setting(None, "cluster.query_actors; null = num_gpus")
    driver_device: str = setting("cpu", "where the driver runs: cpu (a Ray head without a GPU: float64 math) | cuda")
    actor_device: str = setting("cuda", "where Gram and query actors run (one GPU each): cuda | cpu (host memory)")
    host_memory_gib: float = setting(512.0, "RAM of one node: the budget of the driver, writers and CPU actors")

    def __post_init__(self) -> None:
        checks = [
            (self.method.name in METHODS, f"method={self.method.name!r}: choose one of {METHODS}"),
            (min(self.f, self.c, self.r) >= 1, f"f={self.f}, c={self.c}, r={self.r}: each must be >= 1"),
            (self.oversample >= 0, f"oversample={self.oversample}: must be >= 0"),
            (self.dtype in STORAGE_DTYPES, f"dtype={self.dtype!r}: choose one of {STORAGE_DTYPES}"),
            (self.precision.coordinates in COORDINATE_DTYPES,
             f"precision.coordinates={self.precision.coordinates!r}: choose one of {COORDINATE_DTYPES}"),
            (self.precision.math in MATH_DTYPES,
             f"precision.math={self.precision.math!r}: choose one of {MATH_DTYPES}"),
            (self.precision.matmul in MATMUL_DTYPES,
             f"precision.matmul={self.precision.matmul!r}: choose one of {MATMUL_DTYPES}"),
            (self.model.dtype in DTYPES, f"model.dtype={self.model.dtype!r}: choose one of {sorted(DTYPES)}"),
            (self.max_length is None or self.max_length >= 2, f"max_length={self.max_length}: must be >= 2"),
            (min(self.batch_size, self.num_examples, self.num_queries, self.num_gpus) >= 1,
             "batch_size, num_examples, num_queries and num_gpus must be >= 1"),
            (self.gpu_memory_gib > 0, f"gpu_memory_gib={self.gpu_memory_gib}: must be > 0"),
            (0 <= self.headroom < 1, f"headroom={self.headroom}: must be in [0, 1)"),
            (self.tp_size is None or self.tp_size >= 1, f"tp_size={self.tp_size}: must be >= 1 or null"),
            (min(self.ref_examples_per_s, self.ref_params, self.ref_tokens_per_example, self.h2d_gb_per_s) > 0,
             "ref_examples_per_s, ref_params, ref_tokens_per_example and h2d_gb_per_s must be > 0"),
            (min(self.shard_size, self.train_batch_rows, self.top_k, self.writer_actors, self.inflight_per_actor) >= 1,
             "shard_size, train_batch_rows, top_k, writer_actors and inflight_per_actor must be >= 1"),
            (all(n is None or n >= 1 for n in (self.gram_actors, self.query_actors)),
             f"gram_actors={self.gram_actors}, query_actors={self.query_actors}: each must be >= 1 or null"),
            (self.driver_device in DEVICES and self.actor_device in DEVICES,
             f"driver_device={self.driver_device!r}, actor_device={self.actor_device!r}: choose from {DEVICES}"),
            (self.host_memory_gib > 0, f"host_memory_gib={self.host_memory_gib}: must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        kinds = Curvature.registered()
        if self.curvature is not None and self.curvature not in kinds:
            raise ConfigError(f"curvature={self.curvature!r}: choose one of {tuple(kinds)}")
        if kinds[self.curvature_kind].scores_gradients == (self.method.store_kind == "hidden"):
            raise ConfigError(f"curvature={self.curvature_kind}: method={self.method.name} stores "
                              f"{self.method.store_kind} rows; hidden states take no curvature, gradients need one")

    @property
    def curvature_kind(self) -> str:
        """The curvature stage 2 fits and stage 3 scores with (``Config.curvature_kind``)."""
        return self.curvature or self.method.curvature


def register_plan_config() -> None:
    """Register PlanConfig with Hydra's ConfigStore as ``plan_schema`` (called by jobs/plan.py)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


# ---------------------------------------------------------------- model shape


def hf_config(model: ModelConfig):
    """The Hugging Face config of ``model``: from ``arch``, else ``path`` (local), else the embedded recipe."""
    from transformers import AutoConfig

    if model.arch is not None:
        arch = dict(model.arch)
        model_type = arch.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.arch needs a model_type (e.g. gpt2, llama, olmo3, apertus)")
        try:
            return AutoConfig.for_model(model_type, **arch)
        except ValueError as e:
            import transformers

            raise ConfigError(f"model.arch.model_type={model_type!r} is not a model type of "
                              f"transformers {transformers.__version__}") from e
    if model.path is not None:
        from lorif_ray.model.hub import resolve_model_path
        from lorif_ray.model.loading import read_model_config

        folder = resolve_model_path(model.path)  # a folder, or a Hub id in the local cache
        read_model_config(folder)  # a missing or damaged config.json, named
        try:
            return AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path={model.path}: no usable Hugging Face config ({e})") from e
    return embedded_config()


def embedded_config():
    """GPT2Config of the embedded default, from its recipe and the vocabulary of its corpus (~1 s)."""
    import tempfile

    from transformers import GPT2Config

    from lorif_ray.data import load_examples
    from lorif_ray.embedded.facts import build_facts_corpus, write_corpus
    from lorif_ray.embedded.tokenizer import build_tokenizer
    from lorif_ray.embedded.train import EmbeddedRecipe

    recipe = EmbeddedRecipe()
    corpus = build_facts_corpus(seed=recipe.corpus_seed, num_lands=recipe.num_lands,
                                num_queries=recipe.num_queries, num_fillers=recipe.num_fillers)
    with tempfile.TemporaryDirectory() as directory:
        train_path, queries_path = write_corpus(corpus, directory)
        examples = load_examples(train_path) + load_examples(queries_path)
    tokenizer = build_tokenizer(e.text for e in examples)  # as in embedded.train._build
    return GPT2Config(vocab_size=len(tokenizer), n_positions=recipe.n_positions, n_embd=recipe.n_embd,
                      n_layer=recipe.n_layer, n_head=recipe.n_head, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def meta_model(config, dtype: str) -> nn.Module:
    """The causal LM of ``config`` on the ``meta`` device: shapes and dtypes, no memory, no weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])


def plan_layers(layers: dict[str, nn.Module], kind: str, f: int, c: int) -> list[LayerSpec]:
    """LayerSpecs as the Featurizer records them (c = effective rank, 0 unless kind is "factors")."""
    specs = []
    for name, (in_features, out_features) in layer_shapes(layers).items():
        d1, d2 = projected_dims(in_features, out_features, f)
        specs.append(LayerSpec(name, in_features, out_features, d1, d2,
                               effective_rank(c, d1, d2) if kind == "factors" else 0))
    return specs


def is_row_parallel(name: str) -> bool:
    """Whether AutoTP shards this linear's input (row-parallel) rather than its output (column-parallel)."""
    return name.rsplit(".", 1)[-1] in ROW_PARALLEL_NAMES


def rank_dims(name: str, in_features: int, out_features: int, tp: int) -> tuple[int, int]:
    """(I, O) of the slice of a linear held by one of ``tp`` ranks."""
    return (in_features // tp, out_features) if is_row_parallel(name) else (in_features, out_features // tp)


def tp_sizes(config) -> list[int]:
    """Powers of two dividing both the attention heads and the key/value heads, ascending."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return [1 << k for k in range(heads.bit_length()) if heads % (1 << k) == 0 and kv_heads % (1 << k) == 0]


# ---------------------------------------------------------------- estimates


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


@dataclass
class Plan:
    """Shapes, exact sizes and estimates of one configuration (see ``format_plan`` for the formulas)."""

    config: PlanConfig
    model_type: str
    params: int  # all parameters, tied weights once
    num_blocks: int
    specs: list[LayerSpec]  # attributed layers
    columns: dict[str, int]  # store layout, values per example
    row_parallel: dict[str, bool]  # attributed layer -> AutoTP shards its input
    memory: list[Memory]  # per candidate TP size, ascending (only the requested one if tp_size is set)
    stage1_flops_per_example: float
    score_flops: float  # one query batch (Nq queries x N examples), LoRIF's curvature term by its cheaper route
    curvature_flops: dict[str, float]  # LoRIF's curvature term of that batch by route (without stored g'_t: the
    # cheaper of "recompute g'_t" and "query side" is in score_flops)
    layout: Layout  # stage 2's layer groups and rows, stage 3's route, dtypes per process
    actors: list[ActorMemory] = field(default_factory=list)  # every actor kind's memory (``actor_memories``)

    def actor(self, kind: str) -> ActorMemory:
        """The memory of one actor kind, by the start of its name ("driver, stage 2", "Gram actor", ...)."""
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
        """The saved curvature of one layer, in the dtype stage 2 writes it (the driver's math dtype): Woodbury
        ``Curvature.saved_numbers``."""
        cfg = self.config
        numbers = Curvature.of(cfg.curvature_kind).saved_numbers(spec.d1, spec.d2, fit_settings(cfg))
        return self.layout.driver.math.itemsize * numbers

    def iterate_bytes(self, spec: LayerSpec) -> int:
        """The driver's rSVD iterate Q of one layer (D×k, k = min(r, D) + p, its math dtype); 0 for a layer
        fitted from its D×D Gram matrix or not fitted."""
        kind, k = fit_request(self.config, spec)
        return spec.dim * k * self.layout.driver.math.itemsize if kind == "apply" else 0

    @property
    def usable_bytes(self) -> float:
        return self.config.gpu_memory_gib * GIB * (1 - self.config.headroom)

    @property
    def tp_size(self) -> Optional[int]:
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


def rank_memory(cfg: PlanConfig, model: nn.Module, specs: list[LayerSpec], tp: int) -> Memory:
    """Estimated stage-1 memory of one of ``tp`` ranks (formulas in ``format_plan``)."""
    kind = cfg.method.store_kind
    size = DTYPES[cfg.model.dtype].itemsize
    tokens = cfg.batch_size * cfg.max_length
    num_blocks, vocab = model.config.num_hidden_layers, model.config.vocab_size
    block_linears = select_layers(model)  # all of them, attributed or not
    sharded = sum(p.numel() for m in block_linears.values() for p in m.parameters())
    weights = size * (sharded // tp + sum(p.numel() for p in model.parameters()) - sharded)
    # Inputs and outputs of every linear in the blocks, per token.
    linear_io = sum(sum(rank_dims(name, i, o, tp)) for name, (i, o) in layer_shapes(block_linears).items())
    shard_rows = min(cfg.shard_size, cfg.num_examples)
    if kind == "hidden":  # no_grad forward: one block live, all hidden states kept, logits
        activations = tokens * size * (linear_io // num_blocks + (num_blocks + 1) * model.config.hidden_size + vocab)
        return Memory(tp, weights, activations, 0, 0, PROJECTION_BYTES * shard_rows * model.config.hidden_size)
    # Saved for backward in every block, plus one block's gradients in flight; logits in the compute
    # dtype plus their float32 upcast for the loss and its float32 gradient.
    activations = tokens * (linear_io * size * (num_blocks + 1) // num_blocks + vocab * (size + 8))
    projections = 0  # rows of P_in (I×d1) and P_out (O×d2) this rank holds
    for s in specs:
        rows_in, rows_out = rank_dims(s.name, s.in_features, s.out_features, tp)
        projections += rows_in * s.d1 + rows_out * s.d2
    captured = tokens * sum(s.d1 + s.d2 for s in specs)  # A (T×d1), B (T×d2) after the all-reduce: full
    # featurize_chunk keeps every batch's columns on the device until the shard ends; with TP each rank
    # makes the columns of its share of the layers (divide_layers by D, as tensor_parallel.layers_of_rank)
    share = max(sum(store_columns(kind, [s for s in specs if s.name in names], 0).values())
                for names in map(set, divide_layers({s.name: s.dim for s in specs}, tp)))
    store = shard_rows * share
    return Memory(tp, weights, activations, PROJECTION_BYTES * projections,
                  PROJECTION_BYTES * captured, PROJECTION_BYTES * store)


def stage1_flops(cfg: PlanConfig, params: int, specs: list[LayerSpec]) -> float:
    """FLOPs of one example in stage 1: model pass + projections + factorization or dense G̃."""
    t = cfg.max_length
    kind = cfg.method.store_kind
    if kind == "hidden":
        return 2.0 * params * t  # forward only
    flops = 6.0 * params * t  # forward + backward
    flops += sum(2.0 * t * (s.in_features * s.d1 + s.out_features * s.d2) for s in specs)  # X P_in, δY P_out
    if kind == "dense":
        return flops + sum(2.0 * t * s.dim for s in specs)  # G̃ = AᵀB
    return flops + sum(default_iterations(cfg.c) * 4.0 * t * s.c * (s.d1 + s.d2) for s in specs)  # Aᵀ(B v), B(A u)


def score_flops(cfg: PlanConfig, specs: list[LayerSpec], hidden_size: int) -> float:
    """FLOPs of scoring Nq queries against all N examples (paper §3.3 operation counts; LoRIF's
    curvature term by the cheaper route without stored g'_t, see ``curvature_flops``)."""
    n, nq = cfg.num_examples, cfg.num_queries
    method = cfg.method.name
    if method == "repsim":
        return 2.0 * hidden_size * n * nq
    if method == "graddot":
        return sum(2.0 * s.dim * n * nq for s in specs)
    if method == "logra":  # H⁻¹ g_q for each query, then pairwise dot products
        return sum(2.0 * s.dim**2 * nq + 2.0 * s.dim * n * nq for s in specs)
    # lorif: g'_q = V_rᵀ g_q of the queries, c²(d1+d2) per pair for term 1, and the curvature term
    routes = curvature_flops(cfg, specs)
    return sum(2.0 * min(cfg.r, s.dim) * s.dim * nq + 2.0 * n * nq * s.c**2 * (s.d1 + s.d2) for s in specs) \
        + min(routes["recompute g'_t"], routes["query side"])


def curvature_flops(cfg: PlanConfig, specs: list[LayerSpec]) -> dict[str, float]:
    """LoRIF's curvature term of one batch by route (``lorif_ray.math.scoring``): recompute g'_t = V_rᵀ g_t
    of all N examples (r·D each) then r per pair; the query side, h_q = V_r(w ⊙ g'_q) (r·D per query)
    then D per pair; stored g'_t, r per pair. Empty for other methods."""
    if cfg.method.name != "lorif":
        return {}
    n, nq = cfg.num_examples, cfg.num_queries
    out = {"recompute g'_t": 0.0, "query side": 0.0, "stored g'_t": 0.0}
    for s in specs:
        r = min(cfg.r, s.dim)
        out["recompute g'_t"] += 2.0 * r * s.dim * n + 2.0 * n * nq * r
        out["query side"] += 2.0 * r * s.dim * nq + 2.0 * n * nq * s.dim
        out["stored g'_t"] += 2.0 * n * nq * r
    return out


# ---------------------------------------------------------------- stages 2 and 3: layout and actor memory

SHARD_RECORD_BYTES = 1024  # estimate, per shard, in a driver: its ShardRecord with its strings (~540 B in
# CPython 3.12, tests/plan), its to-do and queue entries, and its entry of the manifest's JSON
ID_CHARS = 16  # length of the example ids the drivers and query actors hold as Python strings


def id_bytes(chars: int = ID_CHARS) -> int:
    """One example id in a Python list: the str object (CPython, ASCII) and its list slot."""
    return sys.getsizeof("x" * chars) + 8


def run_config(cfg: PlanConfig) -> Config:
    """The run config of the keys that decide the layout and dtypes (for the stages' own functions)."""
    return Config(method=cfg.method, curvature=cfg.curvature, f=cfg.f, c=cfg.c, r=cfg.r, oversample=cfg.oversample,
                  dtype=cfg.dtype, precision=cfg.precision, shard_size=cfg.shard_size)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fit_settings(cfg: PlanConfig) -> FitSettings:
    """The fit settings that shape the curvature's footprint (r, p)."""
    return FitSettings(rank=cfg.r, oversample=cfg.oversample)


def fit_request(cfg: PlanConfig, spec: LayerSpec) -> tuple[str, int]:
    """What stage 2 asks of a layer's rows (``Curvature.row_request``)."""
    return Curvature.of(cfg.curvature_kind).row_request(spec.d1, spec.d2, fit_settings(cfg))


def largest_group_rows(num_examples: int, shard_size: int, actors: int) -> tuple[int, int]:
    """(actors that get shards, rows of the largest shard group) as ``distributed.curvature.shard_groups``
    splits the shards: contiguous groups, the first ``shards % actors`` one shard larger."""
    shards = -(-num_examples // shard_size)
    workers = min(actors, shards)
    size, extra = divmod(shards, workers)
    return workers, min((size + (1 if extra else 0)) * shard_size, num_examples)


def row_width(spec: LayerSpec, kind: str) -> int:
    """Stored numbers per row of one layer: c(d1+d2) (factors) or D (dense)."""
    return spec.c * (spec.d1 + spec.d2) if kind == "factors" else spec.dim


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
        resident_bytes: per group, those rows' bytes in the actor's math dtype (``stages.rows.rows_bytes``).
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


def device_bytes(cfg: PlanConfig, device: str) -> float:
    """Total memory of one actor's device (``stages.rows.device_memory``): the GPU's, or the node's RAM."""
    return (cfg.gpu_memory_gib if device == "cuda" else cfg.host_memory_gib) * GIB


def plan_layout(cfg: PlanConfig, specs: list[LayerSpec]) -> Layout:
    """Stage 2's layer groups and where their rows live, stage 3's route, the actors' shard groups."""
    run = run_config(cfg)
    actor = Precision.of(run, cfg.actor_device)
    gram_actors, gram_rows = largest_group_rows(cfg.num_examples, cfg.shard_size, cfg.gram_actors or cfg.num_gpus)
    query_actors, query_rows = largest_group_rows(cfg.num_examples, cfg.shard_size, cfg.query_actors or cfg.num_gpus)
    curvature = Curvature.of(cfg.curvature_kind)
    groups = stage2.layer_groups(specs, run) if curvature.fit_keys else []  # nothing fitted: no groups
    reads_rows = bool(groups) and curvature.reads_rows
    store = cfg.method.store_kind
    sizes = [gram_rows * sum(row_width(s, store) for s in g) * actor.math.itemsize for g in groups if reads_rows]
    threshold = RESIDENT_FRACTION * device_bytes(cfg, cfg.actor_device)
    low_rank = [min(cfg.r, s.dim) for s in specs] if curvature.truncates else []
    route = choose_route(cfg.num_queries, low_rank, stored=cfg.store_coordinates, train_self=cfg.normalize)
    return Layout(Precision.of(run, cfg.driver_device), actor, -(-cfg.num_examples // cfg.shard_size),
                  gram_actors, query_actors, gram_rows, query_rows, groups, reads_rows,
                  [b <= threshold for b in sizes], sizes, route)


@dataclass(frozen=True)
class Held:
    """One thing an actor holds: what (with its shape), dtype, bytes, where ("GPU", "host": the process's RAM,
    or "object store": the shared memory of its node, which Ray fills with what it puts) and when: ``phase``
    "" = throughout, else a step of the work (only the largest step counts towards the peak)."""

    what: str
    dtype: str
    bytes: int
    where: str = "host"
    phase: str = ""


@dataclass(frozen=True)
class ActorMemory:
    """What one actor of a kind holds at its largest step, and the memory it must fit.

    Attributes:
        kind: e.g. "driver, stage 2", "Gram actor".
        count: how many such actors (1 for a driver).
        where: where its budget is, "GPU" (usable GPU memory) or "host" (``host_memory_gib``).
        budget: bytes.
        held: everything it holds, by step.
    """

    kind: str
    count: int
    where: str
    budget: float
    held: tuple[Held, ...]

    def phases(self, where: str | None = None) -> dict[str, int]:
        """Bytes per step (phase) at ``where`` (default: its budget's)."""
        out: dict[str, int] = {}
        for h in self.held:
            if h.phase and h.where == (where or self.where):
                out[h.phase] = out.get(h.phase, 0) + h.bytes
        return out

    def peak_phase(self, where: str | None = None) -> str:
        """The step at which the peak is reached ("" when nothing is step-specific)."""
        phases = self.phases(where)
        return max(phases, key=phases.get) if phases else ""

    def peak(self, where: str | None = None) -> int:
        """What is held throughout + the largest step, at ``where`` (default: its budget's)."""
        where = where or self.where
        return sum(h.bytes for h in self.held if h.where == where and not h.phase) + max(
            self.phases(where).values(), default=0)

    @property
    def fits(self) -> bool:
        return self.peak() <= self.budget

    def bytes_of(self, what: str) -> int:
        """Bytes of the held items whose description starts with ``what`` (after a "[step] " prefix)."""
        return sum(h.bytes for h in self.held if re.sub(r"^\[[^\]]*\] ", "", h.what).startswith(what))


def driver_stage1(plan: Plan) -> ActorMemory:
    """Stage 1's driver holds O(shards): a record per committed shard and its to-do entries. (The training
    input is read by the gradient actors, not the driver.)"""
    cfg, layout = plan.config, plan.layout
    held = (Held(f"shard records and to-do entries: {layout.shards:,} shards × ~{SHARD_RECORD_BYTES} B", "—",
                 layout.shards * SHARD_RECORD_BYTES),)
    return ActorMemory("driver, stage 1", 1, "host", cfg.host_memory_gib * GIB, held)


def gradient_actor(plan: Plan) -> ActorMemory:
    """One tensor-parallel rank at the chosen TP size (the largest tried when none fits): ``rank_memory``
    on its GPU, and on the host the shard it returns (fused: store columns; else captured A/B)."""
    cfg = plan.config
    m = next((m for m in plan.memory if m.tp == plan.tp_size), plan.memory[-1])
    dtype = cfg.model.dtype
    values = sum(plan.columns.values())
    rows = min(cfg.shard_size, cfg.num_examples)
    held = [Held("model shard: block linears / TP + the rest", dtype, m.weights, "GPU"),
            Held(f"activations saved for backward, B={cfg.batch_size}, T={cfg.max_length}", dtype, m.activations,
                 "GPU"),
            Held("projections P_in, P_out of the rank's rows", "float32", m.projections, "GPU"),
            Held("captured A (B·T×d1), B (B·T×d2) of every layer", "float32", m.captured, "GPU"),
            Held(f"store columns of the shard's batches ({rows:,} rows), until the shard ends", "float32", m.store,
                 "GPU")]
    if cfg.fused or cfg.method.store_kind == "hidden":
        held.append(Held(f"the shard's store columns, returned ({rows:,} × {values:,})", "float32",
                         PROJECTION_BYTES * rows * values))
    else:
        captured = rows * cfg.max_length * sum(s.d1 + s.d2 for s in plan.specs)
        held.append(Held(f"captured (A, B) of every batch of the shard, returned ({rows:,} × T × Σ(d1+d2))",
                         "float32", PROJECTION_BYTES * captured))
    return ActorMemory(f"gradient actor (one TP rank, TP = {m.tp})", cfg.num_gpus, "GPU", plan.usable_bytes,
                       tuple(held))


def writer_actor(plan: Plan) -> ActorMemory:
    """A member of the factorization pool: one shard's payload at a time, rounded to the storage dtype for
    Arrow; the payloads waiting for the pool sit in the object store (``payload_budget``)."""
    cfg = plan.config
    rows, values = min(cfg.shard_size, cfg.num_examples), sum(plan.columns.values())
    held = [Held(f"one shard's store columns ({rows:,} × {values:,})", "float32", PROJECTION_BYTES * rows * values),
            Held("the same rounded to the storage dtype (Arrow table)", cfg.dtype,
                 BYTES_PER_VALUE[cfg.dtype] * rows * values)]
    if not (cfg.fused or cfg.method.store_kind == "hidden"):
        captured = rows * cfg.max_length * sum(s.d1 + s.d2 for s in plan.specs)
        held.insert(0, Held(f"captured (A, B) of every batch of the shard ({rows:,} × T × Σ(d1+d2))", "float32",
                            PROJECTION_BYTES * captured))
    waiting = 2 * cfg.inflight_per_actor * cfg.writer_actors  # the driver's payload budget
    held.append(Held(f"shard payloads waiting for the pool (≤ {waiting}, the driver's budget)", "float32",
                     waiting * held[0].bytes, "object store"))
    return ActorMemory("writer actor", cfg.writer_actors, "host", cfg.host_memory_gib * GIB, tuple(held))


def _largest(specs: list[tuple[LayerSpec, int]], size) -> int:
    return max((size(s, k) for s, k in specs), default=0)


def driver_stage2(plan: Plan) -> ActorMemory:
    """Stage 2's driver (``run_curvature`` with ``RayGram``), at its largest layer group: the rSVD iterate Q
    of each layer, every Gram actor's partial GᵀG Q gathered at once and summed, then the final float64
    step; the fitted curvature of the group until it is written. K-FAC and EK-FAC: stage 1's statistics of
    every layer, the group's eigenbases, and (EK-FAC) every Gram actor's Λ* gathered at once."""
    cfg, layout = plan.config, plan.layout
    math, workers = layout.driver.math, layout.gram_actors
    size, name = math.itemsize, dtype_name(math)
    where = "GPU" if cfg.driver_device == "cuda" else "host"
    kronecker = Curvature.of(cfg.curvature_kind).needs_stats
    stats = sum(s.d1**2 + s.d2**2 for s in plan.specs)  # read_stats: every layer's Ã and S̃ at once
    best: tuple[Held, ...] = ()
    for group in layout.groups:
        applies = [(s, k) for s in group for kind, k in [fit_request(cfg, s)] if kind == "apply"]
        grams = [(s, s.dim) for s in group if fit_request(cfg, s)[0] == "gram"]
        eigens = sum(s.dim for s in group if fit_request(cfg, s)[0] == "eigen")
        iterate = sum(s.dim * k for s, k in applies)
        gram = sum(s.dim**2 for s, _ in grams)
        top = max(((s, k) for s, k in applies), key=lambda p: p[0].dim * p[1], default=None)
        shape = f"D×k per layer, {len(group)} layer(s)" + (f", largest {top[0].dim:,}×{top[1]:,}" if top else "")
        held = [Held(f"records of the index's {layout.shards:,} shards", "—", layout.shards * SHARD_RECORD_BYTES)]
        if kronecker:
            bases = sum(s.d1**2 + s.d2**2 for s in group)
            held += [Held("K-FAC statistics Ã (d1×d1), S̃ (d2×d2) of every layer", "float64", 8 * stats),
                     Held("[final] eigenbases Q_A, Q_S of each layer of the group, and their eigenvalues", name,
                          size * (bases + sum(s.dim for s in group)), where, "final")]
        if eigens:
            held += [Held("eigenbases Q_A, Q_S of each layer of the group", name, size * bases, where),
                     Held("[gather] the bases put for the Gram actors", name, size * bases, "object store", "gather"),
                     Held(f"[gather] Λ* (d1×d2) from each of {workers} Gram actors, gathered at once, and their sum",
                          "float64", (workers + 1) * 8 * eigens, phase="gather")]
        if applies:
            held += [Held(f"rSVD iterate Q ({shape})", name, size * iterate, where),
                     Held("[gather] Q put for the Gram actors", name, size * iterate, "object store", "gather"),
                     Held(f"[gather] GᵀG Q from each of {workers} Gram actors, gathered at once", name,
                          workers * size * iterate, phase="gather"),
                     Held("[gather] their sum", name, size * iterate, phase="gather"),
                     Held("[final] Z = GᵀG Q of each layer", name, size * iterate, where, "final"),
                     Held("[final] B = R⁻ᵀZᵀ, its SVD's Vᵀ and V reordered (one layer at a time)" +
                          ("; Q and Z in float64" if math != torch.float64 else ""), "float64",
                          (3 if math == torch.float64 else 5) * 8 * _largest(applies, lambda s, k: s.dim * k),
                          where, "final")]
        if grams:
            held += [Held(f"[gather] GᵀG (D×D) from each of {workers} Gram actors, gathered at once", "float64",
                          workers * 8 * gram, phase="gather"),
                     Held("[gather] their sum", "float64", 8 * gram, phase="gather"),
                     Held("[final] GᵀG of each layer", "float64", 8 * gram, where, "final"),
                     Held("[final] eigenvectors, their scaled copy and the result (one layer at a time)", "float64",
                          3 * 8 * _largest(grams, lambda s, k: s.dim**2), where, "final")]
        fitted = sum(plan.curvature_bytes(s) for s in group)
        held.append(Held("[final] fitted curvature of the group, until written", name, fitted, where, "final"))
        if cfg.store_coordinates and applies:
            vectors = sum(size * s.dim * min(cfg.r, s.dim) for s, _ in applies)
            held += [Held("[g'_t] fitted V_r of the group", name, vectors, where, "g'_t"),
                     Held("[g'_t] V_r put for the Gram actors", name, vectors, "object store", "g'_t")]
        memory = ActorMemory("", 1, where, 0, tuple(held))
        if not best or memory.peak() > ActorMemory("", 1, where, 0, best).peak():
            best = tuple(held)
    budget = (cfg.gpu_memory_gib if where == "GPU" else cfg.host_memory_gib) * GIB
    return ActorMemory("driver, stage 2", 1, where, budget, best)


def gram_actor(plan: Plan) -> ActorMemory:
    """A stage-2 Gram actor (``GramWorker``) with the largest shard group, at its largest layer group: the
    group's rows resident or one streamed batch, their dense rows one chunk at a time, Q in the matmul
    dtype and GᵀG Q accumulated in the dtype of the Q it receives (the driver's), or the D×D GᵀG."""
    cfg, layout = plan.config, plan.layout
    math, matmul, driver = layout.actor.math, layout.actor.matmul, layout.driver.math
    where = "GPU" if cfg.actor_device == "cuda" else "host"
    kind, rows = cfg.method.store_kind, layout.gram_rows
    best: tuple[Held, ...] = ()
    for group, resident, resident_bytes in zip(layout.groups, layout.resident, layout.resident_bytes):
        applies = [(s, k) for s in group for kind_, k in [fit_request(cfg, s)] if kind_ == "apply"]
        grams = [(s, s.dim) for s in group if fit_request(cfg, s)[0] == "gram"]
        eigens = [s for s in group if fit_request(cfg, s)[0] == "eigen"]
        width = sum(row_width(s, kind) for s in group)
        dense = sum(s.dim for s in group)
        held = [Held(f"records of the index's {layout.shards:,} shards", "—", layout.shards * SHARD_RECORD_BYTES)]
        if resident:
            chunk = min(rows, dense_chunk_rows(dense, math))
            held += [Held(f"rows of the group's layers, resident ({rows:,} × {width:,})", dtype_name(math),
                          resident_bytes, where),
                     Held("[load] the decoded batches, until concatenated", dtype_name(math), resident_bytes, where,
                          "load")]
        else:
            chunk = min(rows, cfg.train_batch_rows, cfg.shard_size)
            held.append(Held(f"[pass] one streamed batch of the group's columns ({chunk:,} × {width:,})",
                             dtype_name(math), chunk * width * math.itemsize, where, "pass"))
        if kind == "factors":
            held.append(Held(f"[pass] dense rows vec(u vᵀ) of one chunk ({chunk:,} × ΣD = {dense:,})",
                             dtype_name(math), chunk * dense * math.itemsize, where, "pass"))
        if applies:
            iterate = sum(s.dim * k for s, k in applies)
            largest = _largest(applies, lambda s, k: s.dim * k)
            held += [Held("[pass] Q (D×k per layer) in the matmul dtype", dtype_name(matmul),
                          matmul.itemsize * iterate, where, "pass"),
                     Held("[pass] GᵀG Q accumulated, in the dtype of the Q it receives", dtype_name(driver),
                          driver.itemsize * iterate, where, "pass"),
                     Held("[pass] one chunk's G_bᵀ(G_b Q) before it is added (one layer at a time)",
                          dtype_name(matmul), (matmul.itemsize + (driver.itemsize if driver != matmul else 0))
                          * largest, where, "pass"),
                     Held("[pass] Q received and GᵀG Q returned", dtype_name(driver), 2 * driver.itemsize * iterate,
                          "host", "pass")]
            if matmul != math:
                held.append(Held("[pass] one chunk's rows cast to the matmul dtype (one layer at a time)",
                                 dtype_name(matmul), chunk * max(s.dim for s, _ in applies) * matmul.itemsize,
                                 where, "pass"))
            if cfg.store_coordinates:
                ranks = sum(min(cfg.r, s.dim) for s, _ in applies)
                held += [Held("[g'_t] V_r of the group's layers", dtype_name(math),
                              math.itemsize * sum(s.dim * min(cfg.r, s.dim) for s, _ in applies), where, "g'_t"),
                         Held(f"[g'_t] g'_t of its rows, by batch and concatenated ({rows:,} × {ranks:,}, twice)",
                              dtype_name(math), 2 * rows * ranks * math.itemsize, where, "g'_t")]
        if grams:
            gram = sum(s.dim**2 for s, _ in grams)
            largest = _largest(grams, lambda s, k: s.dim**2)
            held += [Held("[pass] GᵀG (D×D) accumulated", "float64", 8 * gram, where, "pass"),
                     Held("[pass] one chunk's G_bᵀG_b before it is added (one layer at a time)", "float64",
                          8 * largest, where, "pass"),
                     Held("[pass] GᵀG returned", "float64", 8 * gram, "host", "pass")]
            if math != torch.float64:
                held.append(Held("[pass] one chunk's rows in float64 (one layer at a time)", "float64",
                                 8 * chunk * max(s.dim for s, _ in grams), where, "pass"))
        if eigens:  # GramPass: bases as the driver sends them, Λ* in float64, eigenvalue_sums per chunk
            bases = sum(s.d1**2 + s.d2**2 for s in eigens)
            held += [Held("[pass] eigenbases Q_A, Q_S of the group's layers, as received", dtype_name(driver),
                          driver.itemsize * bases, where, "pass"),
                     Held("[pass] Λ* (d1×d2) accumulated", "float64", 8 * sum(s.dim for s in eigens), where, "pass"),
                     Held("[pass] one chunk rotated, in float64 and squared (one layer at a time)", "float64",
                          chunk * max(s.dim for s in eigens) * (driver.itemsize + 16), where, "pass"),
                     Held("[pass] bases received and Λ* returned", "float64",
                          driver.itemsize * bases + 8 * sum(s.dim for s in eigens), "host", "pass")]
        memory = ActorMemory("", 1, where, 0, tuple(held))
        if not best or memory.peak() > ActorMemory("", 1, where, 0, best).peak():
            best = tuple(held)
    budget = plan.usable_bytes if where == "GPU" else cfg.host_memory_gib * GIB
    return ActorMemory("Gram actor", layout.gram_actors, where, budget, best)


def query_actor(plan: Plan) -> ActorMemory:
    """A stage-3 query actor (``QueryWorker``) with the largest shard group: its rows resident in the
    stacked layout (in the math dtype, whatever the storage dtype), stored g'_t, V_r of its share of the
    layers, and per batch the query terms of the route and one block's products."""
    cfg, layout = plan.config, plan.layout
    math, matmul = layout.actor.math, layout.actor.matmul
    m, mm, x = dtype_name(math), dtype_name(matmul), math.itemsize
    where = "GPU" if cfg.actor_device == "cuda" else "host"
    rows, nq, route = layout.query_rows, cfg.num_queries, layout.route
    values = sum(plan.columns.values())
    nt = min(cfg.train_batch_rows, rows)
    curvature = Curvature.of(cfg.curvature_kind)
    low = plan.specs if curvature.truncates else []
    ranks = sum(min(cfg.r, s.dim) for s in low)
    dense = sum(s.dim for s in low)
    vectors = x * sum(s.dim * min(cfg.r, s.dim) for s in low)
    held = [Held(f"records of the index's {layout.shards:,} shards", "—", layout.shards * SHARD_RECORD_BYTES),
            Held(f"its example ids ({rows:,} Python str)", "—", rows * id_bytes()),
            Held(f"its rows, resident in the stacked layout ({rows:,} × {values:,}; stored as {cfg.dtype})", m,
                 rows * values * x, where),
            Held(f"[score] the query batch's columns, and stacked for the products ({nq:,} × {values:,})", m,
                 nq * values * (x + matmul.itemsize), where, "score"),
            Held(f"[score] scores of one block and the running top-k ({nq:,} × ({nt:,} + 2·{cfg.top_k}))", m,
                 nq * (2 * nt * x + 2 * cfg.top_k * (x + 8)), where, "score")]
    preconditioned = curvature.preconditions  # term 1 is H⁻¹ g_q: no scale (Curvature.scale is None)
    if cfg.method.store_kind == "factors":  # layers of equal (d1, d2, c) are one bmm (RowLayout.factor_groups)
        groups: dict[tuple, list[int]] = {}
        for s in plan.specs:
            groups.setdefault((s.d1, s.d2, s.c), []).append(s.dim)
        if preconditioned:  # ⟨H⁻¹ g_q, vec(Σ u vᵀ)⟩ per group: the group's dense rows of the block
            held += [Held(f"[score] H⁻¹ g_q of every layer ({nq:,} × ΣD)", mm,
                          nq * sum(s.dim for s in plan.specs) * matmul.itemsize, where, "score"),
                     Held("[score] dense rows vec(u vᵀ) of one block, the largest layer group", mm,
                          nt * max(sum(g) for g in groups.values()) * matmul.itemsize, where, "score")]
        else:
            term_one = max(len(dims) * nq * c * nt * c for (_, _, c), dims in groups.items())
            held.append(Held("[score] term 1 of the largest factor group: uᵀu and vᵀv (L × nq·c × nt·c)", m,
                             2 * term_one * (x + (matmul.itemsize if matmul != math else 0)), where, "score"))
    if preconditioned:  # every layer's curvature, as saved
        numbers = sum(curvature.saved_numbers(s.d1, s.d2, fit_settings(cfg)) for s in plan.specs)
        held.append(Held(f"every layer's {curvature.holds}", m, x * numbers, where))
    if low:
        shares = divide_layers({s.name: s.dim * min(cfg.r, s.dim) for s in low}, layout.query_actors)
        by_name = {s.name: s for s in low}
        share = max(sum(by_name[n].dim * min(cfg.r, by_name[n].dim) for n in names) for names in shares)
        held += [Held(f"λ and σ² of every layer ({ranks:,})", m, ranks * x, where),
                 Held("V_r of its share of the layers, to project queries (divide_layers by D·r)", m, share * x,
                      where),
                 Held(f"[score] g'_q of the queries, concatenated and weighted ({nq:,} × Σr = {ranks:,})", m,
                      nq * ranks * (x + matmul.itemsize), where, "score")]
        if route in ("stored", "query"):
            held.append(Held("[score] g'_q of every layer, received from the driver", m, nq * ranks * x, "host",
                             "score"))
        if route == "stored":
            held.append(Held(f"stored g'_t of its rows ({rows:,} × Σr = {ranks:,}; stored as "
                             f"{cfg.precision.coordinates})", m, rows * ranks * x, where))
        if route == "query":
            held += [Held(f"[score] h_q = V_r(w ⊙ g'_q) of every layer, received ({nq:,} × ΣD = {dense:,})", m,
                          nq * dense * x, "host", "score"),
                     Held("[score] h_q stacked per layer group for the products", mm, nq * dense * matmul.itemsize,
                          where, "score")]
        if route == "recompute":
            held.append(Held("[score] every layer's V_r (read on the first such batch), and stacked per layer group",
                             m, 2 * vectors + (vectors // x * matmul.itemsize if matmul != math else 0), where,
                             "score"))
        if route in ("query", "recompute"):  # _coordinate_rows forms every coordinate group's rows at once
            held.append(Held(f"[score] dense rows vec(u vᵀ) of one block, every low-rank layer at once "
                             f"({nt:,} × ΣD = {dense:,})", m, nt * dense * x, where, "score"))
            if matmul != math:
                coordinate_groups: dict[tuple, int] = {}
                for s in low:
                    key = (s.d1, s.d2, s.c, min(cfg.r, s.dim))
                    coordinate_groups[key] = coordinate_groups.get(key, 0) + s.dim
                held.append(Held("[score] the largest layer group's dense rows cast to the matmul dtype", mm,
                                 nt * max(coordinate_groups.values()) * matmul.itemsize, where, "score"))
    budget = plan.usable_bytes if where == "GPU" else cfg.host_memory_gib * GIB
    return ActorMemory("query actor", layout.query_actors, where, budget, tuple(held))


def driver_stage3(plan: Plan) -> ActorMemory:
    """Stage 3's driver (``run_query`` with ``ray_query``): the query batch's columns (float32, from the
    gradient replica that featurized them), the route's query terms gathered from the query actors and
    scattered back through the object store, the per-actor top-k it merges and the ids of those rows (all N
    ids only for the sidecar of full-score files, not counted)."""
    cfg, layout = plan.config, plan.layout
    nq, route, workers = cfg.num_queries, layout.route, layout.query_actors
    x = layout.actor.math.itemsize
    m = dtype_name(layout.actor.math)
    values = sum(plan.columns.values())
    low = plan.specs if Curvature.of(cfg.curvature_kind).truncates else []
    ranks, dense = sum(min(cfg.r, s.dim) for s in low), sum(s.dim for s in low)
    columns = PROJECTION_BYTES * nq * values
    k = min(cfg.top_k, cfg.num_examples)
    held = [Held(f"records of the index's {layout.shards:,} shards", "—", layout.shards * SHARD_RECORD_BYTES),
            Held(f"[merge] ids of the top-k rows (ids_of_rows: {nq:,} × {k} Python str)", "—", nq * k * id_bytes(),
                 phase="merge"),
            Held(f"the query batch's columns ({nq:,} × {values:,})", "float32", columns),
            Held(f"[merge] top-k of each of {workers} query actors, concatenated", m,
                 2 * workers * nq * k * (x + 8), phase="merge")]
    scattered = columns
    if route in ("stored", "query") and low:
        terms = nq * ranks * x + (nq * dense * x if route == "query" else 0)
        what = "g'_q" + (" and h_q (nq × ΣD)" if route == "query" else "")
        held += [Held("[scatter] the columns put for the query actors to project them", "float32", columns,
                      "object store", "scatter"),
                 Held(f"[scatter] {what} of every layer, gathered from the query actors", m, terms, phase="scatter")]
        scattered += terms
    held.append(Held("[scatter] the batch's payload (columns" + (" and query terms" if scattered > columns else "")
                     + ") put for the query actors", m, scattered, "object store", "scatter"))
    return ActorMemory("driver, stage 3", 1, "host", cfg.host_memory_gib * GIB, tuple(held))


def actor_memories(plan: Plan) -> list[ActorMemory]:
    """Every actor kind of a Ray run, in stage order (stage-2/3 kinds only where the method has them)."""
    out = [driver_stage1(plan), gradient_actor(plan), writer_actor(plan)]
    if plan.layout.groups:
        out.append(driver_stage2(plan))
    if plan.layout.reads_rows:
        out.append(gram_actor(plan))
    return out + [driver_stage3(plan), query_actor(plan)]


def make_plan(cfg: PlanConfig) -> Plan:
    """Shapes, sizes and estimates for ``cfg``; raises ConfigError for an unknown model or a bad TP size."""
    config = hf_config(cfg.model)
    positions = getattr(config, "max_position_embeddings", None) or cfg.max_length or 512
    cfg = replace(cfg, max_length=cfg.max_length or min(512, positions))
    if cfg.max_length > positions:
        raise ConfigError(f"max_length={cfg.max_length} exceeds the model's {positions} positions")
    model = meta_model(config, cfg.model.dtype)
    specs = plan_layers(select_layers(model, cfg.model.layers), cfg.method.store_kind, cfg.f, cfg.c)
    candidates = tp_sizes(config)
    if cfg.tp_size is not None:
        if cfg.tp_size not in candidates:
            raise ConfigError(f"tp_size={cfg.tp_size} must be a power of two dividing the attention heads "
                              f"({config.num_attention_heads}) and key/value heads: one of {candidates}")
        candidates = [cfg.tp_size]
    params = sum(p.numel() for p in model.parameters())
    plan = Plan(
        config=cfg, model_type=config.model_type, params=params, num_blocks=config.num_hidden_layers, specs=specs,
        columns=store_columns(cfg.method.store_kind, specs, config.hidden_size),
        row_parallel={s.name: is_row_parallel(s.name) for s in specs},
        memory=[rank_memory(cfg, model, specs, tp) for tp in candidates],
        stage1_flops_per_example=stage1_flops(cfg, params, specs),
        score_flops=score_flops(cfg, specs, config.hidden_size),
        curvature_flops=curvature_flops(cfg, specs),
        layout=plan_layout(cfg, specs),
    )
    plan.actors = actor_memories(plan)
    return plan


# ---------------------------------------------------------------- report


def human_bytes(n: float) -> str:
    """Binary units: 73728 → '72.00 KiB'."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.2f} {unit}"
    return f"{n / 1024:.2f} TiB"


def human_seconds(s: float) -> str:
    """'42.0 s', '3.5 min', '7.2 h', '12.3 days'."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"


def layer_groups(plan: Plan) -> list[tuple[str, int, LayerSpec]]:
    """(name with block index → ``*``, count, first spec) of layers with equal shapes, in module order."""
    groups: dict[tuple, list] = {}
    for s in plan.specs:
        key = (re.sub(r"(?<=\.)\d+(?=\.)", "*", s.name), s.in_features, s.out_features, s.d1, s.d2, s.c)
        groups.setdefault(key, [key[0], 0, s])[1] += 1
    return [tuple(g) for g in groups.values()]


SUMMARY_HEADER = ("| model | params | layers | bytes/example | index | curvature (saved) | GPU memory per "
                  "rank, TP = 1 / 2 / 4 / 8 | smallest TP on 80 GiB | stage 1 estimate | one query batch (1,000 × N) |")
MEMORY_HEADER = ("| model | stage 2: layer groups, rows in the Gram actors | stage 3 route | driver peak, stage 1 / 2 "
                 "/ 3 (host) | Gram actor peak | query actor peak |")


def summary_row(plan: Plan, label: str) -> str:
    """One row of the README's condensed table (``SUMMARY_HEADER``), generated from the plan so the two
    cannot drift apart (tests/plan checks the README against it)."""
    cfg = plan.config
    memory = " / ".join(f"{m.total / GIB:.1f}" for m in plan.memory if m.tp in (1, 2, 4, 8)) + " GiB"
    curvature = sum(plan.curvature_bytes(s) for s in plan.specs)
    return (f"| {label} | {plan.params / 1e9:.2f} B | {len(plan.specs)} | {human_bytes(plan.bytes_per_example)} | "
            f"{human_bytes(plan.index_bytes)} | {human_bytes(curvature)} {dtype_name(plan.layout.driver.math)} | "
            f"{memory} | {plan.tp_size or 'none'} | "
            f"{human_seconds(plan.stage1_gpu_seconds / cfg.num_gpus)} on {cfg.num_gpus} GPUs | "
            f"{human_seconds(plan.stage3_read_seconds + plan.stage3_compute_seconds)} on {cfg.num_gpus} GPUs |")


def _peak_cell(memory: ActorMemory) -> str:
    verdict = "" if memory.fits else f", over {human_bytes(memory.budget)}"
    return f"{human_bytes(memory.peak())} {memory.where}{verdict}"


def memory_row(plan: Plan, label: str) -> str:
    """One row of the README's memory table (``MEMORY_HEADER``), generated from the plan like ``summary_row``."""
    layout = plan.layout
    drivers = [a.peak() for a in plan.actors if a.kind.startswith("driver")]
    gram = _peak_cell(plan.actor("Gram actor")) if layout.reads_rows else "—"
    groups = (f"{len(layout.groups)}, {sum(layout.resident)} resident / {len(layout.groups) - sum(layout.resident)} "
              f"streamed" if layout.reads_rows else f"{len(layout.groups)}, no rows read" if layout.groups else "—")
    return (f"| {label} | {groups} | {layout.route} | {' / '.join(human_bytes(b) for b in drivers)} | {gram} | "
            f"{_peak_cell(plan.actor('query actor'))} |")


def format_layout(plan: Plan) -> list[str]:
    """Bullets: the dtypes of each process, stage 2's groups and rows, stage 3's route and actors."""
    cfg, layout = plan.config, plan.layout
    lines = [f"- layout (Ray): precision: the driver on {cfg.driver_device} fits and saves the curvature in "
             f"{dtype_name(layout.driver.math)}; Gram and query actors on {cfg.actor_device}: math "
             f"{dtype_name(layout.actor.math)}, matmul {dtype_name(layout.actor.matmul)} (precision.math="
             f"{cfg.precision.math}, precision.matmul={cfg.precision.matmul}: auto = float64 on a CPU, float32 on a "
             f"GPU); index {cfg.dtype}; stored g'_t {cfg.precision.coordinates}"]
    if layout.groups and not layout.reads_rows:
        lines.append(f"- layout: stage 2: {len(layout.groups)} layer groups fitted in the driver from stage 1's "
                     f"statistics, no pass over the rows (curvature={cfg.curvature_kind}: no Gram actors)")
    elif layout.groups:
        resident = sum(layout.resident)
        largest = max(layout.resident_bytes)
        lines.append(
            f"- layout: stage 2: {len(layout.groups)} layer groups (consecutive layers whose float64 fitting state "
            f"fits {human_bytes(stage2.GROUP_BYTES)}, a larger layer alone: stages/curvature.py layer_groups), one "
            f"read of a group's rows per pass; {layout.gram_actors} Gram actors of ≤ {layout.gram_rows:,} rows; their "
            f"rows resident in {resident} of {len(layout.groups)} groups, streamed from Parquet in the others "
            f"(resident when ≤ {RESIDENT_FRACTION:.0%} of the actor's "
            f"{human_bytes(device_bytes(cfg, cfg.actor_device))}: stages/rows.py layer_rows; largest group "
            f"{human_bytes(largest)} in {dtype_name(layout.actor.math)})")
    else:
        lines.append(f"- layout: stage 2: nothing to fit (curvature={cfg.curvature_kind}: no Gram actors)")
    why = {"stored": "stored g'_t", "query": f"Nq = {cfg.num_queries:,} < min r, no I(t, t) needed",
           "recompute": "Nq ≥ min r, or I(t, t) needed (normalize)", "none": "no low-rank term"}[layout.route]
    lines.append(f"- layout: stage 3: route \"{layout.route}\" ({why}: math/scoring.py choose_route); "
                 f"{layout.query_actors} query actors of ≤ {layout.query_rows:,} resident rows")
    return lines


def format_memory(plan: Plan) -> list[str]:
    """The memory table: per actor kind what it holds, dtype, where, bytes; then its peak and budget."""
    lines = ["- estimate: memory of each actor kind at its largest step, from the tensors the code holds at once in "
             "the dtype it holds them (\"[step]\" = held during that step only; peak = what is held throughout + "
             "the largest step; object store = shared memory of the actor's node; not counted: CUDA context, "
             "allocator caching, Python, Ray and Parquet buffers):",
             "",
             "| actor (count) | holds | dtype | where | bytes |",
             "|---|---|---|---|---:|"]
    for memory in plan.actors:
        first = f"{memory.kind} ({memory.count})"
        for held in memory.held:
            lines.append(f"| {first} | {held.what} | {held.dtype} | {held.where} | {human_bytes(held.bytes)} |")
            first = ""
        for where in dict.fromkeys([memory.where] + [h.where for h in memory.held]):
            step = memory.peak_phase(where)
            step = f" (throughout + [{step}])" if step else ""
            verdict = ""
            if where == memory.where:
                fits = "fits" if memory.fits else "**does not fit**"
                verdict = f": {fits} {human_bytes(memory.budget)}"
            lines.append(f"| | **peak**{step}{verdict} | | {where} | **{human_bytes(memory.peak(where))}** |")
    return lines


def format_plan(plan: Plan) -> str:
    """The plan as Markdown: a table with one row per layer shape, a memory table per TP size, and one
    bullet per figure saying whether it is exact or an estimate, and from what."""
    cfg = plan.config
    kind = cfg.method.store_kind
    size = BYTES_PER_VALUE[cfg.dtype]
    per_value = {"factors": "c(d1+d2)", "dense": "d1·d2", "hidden": "hidden"}[kind]
    lines = [
        f"model: {plan.model_type}, {plan.params:,} parameters (all, tied weights once; meta-device build), "
        f"{plan.num_blocks} blocks, {len(plan.specs)} attributed layers",
        "",
        f"method={cfg.method.name} f={cfg.f} c={cfg.c} r={cfg.r} p={cfg.oversample} storage={cfg.dtype} "
        f"model.dtype={cfg.model.dtype} N={cfg.num_examples:,} Nq={cfg.num_queries:,} B={cfg.batch_size} "
        f"T={cfg.max_length} GPUs={cfg.num_gpus} GPU memory={cfg.gpu_memory_gib:g} GiB (headroom {cfg.headroom:.0%})",
        "",
        f"| layer | count | I | O | d1 | d2 | c | TP split | values/ex ({per_value}) | curvature "
        f"({dtype_name(plan.layout.driver.math)}) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for pattern, count, s in layer_groups(plan):
        values = {"factors": s.c * (s.d1 + s.d2), "dense": s.dim, "hidden": 0}[kind]
        split = "row" if plan.row_parallel[s.name] else "column"
        lines.append(f"| {pattern} | {count} | {s.in_features} | {s.out_features} | {s.d1} | {s.d2} | {s.c} | "
                     f"{split} | {count * values:,} | {human_bytes(count * plan.curvature_bytes(s))} |")
    curvature = sum(plan.curvature_bytes(s) for s in plan.specs)
    largest = max(plan.curvature_bytes(s) for s in plan.specs)
    lines.append(f"| total | {len(plan.specs)} | | | | | | | {sum(plan.columns.values()):,} | {human_bytes(curvature)} |")
    math = dtype_name(plan.layout.driver.math)
    saved = Curvature.of(cfg.curvature_kind).saved_rule
    curvature_rule = f"per layer {saved}, in {math}" if saved else "none for this method"
    curvature_rule += " (stage 2 saves it in the driver's math dtype: precision.math on driver_device)"
    lines += [
        "",
        f"- exact: bytes per example: {human_bytes(plan.bytes_per_example)} "
        f"({plan.bytes_per_example:,} B = {sum(plan.columns.values()):,} values × {size} B {cfg.dtype}; {per_value} per layer)",
        f"- exact: index size: {human_bytes(plan.index_bytes)} (N × bytes per example; values only, "
        "without example ids, Parquet pages or the manifest)",
        f"- exact: curvature size: {human_bytes(curvature)}, largest layer {human_bytes(largest)} ({curvature_rule})",
        "",
        "- estimate: stage-1 GPU memory per TP rank (weights = (block linears/tp + embeddings, norms and LM head) "
        "× model dtype; activations = B·T·[Σ linear "
        "in+out per rank × model dtype × (L+1)/L + vocab × (model dtype + 8 B)]: every linear's input and output "
        "saved in each of L blocks + one block of gradients in flight + logits with their float32 copy and "
        "gradient, no checkpointing, no weight gradients; projections = Σ (I·d1 + O·d2) rows held by the rank, "
        "captured A/B = B·T·Σ(d1+d2), store = the columns of the shard's batches, kept on the device until the "
        "shard ends (with TP: of the rank's share of the layers), all float32):",
        "",
        "| TP | weights | activations | projections | captured A/B | store | total | fits |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in plan.memory:
        fits = "yes" if m.total <= plan.usable_bytes else "no"
        lines.append(f"| {m.tp} | {human_bytes(m.weights)} | {human_bytes(m.activations)} | {human_bytes(m.projections)} "
                     f"| {human_bytes(m.captured)} | {human_bytes(m.store)} | {human_bytes(m.total)} | {fits} |")
    lines.append("")
    tried = ", ".join(str(m.tp) for m in plan.memory)
    if plan.tp_size is None:
        lines.append(f"- estimate: TP size: none of {tried} fits {human_bytes(plan.usable_bytes)} usable: "
                     "reduce batch_size or max_length")
    else:
        lines.append(f"- estimate: TP size: {plan.tp_size} (smallest of {tried} whose total fits "
                     f"{human_bytes(plan.usable_bytes)} = GPU memory × (1 − headroom))")
    lines += ["", *format_layout(plan), "", *format_memory(plan)]
    s1 = plan.stage1_gpu_seconds
    lines += [
        "",
        f"- estimate: achieved FLOP/s per GPU: {plan.achieved_flops_per_s / 1e12:.1f} TFLOP/s "
        f"(= 6 × {cfg.ref_params:,} params × {cfg.ref_tokens_per_example} tokens × {cfg.ref_examples_per_s:g} "
        f"examples/s; {REFERENCE_PROVENANCE})",
        f"- estimate: stage 1 (index): {human_seconds(s1 / cfg.num_gpus)} on {cfg.num_gpus} GPUs "
        f"({s1 / 3600:,.1f} GPU-hours) from {plan.stage1_flops_per_example:.3e} FLOPs/example "
        f"(6 × params × T for forward+backward, or 2 × params × T forward only for repsim, + projections "
        f"+ factorization/dense G̃) / achieved FLOP/s; T = max_length for every example; perfect scaling, "
        "no TP communication, no I/O stall",
        f"- estimate: stage 3 (one batch of {cfg.num_queries:,} queries × N): "
        f"{human_seconds(plan.stage3_read_seconds + plan.stage3_compute_seconds)} on {cfg.num_gpus} GPUs = read "
        f"{human_seconds(plan.stage3_read_seconds)} (index bytes / ({cfg.h2d_gb_per_s:g} GB/s × GPUs); "
        f"{H2D_PROVENANCE}) + compute {human_seconds(plan.stage3_compute_seconds)} ({plan.score_flops:.3e} FLOPs "
        "/ achieved FLOP/s; paper §3.3 operation counts); no overlap of read and compute",
    ]
    if plan.curvature_flops:
        speed = plan.achieved_flops_per_s * cfg.num_gpus
        coordinate_size = BYTES_PER_VALUE[cfg.precision.coordinates]
        stored = cfg.num_examples * sum(min(cfg.r, s.dim) for s in plan.specs) * coordinate_size
        recompute, query_side, from_stored = (human_seconds(flops / speed) for flops in plan.curvature_flops.values())
        lines.append("- estimate: of which LoRIF's curvature term, by route (the compute above takes the cheaper "
                     f"of the first two): recompute g'_t = V_rᵀ g_t of all N examples {recompute}; query side "
                     f"h_q = V_r(w ⊙ g'_q) {query_side} (cheaper when Nq < r); stored g'_t {from_stored} "
                     f"(query.store_coordinates: N × Σ min(r, D) × {coordinate_size} B in "
                     f"{cfg.precision.coordinates} = "
                     f"{human_bytes(stored)} more disk)")
    lines += [
        "- not estimated: stage 2 (curvature) time, disk throughput, Ray scheduling overhead",
    ]
    return "\n".join(lines)
