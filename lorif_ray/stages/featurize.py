"""Batches of tokenized examples → what stage 1 stores per example (and stage 3 scores with).

One ``Featurizer`` holds the model, its selected layers and their projections. For a batch it runs
one forward+backward with the capture hooks and returns store columns, (n, width) tensors named by
``lorif_ray.store.schema``: each layer's rank-c factors u, v (row-major (d, c) flattened) for LoRIF, its
dense rows vec(G̃) (D = d1·d2) for LoGRA and GradDot, the hidden state (last non-pad token of the last
layer) for RepSim. ``blocks_from_columns`` turns columns back into per-layer ``GradientBlock``s.

The work splits in two: ``Featurizer.capture`` (needs the model: forward+backward with hooks) and
``ColumnMaker`` (needs only the layer shapes: factorization). Stage 1 on Ray runs them in one actor
(fused) or ships the captured pairs to a factorization pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lorif_ray.math.capture import (Measurement, ProjectedGradientCapture, check_finite_all, dense_gradients,
                                   linear_dims, measurement_function, nonfinite_rows, per_example_measurement,
                                   sampled_labels, summed_loss)
from lorif_ray.math.factorize import default_iterations, effective_rank, factorize, initial_block
from lorif_ray.math.blocks import GradientBlock
from lorif_ray.math.kronecker import StatsAccumulator
from lorif_ray.math.projection import layer_projection
from lorif_ray.model.tensor_parallel import divide_layers, rank_dims
from lorif_ray.store.schema import HIDDEN_COLUMN, dense_column, factor_columns, store_columns

STATISTICS_LABELS = ("training", "sampled")  # ``Config.kfac_labels``
DEVICE_BYTES = 4  # projections, captured A/B and store columns are float32 on the device

FiniteMasks = list[tuple[str, torch.Tensor]]
"""[(layer, (n,) bool rows holding NaN/Inf)] for ``check_finite_all``."""


@dataclass(frozen=True)
class LayerSpec:
    """Shapes of one attributed layer (recorded in the manifest)."""

    name: str
    in_features: int
    out_features: int
    d1: int
    d2: int
    c: int  # effective factor rank (0 for dense/hidden stores)

    @property
    def dim(self) -> int:
        return self.d1 * self.d2


class ColumnMaker:
    """Captured (A, B) pairs → store columns. Needs no model, so the factorization pool can run it.

    Args:
        specs: the layers' shapes (from a ``Featurizer`` or an index manifest).
        kind: "factors" (rank-c factors by block power iteration) or "dense" (vec(AᵀB)).
        seed: derives each layer's factor start block (the same in every process).
        iterations: power iterations of the factorization.
        compute_dtype, device: where and in what precision factors are computed.
    """

    def __init__(self, specs: list[LayerSpec], *, kind: str, seed: int, iterations: int,
                 compute_dtype: torch.dtype = torch.float32, device="cpu"):
        self.specs, self.kind, self.iterations = specs, kind, iterations
        self.compute_dtype, self.device = compute_dtype, torch.device(device)
        self.start_blocks = {
            s.name: initial_block(seed, s.name, s.d2, s.c, compute_dtype, self.device) for s in specs if s.c
        }

    @property
    def columns(self) -> dict[str, int]:
        """Store layout: column name → floats per example."""
        return store_columns(self.kind, self.specs)

    def __call__(self, ids: list[str], captured: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{layer: (A (n, T, d1), B (n, T, d2))} → {column: (n, width)}; raises on NaN/Inf naming the examples."""
        columns, masks = self.unchecked(ids, captured)
        check_finite_all(masks, ids)  # one host sync
        return columns

    def unchecked(self, ids: list[str], captured: dict[str, tuple[torch.Tensor, torch.Tensor]]
                  ) -> tuple[dict[str, torch.Tensor], FiniteMasks]:
        """Store columns and the NaN/Inf row masks for ``check_finite_all``, without any host sync
        (a pipeline checks many batches at once)."""
        out = {}
        n = len(ids)
        pairs = {s.name: tuple(t.to(device=self.device, dtype=self.compute_dtype) for t in captured[s.name])
                 for s in self.specs}
        if self.kind == "dense":
            for spec in self.specs:
                out[dense_column(spec.name)] = dense_gradients(*pairs[spec.name]).reshape(n, -1)
            return out, [(s.name, nonfinite_rows(out[dense_column(s.name)])) for s in self.specs]
        masks = [(s.name, nonfinite_rows(t)) for s in self.specs for t in pairs[s.name]]
        for spec in self.specs:
            u, v = factorize(*pairs[spec.name], self.start_blocks[spec.name], self.iterations)
            u_column, v_column = factor_columns(spec.name)
            out[u_column], out[v_column] = u.reshape(n, -1), v.reshape(n, -1)
        return out, masks


