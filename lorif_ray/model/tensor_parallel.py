"""Tensor-parallel gradient capture: DeepSpeed AutoTP shards the linears, the ranks share projections.

This is the only module that imports deepspeed, and only inside functions, so the rest of the
package works where deepspeed is absent.

What AutoTP (training mode, ``deepspeed.initialize`` with ``tensor_parallel.autotp_size``) does:

- Llama-style models (HF ``base_model_tp_plan``): q/k/v/gate/up_proj → ``LinearLayer``
  (column-parallel: the weight's output dim O is split, the output stays sharded, the backward
  all-reduces the input gradient); o_proj/down_proj → ``LinearAllreduce`` (row-parallel: the input
  dim I is split and the forward all-reduces the output, so every rank sees the full Y and δY);
  lm_head → ``LinearLayer`` with ``gather_output=True`` (its output is gathered: full logits).
- GPT-2: AutoTP refuses GPT-2 (its Conv1D has a kernel-injection policy, which is inference only),
  so ``init_tensor_parallel`` first turns every ``Conv1D`` into an exactly equivalent ``nn.Linear``
  (weight transposed) and passes an explicit partition config: c_attn → ``SubParamLinearLayer``
  (column-parallel, q, k and v each split by heads), c_fc → ``LinearLayer``, attn.c_proj and
  mlp.c_proj → ``LinearAllreduce``. Attention's ``split_size`` is set to the local width.

Under tensor parallelism a column-parallel layer holds rows ``S`` of O: its rank computes
``δY_S P_out[S]`` and the ranks sum (all-reduce) the small (B, T, d2) blocks; a row-parallel layer
holds rows ``S`` of I: the ranks sum ``X_S P_in[S]``. Projections are regenerated in full from
``(seed, layer name)`` and each rank takes its rows, so TP=k gives the same A, B (hence G̃ = AᵀB,
factors and scores) as TP=1, up to float rounding. See ``TensorParallelCapture``.

How a Ray gradient actor uses this (one actor per rank; the actors of a replica in one placement
group, every actor of the replica receiving the same batches):

1. Before anything imports deepspeed, set in the actor process (``rank_environment`` builds it)::

       RANK, WORLD_SIZE       rank in / size of the replica's group (WORLD_SIZE = tp_size)
       LOCAL_RANK             rank on the node (selects the GPU; 0..gpus-1)
       MASTER_ADDR, MASTER_PORT   rank 0's address and a free port, the same for all ranks
       DS_ACCELERATOR         "cpu" (gloo) or "cuda" (nccl)
       GLOO_SOCKET_IFNAME     "lo" when all ranks are on one host and run on CPU

2. ``tp = setup_rank(model_path, tp_size, dtype=..., patterns=...)``: initializes the process
   group (deepspeed's shared-memory comm op disabled), loads the model, records each selected
   layer's full (I, O), shards with AutoTP and returns a ``TensorParallelModel``.
3. ``projections = tp.projections(seed, f, dtype)`` (full, seed-regenerated, on the model device).
4. Per batch, on every rank: ``blocks = tp.capture(ids, batch, projections)`` → every rank holds
   the same ``{layer: (A, B)}`` that TP=1 would give.
5. Factorize without doing work twice: ``mine = layers_of_rank(costs, tp.rank, tp.world_size)``,
   run the column maker on ``{n: blocks[n] for n in mine}``, then
   ``gather_columns(columns, tp.group)`` → the merged columns on rank 0, ``None`` elsewhere.
   Rank 0's actor returns (or writes) them; the other actors return None.

Memory: ``load_model_for_sharding`` (``lorif_ray.model.loading``) loads the checkpoint in the
target dtype with transformers' low-memory loader, so each rank holds one full copy of the weights
in host memory until AutoTP slices them (DeepSpeed's ``move`` copies the slice to the device and
frees the full tensor); after sharding a rank holds 1/tp of every sharded linear plus the
replicated embeddings, norms and lm_head. See ``load_model_for_sharding`` for the peak.
``load_sharded`` (``setup_rank(..., slice_loading=True)``; what ``GradientWorker.setup`` uses) avoids
the full copy: the model is built with meta parameters, AutoTP shards it as metadata, and each rank
reads only its slices from the safetensors files, so its peak is its share plus one tensor in transit.

Example (two processes on CPU)::

    os.environ.update(rank_environment(rank, 2, "127.0.0.1", port))
    tp = setup_rank("/models/llama", 2, dtype="float32")
    projections = tp.projections(seed=0, f=4)
    blocks = tp.capture(ids, batch, projections)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
import torch.distributed as torch_dist
from torch import nn

from lorif_ray.math.capture import ProjectedGradientCapture, linear_dims, per_example_token_loss
from lorif_ray.model.layers import conv1d_to_linear
from lorif_ray.math.projection import LayerProjection, layer_projection

# Partition config for GPT-2 after ``conv1d_to_linear`` (AutoTP has no GPT-2 training policy).
GPT2_PARTITION_CONFIG = {
    "use_default_specs": False,
    "layer_specs": [
        {"patterns": [r".*\.attn\.c_attn\.weight$"], "partition_type": "column", "shape": [3, -1], "partition_dim": 0},
        {"patterns": [r".*\.attn\.c_proj\.weight$"], "partition_type": "row"},
        {"patterns": [r".*\.mlp\.c_fc\.weight$"], "partition_type": "column"},
        {"patterns": [r".*\.mlp\.c_proj\.weight$"], "partition_type": "row"},
    ],
}


def rank_environment(rank: int, world_size: int, master_addr: str, master_port: int, *,
                     local_rank: int | None = None, accelerator: str = "cpu") -> dict[str, str]:
    """The environment variables one rank needs before deepspeed is imported."""
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank if local_rank is None else local_rank),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "DS_ACCELERATOR": accelerator,
    }
    if accelerator == "cpu" and master_addr in ("127.0.0.1", "localhost"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    return env


def init_distributed(backend: str | None = None) -> None:
    """Initialize torch.distributed through deepspeed (env:// rendezvous from the rank variables).

    On CPU deepspeed would build and use a shared-memory all-reduce op (a C++ extension); it is
    disabled so that gloo does every collective and nothing is compiled.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed
    import deepspeed.ops

    cpu = os.environ["DS_ACCELERATOR"] == "cpu"
    if cpu:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # comm/torch.py: build_shm_op → None
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend or ("gloo" if cpu else "nccl"), verbose=False)


