"""GPU speed of the three stages on GPT-2-small shapes (random weights, synthetic data), Ray-free.

    PYTHONPATH=. python bench/gpu_speed.py --device cuda                        # f=4 c=1 r=4096, N up to 233k
    PYTHONPATH=. python bench/gpu_speed.py --device cuda --f 16 --r 2048
    PYTHONPATH=. python bench/gpu_speed.py --device cuda --check --n 20000      # + fast paths vs float64 CPU
    python bench/gpu_speed.py --small --device cpu --check                      # CPU smoke run (< 1 min)

Needs only torch, transformers, numpy, pyarrow (no ray, deepspeed, hydra: checked at the end).
Prints Markdown tables:

1. stage 1: examples/s of the bare featurizer (hooks with projections + rank-c factorization + copy of
   the factors to pinned host memory) and of the real stage-1 loop (``write_shards``: one host sync per
   shard, Parquet shards written on a background thread) next to the plain forward+backward (summed
   loss, weight gradients) measured in the same run, fp32 and (on a GPU) bf16 autocast;
2. stage 2: seconds per power-iteration pass GᵀG Q (k = r + 10) from resident factors, per layer shape,
   measured on ``--stage2-rows`` rows and scaled to N and all layers;
3. query: ``--queries`` queries against N resident rows (N-scaling: N/8 … N, capped by memory),
   split into load (safetensors file on local disk → device), term 1 (factors), curvature term (stored
   g'_t) and top-k; plus bytes per example of factors and of g'_t.

Query scores use random factors / g'_t / V (the cost does not depend on the values).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorif_ray.data import TokenizedExample  # noqa: E402
from lorif_ray.math.capture import per_example_token_loss  # noqa: E402
from lorif_ray.math.curvature import ExactInverse, FitSettings, Identity, Woodbury  # noqa: E402
from lorif_ray.math.blocks import GradientBlock, RowLayout, TrainBlock  # noqa: E402
from lorif_ray.math.rsvd import GramOperator, TensorRows, randomized_spectrum  # noqa: E402
from lorif_ray.math.scoring import StackedQuery  # noqa: E402
from lorif_ray.model.layers import select_layers  # noqa: E402
from lorif_ray.stages.featurize import Featurizer, LayerSpec, blocks_from_columns  # noqa: E402
from lorif_ray.stages.index import shard_chunks, write_shards  # noqa: E402
from lorif_ray.outputs.query_outputs import TopK  # noqa: E402
from lorif_ray.store import IndexFolder, load_tensors, save_tensors  # noqa: E402

FORBIDDEN = ("ray", "deepspeed", "hydra")
PAPER_N = 232_585


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int = 1) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def build_model(small: bool, device, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = (GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=2) if small
              else GPT2Config())  # GPT-2 small: 12 layers, 768 wide, vocab 50257, 1024 positions
    config.attn_pdrop = config.resid_pdrop = config.embd_pdrop = 0.0
    return GPT2LMHeadModel(config).to(device=device, dtype=dtype).eval()


def token_batch(model, batch: int, tokens: int, device, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def layer_specs(model, f: int, c: int) -> list[LayerSpec]:
    feat = Featurizer(model, select_layers(model, None), kind="factors", f=f, c=c, seed=0)
    return feat.specs


# ---------------------------------------------------------------------------------------------- stage 1

def stage1(args, model) -> list[dict]:
    """Per variant: plain fwd+bwd, the bare featurizer, and the real stage-1 loop (``write_shards``:
    per-shard featurization + Parquet writes on a background thread), examples/s side by side."""
    device = args.device
    batch = token_batch(model, args.batch, args.tokens, device)
    ids = [str(i) for i in range(args.batch)]
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, (args.shards * args.shard_batches * args.batch, args.tokens),
                           generator=gen).tolist()
    examples = [TokenizedExample(f"t{i}", row, row) for i, row in enumerate(tokens)]
    shard_size = args.shard_batches * args.batch
    chunks = dict(enumerate(shard_chunks(examples, shard_size)))
    rows = []
    proj = getattr(torch, args.projection_dtype) if args.projection_dtype else None
    variants = [("fp32", None, None)]
    if torch.device(device).type == "cuda":
        variants += [("bf16 autocast, fp32 projections", torch.bfloat16, None),
                     (f"bf16 autocast, {args.projection_dtype or 'bfloat16'} projections", torch.bfloat16,
                      proj or torch.bfloat16)]
    for label, autocast, projection in variants:
        def plain():
            for p in model.parameters():
                p.requires_grad_(True)
                p.grad = None
            with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
                loss = per_example_token_loss(model, batch).sum()
            loss.backward()

        featurizer = Featurizer(model, select_layers(model, None), kind="factors", f=args.f, c=args.c, seed=0,
                                autocast_dtype=autocast, projection_dtype=projection)
        pinned = {k: torch.empty((args.batch, w), dtype=torch.float32,
                                 pin_memory=torch.device(device).type == "cuda") for k, w in featurizer.columns.items()}

        def featurize():
            columns = featurizer(ids, batch)
            for k, v in columns.items():  # the write path: device → pinned host, asynchronously
                pinned[k].copy_(v, non_blocking=True)

        def pipeline():
            with tempfile.TemporaryDirectory(dir=os.environ.get("GPU_SPEED_TMP")) as directory:
                writer = IndexFolder(directory).writer(kind="factors", columns=featurizer.columns,
                                                       dtype=args.store_dtype, shard_size=shard_size, meta={})
                for record in write_shards(featurizer, writer, chunks, args.batch, pad_token_id=0):
                    writer.commit(record)  # as the driver does

        t_plain = timed(plain, device, args.repeat)
        t_feat = timed(featurize, device, args.repeat)
        t_pipe = timed(pipeline, device) if args.shards else None
        rows.append({"variant": label, "plain_ex_s": args.batch / t_plain, "featurizer_ex_s": args.batch / t_feat,
                     "featurizer_vs_plain": t_plain / t_feat,
                     "stage1_ex_s": len(examples) / t_pipe if t_pipe else None,
                     "stage1_vs_plain": len(examples) / t_pipe * t_plain / args.batch if t_pipe else None})
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return rows


# ---------------------------------------------------------------------------------------------- stage 2

def stage2(args, specs) -> list[dict]:
    device, out = args.device, []
    shapes: dict[tuple, int] = {}
    for s in specs:
        shapes[(s.d1, s.d2, s.c)] = shapes.get((s.d1, s.d2, s.c), 0) + 1
    mm = torch.bfloat16 if args.stage2_bf16 else None
    for (d1, d2, c), count in shapes.items():
        dim = d1 * d2
        k = min(args.r + 10, dim)
        rows = min(args.stage2_rows, args.n)
        gen = torch.Generator(device=device).manual_seed(1)
        u = torch.randn(rows, d1, c, device=device, generator=gen)
        v = torch.randn(rows, d2, c, device=device, generator=gen)
        q = torch.linalg.qr(torch.randn(dim, k, device=device, generator=gen)).Q
        gram = GramOperator(TensorRows({"layer": GradientBlock(u=u, v=v)}, batch_rows=args.stage2_chunk),
                            matmul_dtype=mm)
        seconds = timed(lambda: gram(q), device)
        per_pass = seconds * args.n / rows * count
        out.append({"shape": f"{d1}x{d2} c={c}", "layers": count, "k": k, "rows": rows, "s_per_pass_measured": seconds,
                    "s_per_pass_all_N_all_layers": per_pass})
        del u, v, q, gram
    return out


# ---------------------------------------------------------------------------------------------- query

def synthetic_query(specs, nq: int, r: int, device, route: str, dtype=torch.float32, seed=2):
    """Random query factors and Woodbury curvature terms for ``route`` (the cost does not depend on the
    values): V_r only where the route needs it (recompute), g'_q and h_q made directly otherwise, so
    no route holds the Σ D·r numbers of V_r that it does not use (87 GB in float32 at f=4 r=4096)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    query, curvature, coordinates, terms = {}, {}, {}, {}
    for s in specs:
        rank = min(r, s.dim)
        query[s.name] = GradientBlock(u=torch.randn(nq, s.d1, s.c, device=device, generator=gen, dtype=dtype),
                                      v=torch.randn(nq, s.d2, s.c, device=device, generator=gen, dtype=dtype))
        values = torch.rand(rank, device=device, generator=gen, dtype=dtype) + 0.5
        vectors = None
        if route == "recompute":
            vectors = torch.randn(s.dim, rank, device=device, generator=gen, dtype=dtype) / math.sqrt(s.dim)
        else:
            coordinates[s.name] = torch.randn(nq, rank, device=device, generator=gen, dtype=dtype)
        if route == "query":
            terms[s.name] = torch.randn(nq, s.dim, device=device, generator=gen, dtype=dtype)
        curvature[s.name] = Woodbury(0.1, values, vectors)
    return query, curvature, coordinates or None, terms or None


