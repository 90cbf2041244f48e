"""Structured configs: one dataclass per part, registered with Hydra so typos fail at start-up.

The keys are the public contract: ``model.path``, ``data.train``, ``data.queries``,
``data.max_length``, ``data.split``, ``data.*_column``, ``method=lorif|logra|graddot|repsim``, ``f``, ``c``,
``r``, ``damping``, ``seed``, ``dtype`` (storage), ``precision.*``, ``query.top_k``, ``query.full_scores``,
``output_dir``. Each field carries its one-line meaning (``setting``), which every job's ``--help`` lists.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from lorif_ray.errors import ConfigError

# method → (what stage 1 stores per example, the curvature of stage 2): the only place a method name means
# anything; stages ask the method for these two parts
METHOD_PARTS = {"lorif": ("factors", "woodbury"), "logra": ("dense", "exact"), "graddot": ("dense", "identity"),
                "repsim": ("hidden", "none")}
METHODS = tuple(METHOD_PARTS)


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None):
    """A dataclass field with its one-line meaning, which every job's ``--help`` lists (``lorif_ray.cli``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def help_of(f) -> str:
    """The one-line meaning of a dataclass field (``setting``'s help), or ""."""
    return f.metadata.get("help", "")


@dataclass
class ModelConfig:
    path: Optional[str] = setting(None, "a local Hugging Face model folder, or a Hub id (org/name) found in the local "
                                        "Hugging Face cache (HF_HUB_CACHE); null = the embedded default")
    layers: Optional[List[str]] = setting(None, "fnmatch patterns on module names of the layers to attribute; "
                                                "null = every linear in the blocks (with an adapter: its LoRA layers)")
    adapter: Optional[str] = setting(None, "a local PEFT LoRA adapter folder: attached to the model, its A/B layers "
                                           "attributed")
    dtype: str = setting("float32", "compute dtype of the model: float32 | bfloat16 | float16 | float64")
    device: str = setting("auto", "auto = cuda if available, else cpu; or cpu, cuda, cuda:1, ...")
    arch: Optional[Dict[str, Any]] = setting(None, "Hugging Face config fields (model_type, hidden_size, ...) of a "
                                                   "model known only by its shape (planner, benchmarks); null = read "
                                                   "model.path")

    @property
    def layer_patterns(self) -> Optional[List[str]]:
        """The layers to attribute: ``layers``, else the adapter's LoRA layers, else None (every block linear)."""
        if self.layers is not None or self.adapter is None:
            return self.layers
        from lorif_ray.model.adapters import LORA_PATTERNS

        return LORA_PATTERNS


@dataclass
class DataConfig:
    train: Optional[str] = setting(None, "training data: .jsonl, .parquet, .arrow or a datasets save_to_disk folder "
                                         "(a DatasetDict with data.split) with text, prompt + response or messages")
    queries: Optional[str] = setting(None, "query data, same formats (DatasetDict: data.query_split); an optional "
                                           "source_id column is checked against the top-k")
    max_length: int = setting(128, "tokens kept per example")
    batch_size: int = setting(8, "examples per forward+backward")
    split: Optional[str] = setting(None, "the split of data.train when it is a DatasetDict save_to_disk folder")
    query_split: Optional[str] = setting(None, "the split of data.queries when it is a DatasetDict save_to_disk "
                                               "folder")
    text_column: str = setting("text", "the column holding an example's text (loss on every token)")
    prompt_column: str = setting("prompt", "the column holding the prompt of prompt + response rows (no loss)")
    response_column: str = setting("response", "the column holding the response of prompt + response rows (the loss)")
    messages_column: str = setting("messages", "the column holding chat turns [{role, content}] (loss on the "
                                               "assistant turns)")
    id_column: str = setting("id", "the column naming each example (optional; default: the row number)")

    @property
    def columns(self):
        """The column names of the data (``lorif_ray.data.Columns``)."""
        from lorif_ray.data.examples import Columns

        return Columns(text=self.text_column, prompt=self.prompt_column, response=self.response_column,
                       messages=self.messages_column, id=self.id_column)