def _is_gpt2(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "gpt2"


def init_tensor_parallel(model: nn.Module, tp_size: int, *, partition_config: dict | None = None,
                         extra_config: dict | None = None):
    """Shard ``model`` in place with DeepSpeed AutoTP (training mode, ZeRO stage 0); returns the engine.

    ``init_distributed`` must have run. The optimizer is a plain ``torch.optim.SGD(lr=0)`` so
    deepspeed compiles no op; it is never stepped. GPT-2 models get ``conv1d_to_linear`` and
    ``GPT2_PARTITION_CONFIG`` unless a ``partition_config`` is given; other models follow their
    Hugging Face tensor-parallel plan (or AutoTP's heuristics). The model is left in eval mode.

    Args:
        model: an unsharded Hugging Face causal LM with its weights on the CPU, or with its parameters on
            the meta device (``load_sharded``: the engine then leaves the device alone and the caller
            must fill every parameter and move the model).
        tp_size: ranks in the tensor-parallel group (= WORLD_SIZE with one replica per group).
        partition_config: DeepSpeed ``tensor_parallel.partition_config`` (layer specs).
        extra_config: merged into the deepspeed config (e.g. {"bf16": {"enabled": True}}).
    """
    import deepspeed

    if _is_gpt2(model):
        conv1d_to_linear(model)
        partition_config = partition_config or GPT2_PARTITION_CONFIG
    tensor_parallel = {"autotp_size": tp_size}
    if partition_config is not None:
        tensor_parallel["partition_config"] = partition_config
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 0},
        "tensor_parallel": tensor_parallel,
        **(extra_config or {}),
    }
    optimizer = torch.optim.SGD([p for p in model.parameters()], lr=0.0)
    on_meta = any(p.is_meta for p in model.parameters())
    if on_meta:
        # AutoTP shards meta weights as metadata only (TensorParallel_Layer.move keeps meta tensors),
        # but the engine then calls module.to(device), which cannot copy meta tensors: skip it here,
        # load_sharded fills the parameters and moves the model itself.
        model.to = lambda *args, **kwargs: model
    try:
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    finally:
        if on_meta:
            del model.to
    module = engine.module
    if _is_gpt2(module):
        # update_mp_params shards embed_dim/num_heads but not split_size, which splits q|k|v.
        for sub in module.modules():
            if hasattr(sub, "split_size") and hasattr(sub, "c_attn"):
                sub.split_size = sub.c_attn.weight.shape[0] // 3
    module.eval()
    return engine