class Featurizer:
    """Per-example projected gradients (factors or dense) or hidden states of a model.

    ``capture`` runs one forward+backward with the hooks and returns the (A, B) pairs; calling the
    featurizer also turns them into store columns (``ColumnMaker``), which is the fused path.

    Args:
        model: causal LM in eval mode.
        layers: {name: module} from ``select_layers``.
        kind: "factors", "dense" or "hidden".
        f, c, seed: projection factor, factor rank, seed.
        factor_iters: power iterations (None = 8 for c = 1, 16 otherwise).
        compute_dtype: dtype of projections and factorization (float32; float64 in tests).
        dims: {name: (I, O)} of the unsharded layers, when ``layers`` are tensor-parallel shards.
        capture_factory: builds the capture hooks from (model, layers, projections); default
            ``ProjectedGradientCapture`` (tensor parallelism passes its all-reducing capture).
        autocast_dtype: run the model's forward under ``torch.autocast`` in this dtype (e.g.
            torch.bfloat16 on a GPU); projections and factorization stay in their own dtypes.
        projection_dtype: dtype of P_in, P_out and the hooks' projections (None = compute_dtype); A and B
            are cast to compute_dtype before the factorization.
        measurement: what each example's gradient is taken of: "loss" (the summed token loss; always for
            training examples), "logprob", "mean_loss" or a function ``(model outputs, batch) → (B,)``
            (``lorif_ray.math.capture.MEASUREMENTS``); set it for queries only.
        statistics: also sum every captured batch's K-FAC statistics (x̃x̃ᵀ, δ̃δ̃ᵀ over its tokens) into
            ``self.statistics`` (stage 1 pops them per shard); gradient kinds only.
        statistics_labels: the labels of those statistics: "training" (the batch's own: the empirical Fisher,
            no extra pass) or "sampled" (drawn from the model's predictive distribution at the same loss
            positions, ``sampled_labels``: the true Fisher; one more forward+backward per batch, whose
            captures feed only the statistics, never the returned pairs).
    """

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module], *, kind: str, f: int, c: int, seed: int,
                 factor_iters: int | None = None, compute_dtype: torch.dtype = torch.float32,
                 dims: dict[str, tuple[int, int]] | None = None,
                 capture_factory: Callable[..., ProjectedGradientCapture] = ProjectedGradientCapture,
                 autocast_dtype: torch.dtype | None = None, projection_dtype: torch.dtype | None = None,
                 measurement: str | Measurement = "loss", statistics: bool = False, statistics_labels: str = "training"):
        self.model, self.layers, self.kind = model, layers, kind
        if statistics_labels not in STATISTICS_LABELS:
            raise ValueError(f"statistics_labels={statistics_labels!r}: choose one of {STATISTICS_LABELS}")
        self.statistics = StatsAccumulator() if statistics and kind != "hidden" else None
        self.statistics_labels = statistics_labels
        self.measurement = measurement
        measurement_function(measurement)  # an unknown name fails here
        self.autocast_dtype = autocast_dtype
        self.seed, self.compute_dtype, self.capture_factory = seed, compute_dtype, capture_factory
        self.device = next(model.parameters()).device
        dims = dims or {name: linear_dims(m) for name, m in layers.items()}
        self.projections = {
            name: layer_projection(seed, name, *dims[name], f, dtype=projection_dtype or compute_dtype, device=self.device)
            for name in layers
        }
        self.specs = []
        for name in layers:
            p = self.projections[name]
            rank = effective_rank(c, p.d1, p.d2) if kind == "factors" else 0
            self.specs.append(LayerSpec(name, *dims[name], p.d1, p.d2, rank))
        self.iterations = factor_iters or default_iterations(c)
        self.maker = None if kind == "hidden" else ColumnMaker(
            self.specs, kind=kind, seed=seed, iterations=self.iterations, compute_dtype=compute_dtype, device=self.device)

    @property
    def columns(self) -> dict[str, int]:
        """Store layout: column name → floats per example."""
        if self.kind == "hidden":
            return store_columns("hidden", [], int(self.model.config.hidden_size))
        return self.maker.columns

    def capture(self, ids: list[str], batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """One forward+backward: {layer: (A (n, T, d1), B (n, T, d2))} on the model's device."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.capture_factory(self.model, self.layers, self.projections) as capture:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = per_example_measurement(self.model, batch, ids, self.measurement).sum()
            loss.backward()  # outside autocast, as torch recommends; the hooks project in their own dtype
            captured = capture.pop()
        if self.statistics is not None:  # every token that can carry a gradient: the attention mask
            fisher = captured if self.statistics_labels == "training" else self._sampled_capture(ids, batch)
            self.statistics.add(fisher, batch["attention_mask"])
        return captured

    def _sampled_capture(self, ids: list[str], batch: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The (x̃, δ̃) pairs of the summed loss on labels sampled from the model at the batch's loss positions."""
        with self.capture_factory(self.model, self.layers, self.projections) as capture:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                outputs = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                labels = sampled_labels(outputs.logits, batch["labels"], ids, self.seed)
                loss = summed_loss(outputs, {**batch, "labels": labels}).sum()
            loss.backward()
            return capture.pop()

    def __call__(self, ids: list[str], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store columns of one batch: {column: (n, width)} on the model's device."""
        columns, masks = self.unchecked(ids, batch)
        check_finite_all(masks, ids)
        return columns

    def unchecked(self, ids: list[str], batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], FiniteMasks]:
        """Store columns of one batch and their NaN/Inf row masks, with no host sync (see ``ColumnMaker``)."""
        if self.kind == "hidden":
            return {HIDDEN_COLUMN: self._hidden({k: v.to(self.device) for k, v in batch.items()})}, []
        return self.maker.unchecked(ids, self.capture(ids, batch))

    @torch.no_grad()
    def _hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-layer hidden state at each example's last non-pad token: (n, H)."""
        output = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        last = batch["attention_mask"].sum(dim=1) - 1
        hidden = output.hidden_states[-1]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].to(self.compute_dtype)

    def blocks(self, columns: dict[str, torch.Tensor]) -> dict[str, GradientBlock]:
        """Store columns → {layer: GradientBlock}."""
        return blocks_from_columns(self.specs, self.kind, columns)