@dataclass
class MethodConfig:
    name: str = setting("lorif", "lorif | logra | graddot | repsim (the group method=... sets it)")

    @property
    def store_kind(self) -> str:
        """What stage 1 stores per example: rank-c factors, dense projected gradients, or hidden states."""
        return METHOD_PARTS[self.name][0]

    @property
    def curvature(self) -> str:
        """The preset's curvature (``Config.curvature_kind`` is the one a run uses): woodbury, exact, identity, or
        none (RepSim)."""
        return METHOD_PARTS[self.name][1]


COORDINATE_DTYPES = ("float32", "float16", "bfloat16")
MATH_DTYPES = ("auto", "float64", "float32")
MATMUL_DTYPES = ("auto", "float64", "float32", "bfloat16", "float16")


@dataclass
class PrecisionConfig:
    """Every dtype that shapes a result (the index's storage dtype is the top-level ``dtype``).

    LoRIF's score is a difference of two terms up to σ₁²/λ times larger than itself, so what feeds the
    subtracted term stays in float32 or wider by default. Recorded in the curvature file and report.json;
    a query whose policy differs from its curvature's is refused (``lorif_ray.precision``).
    """

    # stored g'_t: float32 unless overridden knowingly (bf16 g'_t gave relative score errors of 0.1 at
    # σ₁²/λ ≈ 500)
    coordinates: str = setting("float32", "dtype of the stored g'_t (query.store_coordinates): float32 | float16 | "
                                          "bfloat16")
    # eigensolves and the final k×D step of the randomized SVD always run in float64
    math: str = setting("auto", "curvature fit and scoring arithmetic: auto = float64 on CPU, float32 on "
                                "accelerators; or float64 | float32")
    # bfloat16/float16 trade accuracy for speed on a GPU, products accumulate in the math dtype
    matmul: str = setting("auto", "inputs of the large products (Gram passes, scoring GEMMs): auto = the math dtype; "
                                  "or float64 | float32 | bfloat16 | float16")


@dataclass
class QueryConfig:
    top_k: int = setting(10, "proponents kept per query")
    full_scores: bool = setting(False, "also write scores.npy (float32, queries x train, input order)")
    normalize: bool = setting(False, "cosine-style scores I(t,q) / sqrt(I(t,t) I(q,q)), in [-1, 1]")
    train_batch_rows: int = setting(2048, "training rows scored per step")
    # the same scorer and numbers; Ray query actors always keep their shards resident
    resident: bool = setting(False, "cluster=none: hold the whole index in memory instead of streaming shards")
    # more disk, much less query time; on Ray the query actors then hold no V_r for scoring, only a share of the
    # layers' V_r to project the queries
    store_coordinates: bool = setting(False, "stage 2 also stores g'_t = V_r^T g_t (r numbers per layer per "
                                             "example) so queries skip recomputing them")
    # training examples: always the summed loss. logprob's gradient is minus the loss's and it is scored with that
    # sign flipped, so > 0 still means proponent; "custom:<name>" records a function passed to the Python API
    measurement: str = setting("loss", "what a query's gradient is taken of: loss (summed over target tokens) | "
                                       "logprob | mean_loss")
    # Outputs next to topk.parquet (README "Score convention")
    self_influence: bool = setting(False, "also write self_influence.parquet: I(t, t) of every training example")
    # not with normalize
    per_layer: bool = setting(False, "also write layer_scores.npy: each layer's share of every score (float32, "
                                     "layers x queries x train)")
    # the token scores of a query sum to its score (loss or logprob)
    per_token: bool = setting(False, "also score each target token of a query on its own (topk_per_token.parquet)")


MEASUREMENT_NAMES = ("loss", "logprob", "mean_loss")
BACKENDS = ("ray", "none")