def tensor_parallel_group():
    """The tensor-parallel process group deepspeed made (None before ``init_tensor_parallel``)."""
    from deepspeed.utils import groups

    return groups.get_tensor_model_parallel_group()


def full_layer_dims(name: str, module: nn.Module) -> tuple[int, int]:
    """(I, O) of the *unsharded* layer: from DeepSpeed's recorded original shape, or the module itself."""
    shape = getattr(module, "_orig_weight_shape", None)
    if shape is not None:
        out_features, in_features = shape
        return int(in_features), int(out_features)
    try:
        return linear_dims(module)
    except TypeError as exc:
        raise TypeError(f"layer {name}: {exc}") from exc


@dataclass(frozen=True)
class ShardLayout:
    """Which slice of a layer's full dims this rank sees.

    Attributes:
        side: "output" (column-parallel, output not gathered: δY is a slice of O),
            "input" (row-parallel: X is a slice of I) or None (this rank sees full X and δY).
        index: the global indices of the slice (LongTensor), None when side is None.
    """

    side: str | None
    index: torch.Tensor | None = None


def _contiguous_index(sizes, tp_index: int) -> torch.Tensor:
    start = sum(sizes[:tp_index])
    return torch.arange(start, start + sizes[tp_index])


def _subparam_index(module: nn.Module, total: int) -> torch.Tensor:
    """Indices a ``SubParam*`` layer keeps: each sub-parameter (e.g. q, k, v) split by its own widths."""
    sizes = module._subparam_sizes or (total,)
    widths = module._subparam_shard_widths
    offset, parts = 0, []
    for size, per_rank in zip(sizes, widths):
        start = offset + sum(per_rank[:module.tp_index])
        parts.append(torch.arange(start, start + per_rank[module.tp_index]))
        offset += size
    return torch.cat(parts)


