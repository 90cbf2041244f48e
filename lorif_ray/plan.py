"""Capacity planner: index size, curvature size, GPU memory per rank and stage times from a model's
shape alone (no weights, no Ray).

The model is built on the ``meta`` device from its Hugging Face config, and its layers, projected
shapes and store columns come from the calls stage 1 makes (``select_layers``, ``projected_dims``,
``effective_rank``, the ``Featurizer`` column layout), so the plan cannot drift from the code.
Index and curvature sizes are exact byte counts of the stored values for those shapes; GPU memory and
stage times are estimates, and each printed line says what it is estimated from.

    python jobs/plan.py model=llama_70b f=4 c=1 r=4096 num_examples=1000000 gpu_memory_gib=80

    >>> plan = make_plan(PlanConfig(model=ModelConfig(arch={"model_type": "gpt2"})))  # doctest: +SKIP
    >>> plan.bytes_per_example  # doctest: +SKIP
    73728
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import nn

from lorif_ray.config import METHODS, MethodConfig, ModelConfig
from lorif_ray.errors import ConfigError
from lorif_ray.math.factorize import default_iterations, effective_rank
from lorif_ray.math.projection import projected_dims
from lorif_ray.model.layers import layer_shapes, select_layers
from lorif_ray.model.loading import DTYPES
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.store.schema import BYTES_PER_VALUE, STORAGE_DTYPES

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


@dataclass
class PlanConfig:
    """What to plan for. Registered with Hydra as ``plan_schema`` (conf/plan.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # model.arch (or model.path) gives the shape
    method: MethodConfig = field(default_factory=MethodConfig)
    f: int = 4
    c: int = 1
    r: int = 4096
    oversample: int = 10  # p of the randomized SVD: k = min(r + p, D) columns per layer
    dtype: str = "bfloat16"  # storage dtype of the index (the paper stores 16-bit values)
    coordinates_dtype: str = "float32"  # stored g'_t (precision.coordinates; 16 bits are far off, see README)
    # Tokens per example, every example counted as full (an upper bound); None = min(512, the model's
    # max positions).
    max_length: Optional[int] = None
    batch_size: int = 16  # examples per forward+backward on one replica
    num_examples: int = 1_000_000  # N, training examples indexed
    num_queries: int = 1000  # Nq, queries scored in one batch against all N
    num_gpus: int = 8  # GPUs sharing stages 1 and 3 (perfect scaling assumed)
    gpu_memory_gib: float = 80.0
    headroom: float = 0.1  # fraction of GPU memory kept free (CUDA context, allocator, NCCL buffers)
    tp_size: Optional[int] = None  # tensor-parallel ranks per replica; None = the smallest that fits
    # Stage-1 throughput reference (REFERENCE_PROVENANCE). Parameter count: all parameters of
    # GPT-2 small incl. token and position embeddings, the tied LM head counted once (124,439,808).
    ref_examples_per_s: float = 249.0
    ref_params: int = 124_439_808
    ref_tokens_per_example: int = 512
    h2d_gb_per_s: float = 54.0  # stage-3 index reads (H2D_PROVENANCE), per GPU, GB = 1e9 bytes

    def __post_init__(self) -> None:
        checks = [
            (self.method.name in METHODS, f"method={self.method.name!r}: choose one of {METHODS}"),
            (min(self.f, self.c, self.r) >= 1, f"f={self.f}, c={self.c}, r={self.r}: each must be >= 1"),
            (self.oversample >= 0, f"oversample={self.oversample}: must be >= 0"),
            (self.dtype in STORAGE_DTYPES, f"dtype={self.dtype!r}: choose one of {STORAGE_DTYPES}"),
            (self.coordinates_dtype in STORAGE_DTYPES,
             f"coordinates_dtype={self.coordinates_dtype!r}: choose one of {STORAGE_DTYPES}"),
            (self.model.dtype in DTYPES, f"model.dtype={self.model.dtype!r}: choose one of {sorted(DTYPES)}"),
            (self.max_length is None or self.max_length >= 2, f"max_length={self.max_length}: must be >= 2"),
            (min(self.batch_size, self.num_examples, self.num_queries, self.num_gpus) >= 1,
             "batch_size, num_examples, num_queries and num_gpus must be >= 1"),
            (self.gpu_memory_gib > 0, f"gpu_memory_gib={self.gpu_memory_gib}: must be > 0"),
            (0 <= self.headroom < 1, f"headroom={self.headroom}: must be in [0, 1)"),
            (self.tp_size is None or self.tp_size >= 1, f"tp_size={self.tp_size}: must be >= 1 or null"),
            (min(self.ref_examples_per_s, self.ref_params, self.ref_tokens_per_example, self.h2d_gb_per_s) > 0,
             "ref_examples_per_s, ref_params, ref_tokens_per_example and h2d_gb_per_s must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


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
        try:
            return AutoConfig.from_pretrained(model.path, local_files_only=True)
        except OSError as e:
            raise ConfigError(f"model.path={model.path}: no local Hugging Face config ({e})") from e
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


def store_columns(specs: list[LayerSpec], kind: str, hidden_size: int) -> dict[str, int]:
    """Store layout {column: values per example}, as ``Featurizer.columns``."""
    if kind == "hidden":
        return {"hidden": hidden_size}
    if kind == "dense":
        return {f"{s.name}.g": s.dim for s in specs}
    return {col: width for s in specs for col, width in ((f"{s.name}.u", s.d1 * s.c), (f"{s.name}.v", s.d2 * s.c))}


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

    @property
    def bytes_per_example(self) -> int:
        return sum(self.columns.values()) * BYTES_PER_VALUE[self.config.dtype]

    @property
    def index_bytes(self) -> int:
        return self.bytes_per_example * self.config.num_examples

    def curvature_bytes(self, spec: LayerSpec) -> int:
        """float32 curvature of one layer: LoRIF V (D×k, k = min(r+p, D)) + k values; LoGRA D×D."""
        method = self.config.method.name
        if method == "lorif":
            k = min(self.config.r + self.config.oversample, spec.dim)
            return 4 * (spec.dim * k + k)
        return 4 * spec.dim**2 if method == "logra" else 0

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
    if kind == "hidden":  # no_grad forward: one block live, all hidden states kept, logits
        activations = tokens * size * (linear_io // num_blocks + (num_blocks + 1) * model.config.hidden_size + vocab)
        return Memory(tp, weights, activations, 0, 0, cfg.batch_size * model.config.hidden_size * 4)
    # Saved for backward in every block, plus one block's gradients in flight; logits in the compute
    # dtype plus their float32 upcast for the loss and its float32 gradient.
    activations = tokens * (linear_io * size * (num_blocks + 1) // num_blocks + vocab * (size + 8))
    projections = 0  # rows of P_in (I×d1) and P_out (O×d2) this rank holds
    for s in specs:
        rows_in, rows_out = rank_dims(s.name, s.in_features, s.out_features, tp)
        projections += rows_in * s.d1 + rows_out * s.d2
    captured = tokens * sum(s.d1 + s.d2 for s in specs)  # A (T×d1), B (T×d2) after the all-reduce: full
    store = cfg.batch_size * sum(store_columns(specs, kind, 0).values())
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
    return Plan(
        config=cfg, model_type=config.model_type, params=params, num_blocks=config.num_hidden_layers, specs=specs,
        columns=store_columns(specs, cfg.method.store_kind, config.hidden_size),
        row_parallel={s.name: is_row_parallel(s.name) for s in specs},
        memory=[rank_memory(cfg, model, specs, tp) for tp in candidates],
        stage1_flops_per_example=stage1_flops(cfg, params, specs),
        score_flops=score_flops(cfg, specs, config.hidden_size),
        curvature_flops=curvature_flops(cfg, specs),
    )


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


SUMMARY_HEADER = ("| model | params | layers | bytes/example | index (N = 10⁶) | curvature (float32) | GPU memory per "
                  "rank, TP = 1 / 2 / 4 / 8 | smallest TP on 80 GiB | stage 1 estimate | one query batch (1,000 × N) |")


def summary_row(plan: Plan, label: str) -> str:
    """One row of the README's condensed table (``SUMMARY_HEADER``), generated from the plan so the two
    cannot drift apart (tests/plan checks the README against it)."""
    cfg = plan.config
    memory = " / ".join(f"{m.total / GIB:.1f}" for m in plan.memory if m.tp in (1, 2, 4, 8)) + " GiB"
    curvature = sum(plan.curvature_bytes(s) for s in plan.specs)
    return (f"| {label} | {plan.params / 1e9:.2f} B | {len(plan.specs)} | {human_bytes(plan.bytes_per_example)} | "
            f"{human_bytes(plan.index_bytes)} | {human_bytes(curvature)} | {memory} | {plan.tp_size or 'none'} | "
            f"{human_seconds(plan.stage1_gpu_seconds / cfg.num_gpus)} on {cfg.num_gpus} GPUs | "
            f"{human_seconds(plan.stage3_read_seconds + plan.stage3_compute_seconds)} on {cfg.num_gpus} GPUs |")


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
        f"| layer | count | I | O | d1 | d2 | c | TP split | values/ex ({per_value}) | curvature (float32) |",
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
    curvature_rule = {"lorif": "per layer V (D×min(r+p, D)) + values, float32 (the rSVD block; stored V_r is D×min(r, D))",
                      "logra": "per layer the D×D inverse, float32"}.get(cfg.method.name, "none for this method")
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
        "captured A/B = B·T·Σ(d1+d2), store = the batch's columns, all float32):",
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
        coordinate_size = BYTES_PER_VALUE[cfg.coordinates_dtype]
        stored = cfg.num_examples * sum(min(cfg.r, s.dim) for s in plan.specs) * coordinate_size
        recompute, query_side, from_stored = (human_seconds(flops / speed) for flops in plan.curvature_flops.values())
        lines.append("- estimate: of which LoRIF's curvature term, by route (the compute above takes the cheaper "
                     f"of the first two): recompute g'_t = V_rᵀ g_t of all N examples {recompute}; query side "
                     f"h_q = V_r(w ⊙ g'_q) {query_side} (cheaper when Nq < r); stored g'_t {from_stored} "
                     f"(query.store_coordinates: N × Σ min(r, D) × {coordinate_size} B in {cfg.coordinates_dtype} = "
                     f"{human_bytes(stored)} more disk)")
    lines += [
        "- not estimated: stage 2 (curvature) time, disk throughput, Ray scheduling overhead",
    ]
    return "\n".join(lines)