@dataclass
class ClusterConfig:
    backend: str = setting("ray", "ray = stages run on Ray actors; none = all three stages in this process, no Ray")
    address: Optional[str] = setting(None, "null = start a local Ray instance; auto = join the running cluster; or a "
                                           "Ray address")
    num_cpus: Optional[int] = setting(None, "CPUs of a local Ray instance (null = all of this machine)")
    gradient_actors: Optional[int] = setting(None, "stage-1 model replicas (each loads the model once); null = as "
                                                   "many as the cluster places beside the factorization pool")
    tp_size: int = setting(1, "tensor-parallel ranks per replica (DeepSpeed AutoTP); one Ray actor per rank")
    writer_actors: int = setting(1, "factorization pool: actors turning captured gradients into factors and "
                                    "writing shards")
    fused: bool = setting(True, "gradient actors factorize in place; false ships the captured (A, B) to the pool")
    gram_actors: int = setting(2, "stage 2: shard-group actors summing Gram products")
    query_actors: int = setting(2, "stage 3: actors keeping their shards resident")
    cpus_per_actor: float = setting(0.5, "CPUs each actor asks for (small, so several actors and the driver share "
                                         "a laptop)")
    gpus_per_actor: Optional[float] = setting(None, "GPUs each actor asks for; null = 1 when the cluster has GPUs, "
                                                    "else 0")
    inflight_per_actor: int = setting(2, "shards queued per gradient actor (backpressure on the pool)")
    max_restarts: int = setting(2, "Ray restarts of a crashed actor (its in-flight tasks are retried); not for TP "
                                   "ranks")
    # on an autoscaling cluster, at least a node's boot and image pull (a local instance is checked at once instead)
    placement_timeout_s: float = setting(120.0, "seconds to wait for the cluster to place a replica or the pool")


@dataclass
class ServeConfig:
    """``jobs/serve.py``: the HTTP query service (README "Query service")."""

    host: str = setting("127.0.0.1", "address to listen on; loopback = this machine only (0.0.0.0: every interface)")
    port: int = setting(8000, "TCP port of POST /query and GET /health")
    # set it from the environment: serve.token='${oc.env:LORIF_SERVE_TOKEN}', so it is not in the shell history
    # or .hydra/
    token: Optional[str] = setting(None, "if set, POST /query needs the header 'Authorization: Bearer <token>'")
    max_queries: int = setting(64, "queries in one request; more is refused (413)")
    max_body_bytes: int = setting(1048576, "bytes of one request body; more is refused (413)")
    max_top_k: int = setting(100, "largest top_k a request may ask (the default is query.top_k)")
    max_batch_size: int = setting(16, "concurrent requests answered together in one pass over the training rows")
    batch_wait_s: float = setting(0.01, "seconds a request waits for others to join its pass")