def shard_layout(module: nn.Module) -> ShardLayout:
    """The ``ShardLayout`` of a (possibly) DeepSpeed-sharded linear layer."""
    from deepspeed.module_inject import layers as ds_layers

    if not isinstance(module, ds_layers.TensorParallel_Layer) or getattr(module, "tp_world_size", 1) == 1:
        return ShardLayout(None)
    out_features, in_features = module._orig_weight_shape
    if isinstance(module, (ds_layers.LinearAllreduce, ds_layers.SubParamLinearAllreduce)):
        if isinstance(module, ds_layers.LinearAllreduceWithReplicatedInput):
            return ShardLayout(None)  # scatters a full input itself: X and δY are full
        if isinstance(module, ds_layers.SubParamLinearAllreduce):
            if module.partition_dim != len(module._logical_shape) - 1:
                raise NotImplementedError(f"{module.name}: row-parallel split on dim {module.partition_dim}")
            index = _subparam_index(module, in_features)
        else:
            index = _contiguous_index(module._partition_sizes, module.tp_index)
        side, expected = "input", module.weight.shape[1]
    elif isinstance(module, ds_layers.SubParamLinearLayer):
        if module.partition_dim != 0:
            raise NotImplementedError(f"{module.name}: column-parallel split on dim {module.partition_dim}")
        index, side, expected = _subparam_index(module, out_features), "output", module.weight.shape[0]
    elif type(module) is ds_layers.LinearLayer:
        if module.gather_output:
            return ShardLayout(None)  # the output is gathered: X and δY are full
        index = _contiguous_index(module._partition_sizes, module.tp_index)
        side, expected = "output", module.weight.shape[0]
    else:
        raise NotImplementedError(f"no capture rule for DeepSpeed layer {type(module).__name__}")
    if index.numel() != expected:
        raise RuntimeError(f"{type(module).__name__}: {index.numel()} indices for a local dim of {expected}")
    return ShardLayout(side, index)


class TensorParallelCapture(ProjectedGradientCapture):
    """``ProjectedGradientCapture`` for AutoTP-sharded layers: every rank gets the TP=1 (A, B).

    A column-parallel layer (output not gathered) projects its δY slice with the matching rows of
    P_out; a row-parallel layer projects its X slice with the matching rows of P_in; ``pop`` sums
    these partial (B, T, d) blocks over the group in one all-reduce. Unsharded layers (and gathered
    outputs) are projected as usual. All ranks must run the same batch (as AutoTP requires anyway).

    Args:
        model, layers: the sharded model and {name: module} of the layers to capture.
        projections: the full projections {name: LayerProjection}, P_in (I, d1), P_out (O, d2).
        group: the tensor-parallel process group (None = the default group).
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], projections: dict[str, LayerProjection],
                 group=None):
        super().__init__(model, layers, projections)
        self.group = group
        self.layouts = {name: shard_layout(module) for name, module in layers.items()}
        self._p_in, self._p_out = {}, {}
        for name, module in layers.items():
            p, layout = projections[name], self.layouts[name]
            in_features, out_features = full_layer_dims(name, module)
            if p.p_in.shape[0] != in_features or p.p_out.shape[0] != out_features:
                raise ValueError(f"projection of {name} is for {tuple(p.p_in.shape[:1] + p.p_out.shape[:1])}, "
                                 f"the full layer is (I, O) = {(in_features, out_features)}")
            index = None if layout.index is None else layout.index.to(p.p_in.device)
            self._p_in[name] = p.p_in[index] if layout.side == "input" else p.p_in  # (I_k, d1)
            self._p_out[name] = p.p_out[index] if layout.side == "output" else p.p_out  # (O_k, d2)

    def project_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        p_in = self._p_in[name]
        return x.to(p_in.dtype) @ p_in  # (B, T, d1), partial if row-parallel

    def project_output(self, name: str, grad_output: torch.Tensor) -> torch.Tensor:
        p_out = self._p_out[name]
        return grad_output.to(p_out.dtype) @ p_out  # (B, T, d2), partial if column-parallel

    def finalize(self, blocks):
        partial = [blocks[n][0] if self.layouts[n].side == "input" else blocks[n][1]
                   for n in self.modules if self.layouts[n].side is not None]
        if not partial:
            return blocks
        flat = torch.cat([t.reshape(-1) for t in partial])
        torch_dist.all_reduce(flat, group=self.group)  # one collective per batch, fixed layer order
        out, offset = {}, 0
        for name in self.modules:
            a, b = blocks[name]
            side = self.layouts[name].side
            if side is not None:
                t = a if side == "input" else b
                summed = flat[offset:offset + t.numel()].view_as(t)
                offset += t.numel()
                a, b = (summed, b) if side == "input" else (a, summed)
            out[name] = (a, b)
        return out


# Linears that DeepSpeed AutoTP makes row-parallel (input dim sharded, output all-reduced): its all-reduce names
# in deepspeed/module_inject/auto_tp.py. Every other linear in the blocks is column-parallel; embeddings, norms and
# the LM head count as replicated. What a rank holds of a layer (``rank_dims``) follows from it.
ROW_PARALLEL_NAMES = ("o_proj", "down_proj", "out_proj", "c_proj", "dense_4h_to_h", "fc2")


def is_row_parallel(name: str) -> bool:
    """Whether AutoTP shards this linear's input (row-parallel) rather than its output (column-parallel)."""
    return name.rsplit(".", 1)[-1] in ROW_PARALLEL_NAMES