def synthetic_block(layout: RowLayout, n: int, device, dtype, coordinates: bool, seed=3) -> TrainBlock:
    gen = torch.Generator(device=device).manual_seed(seed)
    factors = [(torch.randn(len(g.names), n, g.c, g.d1, device=device, generator=gen).to(dtype),
                torch.randn(len(g.names), n, g.c, g.d2, device=device, generator=gen).to(dtype))
               for g in layout.factor_groups]
    coords = None
    if coordinates:
        coords = torch.empty(n, layout.coordinate_width, device=device, dtype=dtype)
        for start in range(0, n, 16384):  # fill in pieces: no float32 temporary of the whole matrix
            stop = min(start + 16384, n)
            coords[start:stop] = torch.randn(stop - start, layout.coordinate_width, device=device, generator=gen)
    return TrainBlock(factors, None, coords)


def free_bytes(device) -> float:
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    return 8e9  # CPU: stay modest


def query_bench(args, specs) -> tuple[list[dict], dict]:
    device = args.device
    dtype = getattr(torch, args.resident_dtype)
    mm = getattr(torch, args.matmul_dtype) if args.matmul_dtype else None
    stored = args.route == "stored"
    query, curvature, coordinates, terms = synthetic_query(specs, args.queries, args.r, device, args.route)
    layout = RowLayout.build(specs, "factors", curvature)
    stacked = StackedQuery(layout, query, curvature, route=args.route, matmul_dtype=mm, query_coordinates=coordinates,
                           query_side_terms=terms)
    del query, curvature, coordinates, terms
    size = torch.finfo(dtype).bits // 8
    factor_bytes = sum(s.c * (s.d1 + s.d2) for s in specs) * size
    coord_bytes = layout.coordinate_width * size
    per_row = factor_bytes + (coord_bytes if stored else 0)
    workspace = 2 * len(max(layout.factor_groups, key=lambda g: len(g.names)).names) * args.queries * args.chunk * 4 * 3
    cap = int((free_bytes(device) * 0.85 - workspace) / per_row)
    sizes = sorted({max(1, min(args.n // d, cap)) for d in (8, 4, 2, 1)})
    rows = []
    for n in sizes:
        block = synthetic_block(layout, n, device, dtype, stored)
        topk = TopK(args.queries, 10, device)
        parts = {"term1": 0.0, "curvature": 0.0, "topk": 0.0}

        def run(record=False):
            for start in range(0, n, args.chunk):
                chunk = block.rows(start, min(start + args.chunk, n))
                t0 = time.perf_counter()
                scores = stacked.term_one(chunk)
                if record:
                    sync(device)
                t1 = time.perf_counter()
                if args.route != "none":
                    scores -= stacked.curvature_term(chunk)
                if record:
                    sync(device)
                t2 = time.perf_counter()
                topk.update(scores, start)
                if record:
                    sync(device)
                    parts["term1"] += t1 - t0
                    parts["curvature"] += t2 - t1
                    parts["topk"] += time.perf_counter() - t2

        total = timed(run, device)  # no syncs inside: the real latency
        run(record=True)  # per-part split (syncs between parts)
        fits = block.nbytes() < min(args.max_load_gb * 2**30, 0.5 * shutil.disk_usage(
            os.environ.get("GPU_SPEED_TMP", tempfile.gettempdir())).free)
        load = load_from_disk(block, device) if n == sizes[-1] and fits else None  # "-": too big for disk/RAM
        rows.append({"n": n, "resident_s": total, **{f"{k}_s": v for k, v in parts.items()},
                     "load_s": load, "pairs_per_s": n * args.queries / total})
        del block
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    storage = {"factor_bytes_per_example": factor_bytes, "coordinate_bytes_per_example": coord_bytes,
               "coordinate_width": layout.coordinate_width, "resident_dtype": args.resident_dtype}
    return rows, storage


def load_from_disk(block: TrainBlock, device) -> float:
    """Seconds to read the resident tensors from a local safetensors file onto the device."""
    directory = Path(os.environ.get("GPU_SPEED_TMP", tempfile.gettempdir()))
    path = directory / f"gpu_speed_resident_{os.getpid()}.safetensors"
    tensors = {f"f{i}{s}": t for i, pair in enumerate(block.factors) for s, t in zip("uv", pair)}
    if block.coordinates is not None:
        tensors["coordinates"] = block.coordinates
    try:
        save_tensors(path, tensors, {})
        os.sync() if hasattr(os, "sync") else None
        sync(device)
        start = time.perf_counter()
        loaded, _ = load_tensors(path, device=device)
        sync(device)
        seconds = time.perf_counter() - start
        del loaded
    finally:
        path.unlink(missing_ok=True)
    return seconds  # page cache may hold the file: a warm read (drop caches for a cold one)


# ---------------------------------------------------------------------------------------------- checks

def checks(args) -> dict[str, float]:
    """Max relative error of every fast path against the float64 CPU oracle (tests/oracles.py) on small inputs."""
    from tests.oracles import curvature_inverse, oracle_scores

    errors: dict[str, float] = {}
    rel = lambda a, b: float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm())  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    specs = [LayerSpec("a", 0, 0, 6, 4, 2), LayerSpec("b", 0, 0, 6, 4, 2), LayerSpec("c", 0, 0, 3, 5, 2)]
    blocks = {s.name: GradientBlock(u=torch.randn(41, s.d1, s.c, generator=gen, dtype=torch.float64),
                                    v=torch.randn(41, s.d2, s.c, generator=gen, dtype=torch.float64)) for s in specs}
    qblocks = {s.name: GradientBlock(u=torch.randn(5, s.d1, s.c, generator=gen, dtype=torch.float64),
                                     v=torch.randn(5, s.d2, s.c, generator=gen, dtype=torch.float64)) for s in specs}
    dense = lambda b: {n: x.dense() for n, x in b.items()}  # noqa: E731
    settings = FitSettings(rank=9, damping=0.4, oversample=24)
    curvature = {s.name: Woodbury.fit(GramOperator(TensorRows(blocks[s.name].dense())), s.dim, s.name, settings)
                 for s in specs}
    inverses = {s.name: curvature_inverse(curvature[s.name], s.dim) for s in specs}
    layout = RowLayout.build(specs, "factors", curvature)
    coords = {n: blocks[n].dense() @ curvature[n].vectors for n in layout.coordinate_names}
    for normalize in (False, True):
        ref = oracle_scores(dense(qblocks), dense(blocks), inverses, normalize)
        suffix = " normalized" if normalize else ""
        for route, block in (("recompute", layout.train_block(blocks)), ("stored", layout.train_block(blocks, coords))):
            got = StackedQuery(layout, qblocks, curvature, route=route, normalize=normalize).scores(block)
            errors[f"query float64 {route}{suffix}"] = rel(got, ref)
        dev = args.device
        mov = lambda d, dt: {n: GradientBlock(u=b.u.to(dev, dt), v=b.v.to(dev, dt)) for n, b in d.items()}  # noqa: E731
        curv32 = {n: c.to(dev, torch.float32) for n, c in curvature.items()}
        for dt_label, mm, rd in (("float32", None, torch.float32), ("bf16", torch.bfloat16, torch.bfloat16)):
            got = StackedQuery(layout, mov(qblocks, torch.float32), curv32, route="stored", normalize=normalize,
                               matmul_dtype=mm).scores(
                layout.train_block(mov(blocks, torch.float64),
                                   {k: v.to(dev) for k, v in coords.items()}, dtype=rd))
            errors[f"query {dev} {dt_label} stored g'{suffix}"] = rel(got, ref)
    # stage 2: resident Gram passes on the device vs the float64 operator on the CPU
    u, v = blocks["a"].u, blocks["a"].v
    reference = randomized_spectrum(GramOperator(TensorRows(blocks["a"].dense(), batch_rows=8)), 24, 6, oversample=3,
                                    power_iters=3, seed=0, name="a", dtype=torch.float64)
    for label, dev, dt, mm in (("float64 cpu", "cpu", torch.float64, None),
                               (f"float32 {args.device}", args.device, torch.float32, None),
                               (f"bf16 {args.device}", args.device, torch.float32, torch.bfloat16)):
        gram = GramOperator(TensorRows({"a": GradientBlock(u=u.to(dev, dt), v=v.to(dev, dt))}, batch_rows=7),
                            matmul_dtype=mm)
        spectrum = randomized_spectrum(gram, 24, 6, oversample=3, power_iters=3, seed=0, name="a", dtype=dt, device=dev)
        op = lambda s: (s.vectors.double().cpu() * s.values.double().cpu()) @ s.vectors.double().cpu().T  # noqa: E731
        errors[f"stage 2 {label} V S^2 V^T"] = rel(op(spectrum), op(reference))
        errors[f"stage 2 {label} g'_t"] = rel(gram.project(spectrum.vectors),
                                              blocks["a"].dense().to(dev, dt) @ spectrum.vectors)
    # stage 1: featurizer fp32 / autocast vs float64
    model64 = build_model(True, "cpu", torch.float64)
    batch = token_batch(model64, 3, 16, "cpu")
    ids = ["x", "y", "z"]
    layers64 = select_layers(model64, None)
    ref = Featurizer(model64, layers64, kind="factors", f=4, c=2, seed=0, compute_dtype=torch.float64)(ids, batch)
    model = build_model(True, args.device, torch.float32)
    model.load_state_dict({k: t.float() for k, t in model64.state_dict().items()})
    for label, autocast in (("float32", None), ("bf16 autocast", torch.bfloat16)):
        feat = Featurizer(model, select_layers(model, None), kind="factors", f=4, c=2, seed=0, autocast_dtype=autocast)
        got = feat(ids, {k: t.to(args.device) for k, t in batch.items()})
        worst = 0.0
        for s in feat.specs:
            dense_rows = lambda cols: blocks_from_columns(  # noqa: E731
                [s], "factors", {k: t.double().cpu() for k, t in cols.items()})[s.name].dense()
            worst = max(worst, rel(dense_rows(got), dense_rows(ref)))
        errors[f"stage 1 {args.device} {label} (u v^T)"] = worst
    # LoGRA / GradDot dense fast path
    dense_specs = [LayerSpec(s.name, 0, 0, s.d1, s.d2, 0) for s in specs]
    dtrain = {s.name: GradientBlock(g=blocks[s.name].dense()) for s in specs}
    dquery = {s.name: GradientBlock(g=qblocks[s.name].dense()) for s in specs}
    for method, cls in (("logra", ExactInverse), ("graddot", Identity)):
        dcurv = {s.name: cls.fit(GramOperator(TensorRows(dtrain[s.name].g)), s.dim, s.name, FitSettings(damping=0.5))
                 for s in specs}
        ref = oracle_scores(dense(qblocks), dense(blocks), {s.name: curvature_inverse(dcurv[s.name], s.dim)
                                                            for s in specs}, normalize=True)
        dl = RowLayout.build(dense_specs, "dense", dcurv)
        got = StackedQuery(dl, dquery, dcurv, normalize=True).scores(
            dl.train_block(dtrain))
        errors[f"query float64 {method} normalized"] = rel(got, ref)
    return errors


def precision_check(args) -> list[dict]:
    """The precision policy on the device, on a spiked spectrum (σ₁²/λ ≈ 900; tests/stages/spiked.py):
    float32 / bfloat16 storage × matmul policy (math, bf16, tf32 on float32) × the three routes of the
    curvature term, against the float64 CPU reference from never-rounded rows (tests/stages/test_precision.py).
    Each policy refits stage 2 (the curvature records its policy and a query under another is refused)."""
    import tempfile
    from dataclasses import replace

    import numpy as np

    from lorif_ray.config import PrecisionConfig
    from lorif_ray.stages.curvature import run_curvature
    from lorif_ray.stages.query import LocalScorer
    from lorif_ray.outputs.query_outputs import output_files
    from lorif_ray.store import CurvatureFolder, IndexFolder
    from tests.stages.spiked import spiked_config, with_output, write_spiked_index
    from tests.stages.test_precision import reference_scores

    rows = []
    rank = lambda x: np.argsort(np.argsort(x))  # noqa: E731
    for storage in ("float32", "bfloat16"):
        for matmul, tf32 in (("auto", False), ("auto", True), ("bfloat16", False)):
            root = Path(tempfile.mkdtemp(prefix="lorif-precision-", dir=os.environ.get("GPU_SPEED_TMP")))
            cfg = spiked_config(root, storage, precision=PrecisionConfig(matmul=matmul))
            cfg = replace(cfg, model=replace(cfg.model, device=args.device))
            train, queries = write_spiked_index(cfg)
            cfg = with_output(cfg, "out", store_coordinates=True)
            torch.backends.cuda.matmul.allow_tf32 = tf32
            try:
                run_curvature(cfg)
                reference = reference_scores(cfg, train, queries).numpy()
                manifest = IndexFolder(cfg.index_path).manifest()
                queries32 = {k: v.float() for k, v in queries.items()}
                for route in ("stored", "query", "recompute"):
                    run = replace(cfg, query=replace(cfg.query, resident=True))
                    scorer = LocalScorer(run, manifest, CurvatureFolder(run.curvature_path), stored=route == "stored")
                    with output_files(run, manifest, len(next(iter(queries32.values())))) as files:
                        scorer.score(queries32, route, 10, files)
                    full = np.load(Path(run.output_dir) / "scores.npy").astype(np.float64)
                    rows.append({
                        "storage": storage, "matmul": matmul, "tf32": tf32, "route": route,
                        "rel_error": float(np.abs(full - reference).max() / np.abs(reference).max()),
                        "spearman": float(np.mean([np.corrcoef(rank(full[q]), rank(reference[q]))[0, 1]
                                                   for q in range(len(full))])),
                        "top10_overlap": float(np.mean([len(set(np.argsort(-full[q])[:10])
                                                            & set(np.argsort(-reference[q])[:10])) / 10
                                                        for q in range(len(full))]))})
            finally:
                torch.backends.cuda.matmul.allow_tf32 = args.tf32
                shutil.rmtree(root, ignore_errors=True)
    return rows


# ---------------------------------------------------------------------------------------------- main

def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    fmt = lambda x: "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=PAPER_N, help="training examples (query: largest N that fits)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--f", type=int, default=4)
    p.add_argument("--c", type=int, default=1)
    p.add_argument("--r", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5, help="timed stage-1 batches")
    p.add_argument("--shards", type=int, default=3, help="stage-1 loop: shards written (0 = skip)")
    p.add_argument("--shard-batches", type=int, default=8, help="stage-1 loop: batches per shard")
    p.add_argument("--store-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--small", action="store_true", help="tiny GPT-2 and sizes for a CPU smoke run")
    p.add_argument("--check", action="store_true", help="fast paths vs the float64 CPU reference")
    p.add_argument("--precision", action="store_true", help="the precision policy on a spiked spectrum, every "
                   "route, bf16/tf32 matmuls on and off, vs the float64 CPU reference")
    p.add_argument("--skip", default="", help="comma list of stage1,stage2,query to skip")
    p.add_argument("--resident-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--matmul-dtype", default="bfloat16", choices=["", "float32", "float16", "bfloat16"])
    p.add_argument("--route", default="stored", choices=["stored", "query", "recompute", "none"],
                   help="query: the curvature term from stored g'_t (r per pair), from the query side "
                        "(h_q, nq·D per row), from g'_t recomputed from the factors (r·D per row), or none "
                        "(term 1 only)")
    p.add_argument("--chunk", type=int, default=32768, help="training rows per scoring step (the query and "
                   "recompute routes form (L, chunk, D) dense rows per group: keep it small at f=4)")
    p.add_argument("--max-load-gb", type=float, default=32, help="skip the disk-load timing above this size")
    p.add_argument("--stage2-rows", type=int, default=16384)
    p.add_argument("--stage2-chunk", type=int, default=4096)
    p.add_argument("--stage2-bf16", action="store_true")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (float32 paths)")
    p.add_argument("--projection-dtype", default="", choices=["", "float32", "float16", "bfloat16"],
                   help="stage 1: dtype of the hooks' projections in the third variant (default bfloat16)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    if args.small:
        args.n, args.queries, args.tokens, args.batch = min(args.n, 3000), min(args.queries, 50), min(args.tokens, 32), 4
        args.r, args.repeat, args.stage2_rows, args.chunk = min(args.r, 64), 2, 1024, 1024
        args.shards, args.shard_batches = min(args.shards, 2), min(args.shard_batches, 2)
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"args": vars(args)}
    model = build_model(args.small, args.device)
    specs = layer_specs(model, args.f, args.c)
    name = "tiny GPT-2" if args.small else "GPT-2 small"
    print(f"# {name}, {len(specs)} layers, f={args.f} c={args.c} r={args.r}, device {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}\n")
    if "stage1" not in skip:
        results["stage1"] = stage1(args, model)
        print(f"## stage 1 (B={args.batch}, T={args.tokens}, {args.repeat} batches)\n\n{table(results['stage1'])}\n")
    del model
    if "stage2" not in skip:
        results["stage2"] = stage2(args, specs)
        print(f"## stage 2: one pass GᵀG Q from resident factors (N={args.n})\n\n{table(results['stage2'])}\n"
              f"total per pass: {sum(r['s_per_pass_all_N_all_layers'] for r in results['stage2']):.4g} s "
              f"(randomized SVD = svd_power_iters + 1 passes)\n")
    if "query" not in skip:
        rows, storage = query_bench(args, specs)
        results["query"], results["storage"] = rows, storage
        largest = rows[-1]
        scale = args.n / largest["n"]
        print(f"## query: {args.queries} queries, resident {args.resident_dtype}, matmul {args.matmul_dtype or 'math'}"
              f", curvature term route: {args.route}\n\n{table(rows)}\n")
        print(f"bytes/example: factors {storage['factor_bytes_per_example']}, g'_t "
              f"{storage['coordinate_bytes_per_example']} ({storage['coordinate_width']} numbers); "
              f"N={args.n} by linear scaling from N={largest['n']}: {largest['resident_s'] * scale:.3g} s resident, "
              f"{(largest['load_s'] or 0) * scale:.3g} s load\n")
    if args.check:
        results["check"] = checks(args)
        print("## max relative error vs float64 CPU reference\n")
        print(table([{"path": k, "rel_error": v} for k, v in results["check"].items()]) + "\n")
    if args.precision:
        results["precision"] = precision_check(args)
        print("## precision policy on a spiked spectrum (σ₁²/λ ≈ 900) vs float64 CPU reference\n")
        print(table(results["precision"]) + "\n")
    bad = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in FORBIDDEN)
    results["forbidden_imports"] = bad
    print(f"forbidden imports (ray/deepspeed/hydra): {bad or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