@dataclass
class Config:
    model: ModelConfig = setting(factory=ModelConfig, help="the model (model=<preset> picks a conf/model/ file)")
    data: DataConfig = setting(factory=DataConfig, help="the training and query data")
    method: MethodConfig = setting(factory=MethodConfig, help="the attribution method (method=lorif|logra|graddot|"
                                                              "repsim)")
    query: QueryConfig = setting(factory=QueryConfig, help="stage 3: scoring the queries")
    cluster: ClusterConfig = setting(factory=ClusterConfig, help="where the stages run (cluster=local|none|gpu_nodes)")
    precision: PrecisionConfig = setting(factory=PrecisionConfig, help="every dtype that shapes a result")
    serve: ServeConfig = setting(factory=ServeConfig, help="jobs/serve.py: the HTTP query service")
    f: int = setting(4, "projection factor: d1 = I/f, d2 = O/f")
    c: int = setting(1, "factor rank (LoRIF); capped at min(d1, d2), where factors are exact")
    r: int = setting(64, "truncation rank of the curvature (LoRIF); capped at D = d1·d2")
    # independent of what stage 1 stores, e.g. method=lorif curvature=ekfac
    curvature: Optional[str] = setting(None, "stage 2's curvature: woodbury | exact | identity | kfac | ekfac; null = "
                                             "the method's (lorif: woodbury, logra: exact, graddot: identity)")
    damping: Optional[float] = setting(None, "λ; null = damping_scale x a mean eigenvalue (per curvature, README)")
    damping_scale: Optional[float] = setting(None, "the default λ's scale (λ = scale x a mean eigenvalue); null = "
                                                   "the curvature's default (0.1 for woodbury and exact)")
    seed: int = setting(0, "seed of the projections, factor start blocks and rSVD start")
    # (Ã, S̃; curvature=kfac|ekfac). "sampled" is how Kronfluence fits its factors (one more forward+backward per
    # batch); the stored rows are the same.
    kfac_labels: str = setting("training", "labels of stage 1's K-FAC statistics: training (empirical Fisher) | "
                                           "sampled (y ~ softmax(logits): true Fisher)")
    dtype: str = setting("float32", "storage dtype of the index: float32 | float16 | bfloat16")
    factor_iters: Optional[int] = setting(None, "factorization iterations; null = 8 for c = 1, 16 for c > 1")
    svd_power_iters: int = setting(3, "power iterations of the randomized SVD")
    oversample: int = setting(10, "oversampling p of the randomized SVD (k = r + p columns)")
    shard_size: int = setting(1024, "examples per Parquet shard (the unit of resumption)")
    output_dir: str = setting("outputs/run", "where everything goes (a folder this tool made, or a new or empty one)")
    index_dir: Optional[str] = setting(None, "null = <output_dir>/index; share one across runs that differ in r")
    curvature_from: Optional[str] = setting(None, "jobs/score.py: the output_dir of an earlier run whose curvature "
                                                  "(<dir>/curvature) scores the live rows; null = fit none")
    embedded_cache: Optional[str] = setting(None, "where the embedded default model and corpus are trained once and "
                                                  "kept; null = <user cache>/embedded (~/.cache/lorif-ray, or "
                                                  "$LORIF_RAY_CACHE_DIR)")
    progress: bool = setting(True, "a bar (count, rate, ETA) for every long step; false = none (and no Ray actor "
                                   "for them; logs stay)")
    overwrite: bool = setting(False, "write into a non-empty output_dir that this tool did not create")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def embedded_cache_path(self) -> Path:
        """The folder of the embedded model's cache entries: ``embedded_cache``, else ``<user cache>/embedded``."""
        return Path(self.embedded_cache).expanduser() if self.embedded_cache else user_cache_dir() / "embedded"

    @property
    def curvature_kind(self) -> str:
        """The curvature stage 2 fits and stage 3 scores with: ``curvature``, else the method's."""
        return self.curvature or self.method.curvature

    @property
    def index_path(self) -> Path:
        return Path(self.index_dir) if self.index_dir else Path(self.output_dir) / "index"

    @property
    def curvature_path(self) -> Path:
        return Path(self.output_dir) / "curvature"  # one file per layer + _curvature.json

    def to_dict(self) -> dict:
        """The config as plain data (recorded in artifacts), ``serve.token`` redacted."""
        values = asdict(self)
        values["serve"]["token"] = "<redacted>" if self.serve.token else None
        return values