def rank_dims(name: str, in_features: int, out_features: int, tp: int) -> tuple[int, int]:
    """(I, O) of the slice of a linear held by one of ``tp`` ranks."""
    return (in_features // tp, out_features) if is_row_parallel(name) else (in_features, out_features // tp)


def divide_layers(costs: Mapping[str, float], world_size: int) -> list[list[str]]:
    """Split layers among ranks, largest cost first to the least-loaded rank (deterministic).

    Returns one list per rank, each in the order of ``costs``; every layer is in exactly one list.
    """
    loads = [0.0] * world_size
    owner = {}
    for name in sorted(costs, key=lambda n: (-costs[n], list(costs).index(n))):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[name] = rank
        loads[rank] += costs[name]
    return [[n for n in costs if owner[n] == r] for r in range(world_size)]


def layers_of_rank(costs: Mapping[str, float], rank: int, world_size: int) -> list[str]:
    """The layers ``rank`` factorizes (see ``divide_layers``); e.g. costs = {name: d1 * d2}."""
    return divide_layers(costs, world_size)[rank]


def gather_columns(columns: dict[str, torch.Tensor], group=None, dst: int = 0, all_ranks: bool = False):
    """Merge each rank's store columns {column: (n, width)}: on rank ``dst`` (else None), or on all ranks.

    Tensors travel through the CPU (pickled objects), so this works for gloo and nccl alike.
    """
    local = {k: v.detach().cpu() for k, v in columns.items()}
    world = torch_dist.get_world_size(group)
    gathered = [None] * world
    if all_ranks:
        torch_dist.all_gather_object(gathered, local, group=group)
    else:
        me = torch_dist.get_rank(group)
        torch_dist.gather_object(local, gathered if me == dst else None,
                                 dst=torch_dist.get_global_rank(group, dst) if group is not None else dst,
                                 group=group)
        if me != dst:
            return None
    merged = {}
    for part in gathered:
        overlap = merged.keys() & part.keys()
        if overlap:
            raise RuntimeError(f"columns computed by two ranks: {sorted(overlap)[:5]}")
        merged.update(part)
    return merged


@dataclass
class TensorParallelModel:
    """One rank's view of a sharded model and its attributed layers.

    Attributes:
        engine: the deepspeed engine (kept alive; never stepped).
        model: the sharded causal LM (eval mode).
        layers: {name: sharded module} of the attributed layers, in model order.
        dims: {name: (I, O)} of the *unsharded* layers (what projections and manifests use).
        group: the tensor-parallel process group.
        identity: ``model_identity`` of the unsharded checkpoint, when ``load_sharded`` computed it.
    """

    engine: object
    model: nn.Module
    layers: dict[str, nn.Module]
    dims: dict[str, tuple[int, int]]
    group: object = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    identity: dict | None = None  # model_identity of the unsharded model (load_sharded(..., identity=True))

    @property
    def rank(self) -> int:
        return torch_dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return torch_dist.get_world_size(self.group)

    def projections(self, seed: int, f: int, dtype: torch.dtype = torch.float32) -> dict[str, LayerProjection]:
        """Full, seed-regenerated projections of every layer, on the model's device."""
        return {n: layer_projection(seed, n, *self.dims[n], f, dtype=dtype, device=self.device) for n in self.layers}

    def capturer(self, projections: dict[str, LayerProjection]) -> TensorParallelCapture:
        return TensorParallelCapture(self.model, self.layers, projections, group=self.group)

    def capture(self, ids: list[str], batch: dict[str, torch.Tensor], projections: dict[str, LayerProjection]):
        """One forward+backward on this rank's shard: {layer: (A, B)}, identical on every rank."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.capturer(projections) as capture:
            per_example_token_loss(self.model, batch, ids).sum().backward()
            return capture.pop()


def shard_model(model: nn.Module, tp_size: int, *, patterns: list[str] | None = None,
                partition_config: dict | None = None, extra_config: dict | None = None) -> TensorParallelModel:
    """Select layers on the unsharded model, record their full dims, shard, and re-resolve the modules."""
    from lorif_ray.model.layers import select_layers

    names = list(select_layers(model, patterns))
    dims = {n: linear_dims(model.get_submodule(n)) for n in names}
    engine = init_tensor_parallel(model, tp_size, partition_config=partition_config, extra_config=extra_config)
    sharded = engine.module
    layers = {n: sharded.get_submodule(n) for n in names}
    device = next(sharded.parameters()).device
    return TensorParallelModel(engine, sharded, layers, dims, tensor_parallel_group(), device)


def setup_rank(model_path: str | Path, tp_size: int, *, dtype: str = "bfloat16", patterns: list[str] | None = None,
               partition_config: dict | None = None, slice_loading: bool = False) -> TensorParallelModel:
    """Everything a rank process does before its first batch (the rank variables must be set).

    Initializes the process group, loads the local checkpoint (low-memory, in ``dtype``), selects
    the layers (``patterns`` as in ``select_layers``), records their full (I, O) and shards the model.
    With ``slice_loading`` the rank reads only its slices of the checkpoint (``load_sharded``).
    """
    from lorif_ray.model.loading import load_model_for_sharding

    init_distributed()
    if slice_loading:
        return load_sharded(model_path, tp_size, dtype=dtype, patterns=patterns, partition_config=partition_config)
    model = load_model_for_sharding(model_path, dtype=dtype)
    return shard_model(model, tp_size, patterns=patterns, partition_config=partition_config)


class _ParametersOnMeta:
    """While active, every registered parameter is moved to the meta device; buffers stay real.

    So a model built inside gets its buffers (rotary ``inv_freq``, masks) computed on the CPU exactly
    as transformers computes them, and no parameter memory. A parameter's constructor may allocate
    it (uninitialized, so not resident) just before it is moved; it is freed at once.
    """

    def __enter__(self):
        self._original = original = nn.Module.register_parameter

        def register_parameter(module, name, param):
            original(module, name, param)
            if param is not None and not param.is_meta:
                kwargs = dict(param.__dict__)
                module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)
                module._parameters[name].__dict__.update(kwargs)

        nn.Module.register_parameter = register_parameter
        return self

    def __exit__(self, *exc):
        nn.Module.register_parameter = self._original


def meta_model(model: str | Path | object, dtype: str = "bfloat16") -> nn.Module:
    """The causal LM of a local checkpoint (or of a Hugging Face config object, ``lorif_ray.model.shapes``) with
    its parameters on the meta device and real buffers (eval mode): shapes and dtypes, no weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorif_ray.errors import ConfigError
    from lorif_ray.model.loading import DTYPES, check_model_folder

    if isinstance(model, (str, Path)):
        check_model_folder(Path(model), tokenizer=False)  # the weights only
    if dtype not in DTYPES:
        raise ConfigError(f"model dtype {dtype!r} not in {sorted(DTYPES)}")
    config = AutoConfig.from_pretrained(Path(model), local_files_only=True) if isinstance(model, (str, Path)) \
        else model
    with _ParametersOnMeta():
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    return model.eval()


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Sorted-contiguous runs [(start, stop)] of an index (AutoTP slices are unions of a few ranges)."""
    values = index.tolist()
    runs, start = [], values[0]
    for prev, cur in zip(values, values[1:]):
        if cur != prev + 1:
            runs.append((start, prev + 1))
            start = cur
    runs.append((start, values[-1] + 1))
    return runs


def weight_slice(module: nn.Module, param_name: str) -> tuple[int, torch.Tensor] | None:
    """(dim, global indices) of the slice of ``module.<param_name>`` that this rank holds, None if replicated.

    Unlike ``shard_layout`` (what the capture sees), this is about the stored weight: a gathered
    column-parallel head still holds a row slice of its weight.
    """
    from deepspeed.module_inject import layers as ds_layers

    if not isinstance(module, ds_layers.TensorParallel_Layer) or getattr(module, "tp_world_size", 1) == 1:
        return None
    out_features, in_features = module._orig_weight_shape
    if isinstance(module, (ds_layers.LinearAllreduce, ds_layers.SubParamLinearAllreduce)):
        if param_name != "weight":
            return None  # row-parallel bias is replicated
        if isinstance(module, ds_layers.SubParamLinearAllreduce):
            if module.partition_dim != len(module._logical_shape) - 1:
                raise NotImplementedError(f"{module.name}: row-parallel split on dim {module.partition_dim}")
            return 1, _subparam_index(module, in_features)
        return 1, _contiguous_index(module._partition_sizes, module.tp_index)
    if isinstance(module, ds_layers.SubParamLinearLayer):
        if module.partition_dim != 0:
            raise NotImplementedError(f"{module.name}: column-parallel split on dim {module.partition_dim}")
        return 0, _subparam_index(module, out_features)
    if type(module) is ds_layers.LinearLayer:
        return 0, _contiguous_index(module._partition_sizes, module.tp_index)
    raise NotImplementedError(f"slice loading has no rule for DeepSpeed layer {type(module).__name__}")


def _read_slice(handle, key: str, spec, transposed: bool) -> torch.Tensor:
    """Read a checkpoint tensor, or only the rows/columns of ``spec`` = (dim in the model's layout, index)."""
    view = handle.get_slice(key)
    if spec is None:
        tensor = view[:]
    else:
        dim, index = spec
        dim = 1 - dim if transposed else dim
        parts = [view[a:b] if dim == 0 else view[:, a:b] for a, b in _runs(index)]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
    return tensor.t() if transposed else tensor


def _materialize(param: nn.Parameter, value: torch.Tensor, owners, replaced: dict) -> None:
    """Put ``value`` in place of a meta parameter: a new Parameter (with the old one's attributes, e.g.
    DeepSpeed's TP flags) set on every module that holds it, so tied parameters stay one object."""
    if not param.is_meta:
        param.data = value
        return
    new = nn.Parameter(value, requires_grad=param.requires_grad)
    new.__dict__.update(param.__dict__)
    for _, module, param_name in owners:
        module._parameters[param_name] = new
    replaced[id(param)] = new


def _repoint_engine(engine, replaced: dict) -> None:
    """Point the engine's optimizer and name map at the materialized parameters (never stepped, but kept true)."""
    optimizers = {id(o): o for o in (getattr(engine, "optimizer", None), getattr(engine, "basic_optimizer", None),
                                     getattr(engine, "client_optimizer", None)) if o is not None}
    for optimizer in optimizers.values():
        for group in getattr(optimizer, "param_groups", []):
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]
    engine.param_names = {param: name for name, param in engine.module.named_parameters()}


def load_sharded(model_path: str | Path, tp_size: int, *, dtype: str = "bfloat16", patterns: list[str] | None = None,
                 partition_config: dict | None = None, extra_config: dict | None = None,
                 identity: bool = False) -> TensorParallelModel:
    """Shard a checkpoint with AutoTP while reading only this rank's slices (``init_distributed`` must have run).

    1. The model is built from its config with every parameter on the meta device (buffers real,
       computed on the CPU as transformers computes them): no weight memory.
    2. ``shard_model`` runs AutoTP on it: the layers are replaced and the split is recorded, the meta
       weights take their local shapes (nothing is allocated; the engine skips its ``module.to``).
    3. Every parameter is read from the safetensors files with ``safe_open(...).get_slice``: the
       rank's rows (column-parallel, incl. the q/k/v sub-parameter split of GPT-2's c_attn) or
       columns (row-parallel) of sharded linears, the whole tensor for replicated ones (embeddings,
       norms, head), cast to ``dtype`` and moved to the engine's device. GPT-2's Conv1D weights are
       stored I×O: their slices are read transposed. Tied parameters are one Parameter, read once.

    Peak host memory per rank: the rank's slices plus the replicated parameters (in ``dtype``), plus
    one tensor in transit (its slice as stored, its cast) and the pages of that one tensor in the
    memory-mapped file (page cache, counted in RSS only while the file is open: it is opened per tensor).

    Args:
        identity: also compute ``model_identity`` of the unsharded model from the SHA-256 of every
            tensor read from the files, cast to ``dtype`` (equal to
            ``model_identity(load_model(model_path, dtype=dtype))``; cached per file, see
            ``loading.checkpoint_sampler``).
    """
    from safetensors import safe_open

    from lorif_ray.model.loading import DTYPES, checkpoint_files, checkpoint_key, checkpoint_sampler, model_identity
    from lorif_ray.errors import ConfigError

    model = meta_model(model_path, dtype)
    base_prefix = getattr(model, "base_model_prefix", None)
    ident = model_identity(model, sample=checkpoint_sampler(model_path, DTYPES[dtype], base_prefix)) if identity else None
    conv1d = {n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"}  # stored I×O
    tp = shard_model(model, tp_size, patterns=patterns, partition_config=partition_config, extra_config=extra_config)
    sharded, device = tp.model, tp.engine.device

    aliases: dict[int, list[str]] = {}
    for name, param in sharded.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(name)
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for module_name, module in sharded.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module_name, module, param_name))
            params[id(param)] = param

    files = checkpoint_files(model_path)
    by_file: dict = {}
    for pid, param in params.items():
        key = checkpoint_key(aliases[pid], files.keys(), base_prefix)
        if key is None:
            raise ConfigError(f"{aliases[pid]} not in the checkpoint at {model_path}")
        specs = [(weight_slice(m, pn), mn in conv1d and pn == "weight") for mn, m, pn in owners[pid]]
        sliced = [s for s in specs if s[0] is not None]
        spec, transposed = sliced[0] if sliced else specs[0]
        by_file.setdefault(files[key], []).append((param, key, spec, transposed))
    replaced: dict[int, nn.Parameter] = {}
    for file, items in by_file.items():
        for param, key, spec, transposed in items:
            # one open per tensor: the file is memory-mapped while open, and the pages a read touches
            # count in this process's RSS until it is closed (a column slice touches every row's pages)
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                value = _read_slice(handle, key, spec, transposed)
            if tuple(value.shape) != tuple(param.shape):
                raise RuntimeError(f"{key}: read {tuple(value.shape)} for a local parameter of {tuple(param.shape)}")
            _materialize(param, value.to(device=device, dtype=param.dtype).contiguous(), owners[id(param)], replaced)
            del value
    _repoint_engine(tp.engine, replaced)
    tp.layers = {n: sharded.get_submodule(n) for n in tp.layers}
    sharded.to(device)  # the buffers
    left = [n for n, t in [*sharded.named_parameters(), *sharded.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"not materialized by slice loading: {left[:5]}")
    tp.device = next(sharded.parameters()).device
    tp.identity = ident
    return tp