def blocks_from_columns(specs: list[LayerSpec], kind: str, columns: dict[str, torch.Tensor]) -> dict[str, GradientBlock]:
    """{layer: GradientBlock} (views) from store columns {column: (n, width)} of ``kind`` "factors" or "dense"."""
    out = {}
    for s in specs:
        if kind == "dense":
            out[s.name] = GradientBlock(g=columns[dense_column(s.name)])
        else:
            u, v = (columns[c] for c in factor_columns(s.name))
            out[s.name] = GradientBlock(u=u.reshape(u.shape[0], s.d1, s.c), v=v.reshape(u.shape[0], s.d2, s.c))
    return out


def featurizer_footprint(specs: list["LayerSpec"], kind: str, *, tokens: int, shard_rows: int,
                         hidden_size: int | None = None, tp: int = 1) -> dict[str, int]:
    """Bytes a ``Featurizer`` (one of ``tp`` tensor-parallel ranks) holds on its device beside the model, for
    batches of ``tokens`` tokens and shards of ``shard_rows`` rows, all float32: {"projections": the rows of
    P_in (I×d1), P_out (O×d2) the rank holds, "captured": A (tokens×d1), B (tokens×d2) of every layer after the
    all-reduce, "store": the store columns of the shard's batches (``featurize_chunk`` keeps them until the shard
    ends; with TP, of the rank's share of the layers, ``divide_layers`` by D)}. A hidden store ("repsim")
    projects nothing and keeps the shard's hidden states."""
    if kind == "hidden":
        return {"projections": 0, "captured": 0, "store": DEVICE_BYTES * shard_rows * hidden_size}
    projections = 0
    for s in specs:
        rows_in, rows_out = rank_dims(s.name, s.in_features, s.out_features, tp)
        projections += rows_in * s.d1 + rows_out * s.d2
    captured = tokens * sum(s.d1 + s.d2 for s in specs)
    share = max(sum(store_columns(kind, [s for s in specs if s.name in names], 0).values())
                for names in map(set, divide_layers({s.name: s.dim for s in specs}, tp)))
    return {"projections": DEVICE_BYTES * projections, "captured": DEVICE_BYTES * captured,
            "store": DEVICE_BYTES * shard_rows * share}