def user_cache_dir() -> Path:
    """This user's cache folder of the tool (whatever is recomputed when lost): ``$LORIF_RAY_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/lorif-ray``, else ``~/.cache/lorif-ray``; the same from any current folder."""
    root = os.environ.get("LORIF_RAY_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "lorif-ray"


def validate(cfg: Config) -> None:
    """Raise ConfigError naming the first invalid value."""
    # here: importing the store and the curvatures loads torch (a key check does not)
    from lorif_ray.math.curvature import Curvature
    from lorif_ray.store.schema import STORAGE_DTYPES

    kinds = Curvature.registered()  # what ``curvature=`` may name

    checks = [
        (cfg.method.name in METHODS, f"method={cfg.method.name!r}: choose one of {METHODS}"),
        (cfg.f >= 1, f"f={cfg.f}: the projection factor must be >= 1"),
        (cfg.c >= 1, f"c={cfg.c}: the factor rank must be >= 1"),
        (cfg.r >= 1, f"r={cfg.r}: the truncation rank must be >= 1"),
        (cfg.damping is None or cfg.damping > 0, f"damping={cfg.damping}: must be > 0 or null"),
        (cfg.damping_scale is None or cfg.damping_scale > 0, f"damping_scale={cfg.damping_scale}: must be > 0 or null"),
        (cfg.curvature is None or cfg.curvature in kinds, f"curvature={cfg.curvature!r}: choose one of {tuple(kinds)}"),
        (cfg.method.name not in METHODS or cfg.curvature_kind not in kinds
         or kinds[cfg.curvature_kind].scores_gradients != (cfg.method.store_kind == "hidden"),
         f"curvature={cfg.curvature}: method={cfg.method.name} stores "
         f"{METHOD_PARTS.get(cfg.method.name, ('?',))[0]} rows; hidden states (RepSim) take no curvature and "
         "gradients need one"),
        (cfg.kfac_labels in ("training", "sampled"), f"kfac_labels={cfg.kfac_labels!r}: choose training or sampled"),
        (cfg.dtype in STORAGE_DTYPES, f"dtype={cfg.dtype!r}: choose one of {STORAGE_DTYPES}"),
        (cfg.factor_iters is None or cfg.factor_iters >= 1, f"factor_iters={cfg.factor_iters}: must be >= 1"),
        (cfg.svd_power_iters >= 0, f"svd_power_iters={cfg.svd_power_iters}: must be >= 0"),
        (cfg.oversample >= 0, f"oversample={cfg.oversample}: must be >= 0"),
        (cfg.shard_size >= 1, f"shard_size={cfg.shard_size}: must be >= 1"),
        (cfg.data.max_length >= 2, f"data.max_length={cfg.data.max_length}: must be >= 2"),
        (cfg.data.batch_size >= 1, f"data.batch_size={cfg.data.batch_size}: must be >= 1"),
        *((bool(getattr(cfg.data, f"{role}_column")), f"data.{role}_column: must name a column")
          for role in ("text", "prompt", "response", "messages", "id")),
        (cfg.query.top_k >= 1, f"query.top_k={cfg.query.top_k}: must be >= 1"),
        (cfg.cluster.backend in BACKENDS, f"cluster.backend={cfg.cluster.backend!r}: choose one of {BACKENDS}"),
        (min(cfg.cluster.gradient_actors or 1, cfg.cluster.writer_actors, cfg.cluster.gram_actors,
             cfg.cluster.query_actors, cfg.cluster.tp_size, cfg.cluster.inflight_per_actor) >= 1,
         "cluster.*_actors, cluster.tp_size and cluster.inflight_per_actor must be >= 1 (gradient_actors: or null)"),
        (cfg.cluster.placement_timeout_s > 0, f"cluster.placement_timeout_s={cfg.cluster.placement_timeout_s}: must be > 0"),
        (cfg.model.adapter is None or cfg.cluster.tp_size == 1,
         "model.adapter: LoRA adapters run with cluster.tp_size=1 (tensor-parallel ranks load plain checkpoints)"),
        (cfg.cluster.cpus_per_actor >= 0, f"cluster.cpus_per_actor={cfg.cluster.cpus_per_actor}: must be >= 0"),
        (cfg.precision.coordinates in COORDINATE_DTYPES,
         f"precision.coordinates={cfg.precision.coordinates!r}: choose one of {COORDINATE_DTYPES}"),
        (cfg.precision.math in MATH_DTYPES, f"precision.math={cfg.precision.math!r}: choose one of {MATH_DTYPES}"),
        (cfg.precision.matmul in MATMUL_DTYPES,
         f"precision.matmul={cfg.precision.matmul!r}: choose one of {MATMUL_DTYPES}"),
        (cfg.query.measurement in MEASUREMENT_NAMES or cfg.query.measurement.startswith("custom:"),
         f"query.measurement={cfg.query.measurement!r}: choose one of {MEASUREMENT_NAMES}"),
        (cfg.query.train_batch_rows >= 1, f"query.train_batch_rows={cfg.query.train_batch_rows}: must be >= 1"),
        (not (cfg.query.per_layer and cfg.query.normalize),
         "query.per_layer: layer scores are not normalized (I(t,t) and I(q,q) are sums over layers); "
         "drop query.normalize"),
        (not cfg.query.per_token or cfg.query.measurement in ("loss", "logprob"),
         f"query.per_token: the token scores of a query sum to its score for a sum over tokens (loss, logprob), "
         f"not for query.measurement={cfg.query.measurement!r}"),
        (1 <= cfg.serve.port <= 65535, f"serve.port={cfg.serve.port}: choose a TCP port in 1..65535"),
        (min(cfg.serve.max_queries, cfg.serve.max_body_bytes, cfg.serve.max_top_k, cfg.serve.max_batch_size) >= 1,
         "serve.max_queries, serve.max_body_bytes, serve.max_top_k and serve.max_batch_size must be >= 1"),
        (cfg.serve.batch_wait_s >= 0, f"serve.batch_wait_s={cfg.serve.batch_wait_s}: must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (called by the jobs)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="lorif_schema", node=Config)


def from_hydra(cfg) -> Config:
    """A validated Config from Hydra's DictConfig."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg)
