"""The plan as Markdown (``lorif_ray.plan.make_plan``): one row per layer shape, the stage-1 memory per TP size,
the layout, every process's footprint, and one bullet per figure saying whether it is exact or an estimate.
``summary_row`` and ``memory_row`` are the README's condensed tables (tests/plan checks them)."""

from __future__ import annotations

import re

from lorif_ray.footprint import GIB, Footprint, dtype_name
from lorif_ray.math.curvature import Curvature
from lorif_ray.plan import H2D_PROVENANCE, REFERENCE_PROVENANCE, Plan, device_bytes
from lorif_ray.stages import curvature as stage2
from lorif_ray.stages.featurize import LayerSpec
from lorif_ray.stages.rows import RESIDENT_FRACTION
from lorif_ray.store.schema import BYTES_PER_VALUE


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


def shape_rows(plan: Plan) -> list[tuple[str, int, LayerSpec]]:
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


def _peak_cell(memory: Footprint) -> str:
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
        f"model.dtype={cfg.model.dtype} N={cfg.num_examples:,} Nq={cfg.num_queries:,} B={cfg.data.batch_size} "
        f"T={cfg.data.max_length} GPUs={cfg.num_gpus} GPU memory={cfg.gpu_memory_gib:g} GiB (headroom {cfg.headroom:.0%})",
        "",
        f"| layer | count | I | O | d1 | d2 | c | TP split | values/ex ({per_value}) | curvature "
        f"({dtype_name(plan.layout.driver.math)}) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for pattern, count, s in shape_rows(plan):
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
