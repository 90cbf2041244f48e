"""Tensor parallelism (DeepSpeed AutoTP, 2 ranks on gloo) gives the TP=1 projected gradients, factors, scores.

Two ranks are spawned once for the module (torch.multiprocessing, not Ray); each shards a tiny
GPT-2 and a tiny Llama (float64), captures a train and a query batch, factorizes its share of the
layers and gathers the factors on rank 0, then saves what it holds. The TP=1 reference is computed
here, in the test process, with the plain ``ProjectedGradientCapture`` (no deepspeed).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys

import pytest
import torch

from lorif_ray.math.blocks import GradientBlock
from lorif_ray.math.capture import ProjectedGradientCapture, dense_gradients, linear_dims, per_example_token_loss
from lorif_ray.math.factorize import factorize, initial_block
from lorif_ray.math.influence import inner
from tests.oracles import damped_inverse
from lorif_ray.math.projection import layer_projection
from lorif_ray.model.layers import select_layers
from lorif_ray.model.layers import conv1d_to_linear
from lorif_ray.model.tensor_parallel import divide_layers, layers_of_rank
from lorif_ray.store.schema import factor_columns
from tests.conftest import padded_batch
from tests.conftest import tiny_gpt2, tiny_llama

SEED, F, C, ITERS, TP = 5, 4, 2, 16, 2
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
TOL = 1e-10  # float64 throughout

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")




BATCHES = {"train": padded_batch([9, 5, 12, 7], [0, 2, 6, 1], seed=1), "query": padded_batch([6, 10], [3, 4], seed=2)}


def _factor_columns(blocks, names):
    out = {}
    for name in names:
        a, b = blocks[name]
        v0 = initial_block(SEED, name, b.shape[-1], C, torch.float64, "cpu")
        u_column, v_column = factor_columns(name)
        out[u_column], out[v_column] = factorize(a, b, v0, ITERS)
    return out


def _model(arch: str, weights: dict):
    """The tiny model of ``arch`` with the given weights (the same in every process, whatever its default dtype)."""
    model = MODELS[arch](dtype=torch.float64)
    model.load_state_dict(weights[arch])
    return model


def _worker(rank: int, port: int, out_dir: str) -> None:
    from lorif_ray.model import tensor_parallel as tpm

    os.environ.update(tpm.rank_environment(rank, TP, "127.0.0.1", port))
    torch.set_num_threads(1)
    tpm.init_distributed()
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, SubParamLinearLayer

    weights = torch.load(os.path.join(out_dir, "weights.pt"))
    saved = {}
    for arch in MODELS:
        tp = tpm.shard_model(_model(arch, weights), TP)
        projections = tp.projections(SEED, F, torch.float64)
        kinds = {n: [c.__name__ for c in (LinearLayer, LinearAllreduce, SubParamLinearLayer) if isinstance(m, c)]
                 for n, m in tp.layers.items()}
        head = tp.model.get_output_embeddings()
        blocks = {split: tp.capture(None, batch, projections) for split, batch in BATCHES.items()}
        costs = {n: p.d1 * p.d2 for n, p in projections.items()}
        mine = layers_of_rank(costs, tp.rank, tp.world_size)
        columns = {}
        for split in BATCHES:
            local = _factor_columns(blocks[split], mine)
            columns[split] = tpm.gather_columns({k: v.reshape(v.shape[0], -1) for k, v in local.items()}, tp.group)
        saved[arch] = {
            "kinds": kinds, "dims": tp.dims, "head": (type(head).__name__, getattr(head, "gather_output", None)),
            "layouts": {n: tpm.shard_layout(m).side for n, m in tp.layers.items()},
            "local_shapes": {n: tuple(m.weight.shape) for n, m in tp.layers.items()},
            "blocks": blocks, "columns": columns, "mine": mine,
        }
    # End to end as a rank process would: load a local checkpoint, shard, capture.
    tp = tpm.setup_rank(os.path.join(out_dir, "llama"), TP, dtype="float64")
    saved["setup_rank"] = tp.capture(None, BATCHES["train"], tp.projections(SEED, F, torch.float64))
    # Slice loading: a meta model sharded by AutoTP, each rank reading only its slices of the checkpoint.
    for arch in MODELS:
        if arch == "llama":
            tp = tpm.setup_rank(os.path.join(out_dir, arch), TP, dtype="float64", slice_loading=True)
            identity = None
        else:
            tp = tpm.load_sharded(os.path.join(out_dir, arch), TP, dtype="float64", identity=True)
            identity = tp.identity
        projections = tp.projections(SEED, F, torch.float64)
        saved[f"slice_{arch}"] = {
            "blocks": {split: tp.capture(None, batch, projections) for split, batch in BATCHES.items()},
            "weights": _compare_with_checkpoint(tp.model, weights[arch], arch), "identity": identity,
            "tied": tp.model.get_output_embeddings().weight is tp.model.get_input_embeddings().weight,
            "meta": [n for n, t in [*tp.model.named_parameters(), *tp.model.named_buffers()] if t.is_meta],
        }
    torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.barrier()


def _compare_with_checkpoint(model, state: dict, arch: str) -> dict:
    """{parameter: whether it equals its slice of the checkpoint tensor (Conv1D stored I×O)}."""
    from lorif_ray.model.tensor_parallel import weight_slice

    conv1d = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj") if arch == "gpt2" else ()
    out = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            key = "transformer.wte.weight" if name == "lm_head.weight" and arch == "gpt2" else name
            full = state[key]
            if param_name == "weight" and module_name.endswith(conv1d):
                full = full.t()
            spec = weight_slice(module, param_name)
            want = full if spec is None else full.index_select(spec[0], spec[1])
            out[name] = (spec is not None, tuple(param.shape) == tuple(want.shape) and torch.equal(param, want))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights():
    return {arch: make(dtype=torch.float64).state_dict() for arch, make in MODELS.items()}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, weights):
    """What each of the two ranks saved: [rank0, rank1]."""
    out = tmp_path_factory.mktemp("tp")
    torch.save(weights, out / "weights.pt")
    for arch in MODELS:
        _model(arch, weights).save_pretrained(out / arch)  # float64 safetensors
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=TP, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(TP)]


@pytest.fixture(scope="module")
def reference(weights):
    """TP=1: {arch: {"blocks": {split: blocks}, "columns": {split: factor columns}}}."""
    out = {}
    for arch in MODELS:
        model = _model(arch, weights)
        layers = select_layers(model)
        projections = {n: layer_projection(SEED, n, *linear_dims(m), F, dtype=torch.float64) for n, m in layers.items()}
        blocks = {}
        for split, batch in BATCHES.items():
            with ProjectedGradientCapture(model, layers, projections) as capture:
                per_example_token_loss(model, batch).sum().backward()
                blocks[split] = capture.pop()
        columns = {split: _factor_columns(blocks[split], list(layers)) for split in BATCHES}
        out[arch] = {"blocks": blocks, "columns": columns, "dims": {n: linear_dims(m) for n, m in layers.items()}}
    return out


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def _blocks_of(columns, dims, split):
    out = {}
    for name, (i, o) in dims.items():
        u, v = (columns[split][c] for c in factor_columns(name))
        n = u.shape[0]
        out[name] = GradientBlock(u=u.reshape(n, i // F, C), v=v.reshape(n, o // F, C))
    return out


def _scores(blocks, factor_blocks, damping=0.1):
    """GradDot from factors and from dense G̃, and LoGRA (exact per-layer inverse of GᵀG + λI), summed over layers."""
    graddot_factors = sum(inner(factor_blocks["query"][n], factor_blocks["train"][n]) for n in blocks["train"])
    graddot, logra = 0, 0
    for name in blocks["train"]:
        g = {s: GradientBlock(g=dense_gradients(*blocks[s][name]).reshape(len(blocks[s][name][0]), -1)) for s in blocks}
        graddot = graddot + inner(g["query"], g["train"])
        logra = logra + g["query"].g @ damped_inverse(g["train"].g.T @ g["train"].g, damping) @ g["train"].g.T
    return {"graddot_factors": graddot_factors, "graddot": graddot, "logra": logra}


@needs_deepspeed
@pytest.mark.parametrize("arch", list(MODELS))
def test_deepspeed_layer_classes(ranks, arch):
    saved = ranks[0][arch]
    expected = {
        "gpt2": {"attn.c_attn": ["SubParamLinearLayer"], "attn.c_proj": ["LinearAllreduce"],
                 "mlp.c_fc": ["LinearLayer"], "mlp.c_proj": ["LinearAllreduce"]},
        "llama": {"q_proj": ["LinearLayer"], "k_proj": ["LinearLayer"], "v_proj": ["LinearLayer"],
                  "o_proj": ["LinearAllreduce"], "gate_proj": ["LinearLayer"], "up_proj": ["LinearLayer"],
                  "down_proj": ["LinearAllreduce"]},
    }[arch]
    assert len(saved["kinds"]) == (8 if arch == "gpt2" else 14)
    for name, kinds in saved["kinds"].items():
        suffix = next(s for s in expected if name.endswith(s))
        assert kinds == expected[suffix], (name, kinds)
        side = "input" if "LinearAllreduce" in kinds else "output"
        assert saved["layouts"][name] == side
        i, o = saved["dims"][name]
        assert saved["local_shapes"][name] == ((o, i // TP) if side == "input" else (o // TP, i)), name
    assert saved["head"] == (("Linear", None) if arch == "gpt2" else ("LinearLayer", True))


@needs_deepspeed
@pytest.mark.parametrize("arch", list(MODELS))
def test_projected_gradients_match_tp1(ranks, reference, arch):
    ref = reference[arch]
    assert ranks[0][arch]["dims"] == ref["dims"]
    worst = 0.0
    for saved in ranks:
        for split, want in ref["blocks"].items():
            got = saved[arch]["blocks"][split]
            assert list(got) == list(want)
            for name, (a, b) in want.items():
                ga, gb = got[name]
                assert ga.shape == a.shape and gb.shape == b.shape
                errors = [_rel(ga, a), _rel(gb, b), _rel(dense_gradients(ga, gb), dense_gradients(a, b))]
                for i in range(a.shape[0]):  # per example
                    errors.append(_rel(dense_gradients(ga[i:i + 1], gb[i:i + 1]), dense_gradients(a[i:i + 1], b[i:i + 1])))
                worst = max(worst, *errors)
    print(f"{arch}: max relative error of A, B, G̃ (TP=2 vs TP=1): {worst:.2e}")
    assert worst <= TOL


@needs_deepspeed
@pytest.mark.parametrize("arch", list(MODELS))
def test_factors_and_scores_match_tp1(ranks, reference, arch):
    ref = reference[arch]
    assert ranks[1][arch]["columns"]["train"] is None  # gathered on rank 0 only
    columns = ranks[0][arch]["columns"]
    worst = 0.0
    for split, want in ref["columns"].items():
        assert set(columns[split]) == set(want)
        for key, value in want.items():
            worst = max(worst, _rel(columns[split][key], value.reshape(value.shape[0], -1)))
    print(f"{arch}: max relative error of factors: {worst:.2e}")
    assert worst <= TOL
    ref_factor_blocks = {s: {n: GradientBlock(*(ref["columns"][s][c] for c in factor_columns(n)))
                             for n in ref["dims"]} for s in BATCHES}
    got_factor_blocks = {s: _blocks_of(columns, ranks[0][arch]["dims"], s) for s in BATCHES}
    want = _scores(ref["blocks"], ref_factor_blocks)
    got = _scores(ranks[0][arch]["blocks"], got_factor_blocks)
    errors = {k: _rel(got[k], want[k]) for k in want}
    print(f"{arch}: max relative error of scores: {errors}")
    assert max(errors.values()) <= TOL


def test_divide_layers_covers_each_layer_once():
    costs = {f"l{i}": float(c) for i, c in enumerate([5, 1, 9, 3, 3, 7, 2, 8, 1])}
    for world in (1, 2, 3, 4, 12):
        parts = divide_layers(costs, world)
        assert len(parts) == world
        flat = [n for part in parts for n in part]
        assert sorted(flat) == sorted(costs) and len(flat) == len(set(flat))
        assert all(part == [n for n in costs if n in part] for part in parts)  # model order kept
        assert [layers_of_rank(costs, r, world) for r in range(world)] == parts
        loads = [sum(costs[n] for n in part) for part in parts]
        assert max(loads) - min(loads) <= max(costs.values())


@needs_deepspeed
def test_division_in_the_spawned_ranks_is_disjoint(ranks):
    for arch in MODELS:
        mine = [set(saved[arch]["mine"]) for saved in ranks]
        assert not mine[0] & mine[1] and mine[0] | mine[1] == set(ranks[0][arch]["dims"])


def test_conv1d_to_linear_is_exact():
    model = tiny_gpt2(dtype=torch.float64)
    batch = BATCHES["train"]
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        conv1d_to_linear(model)
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    assert linear_dims(model.transformer.h[0].attn.c_attn) == (32, 96)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_module_import_does_not_import_deepspeed():
    code = "import sys, lorif_ray.model.tensor_parallel; assert 'deepspeed' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


@needs_deepspeed
def test_setup_rank_end_to_end(ranks, reference):
    want = reference["llama"]["blocks"]["train"]
    for saved in ranks:
        got = saved["setup_rank"]
        assert list(got) == list(want)
        worst = max(max(_rel(got[n][0], a), _rel(got[n][1], b)) for n, (a, b) in want.items())
        assert worst <= TOL


@needs_deepspeed
@pytest.mark.parametrize("arch", list(MODELS))
def test_slice_loading_matches_full_loading_and_tp1(ranks, reference, arch):
    """Slice-loaded TP=2 (meta model, each rank reads its slices) = fully loaded TP=2 = TP=1."""
    worst_full, worst_ref = 0.0, 0.0
    for saved in ranks:
        got = saved[f"slice_{arch}"]["blocks"]
        for split, want in reference[arch]["blocks"].items():
            full = saved[arch]["blocks"][split]
            assert list(got[split]) == list(want)
            for name, (a, b) in want.items():
                ga, gb = got[split][name]
                for i in range(a.shape[0]):  # per example
                    worst_full = max(worst_full, _rel(ga[i], full[name][0][i]), _rel(gb[i], full[name][1][i]))
                    worst_ref = max(worst_ref, _rel(ga[i], a[i]), _rel(gb[i], b[i]))
    print(f"{arch}: slice-loaded TP=2 vs full TP=2: {worst_full:.2e}, vs TP=1: {worst_ref:.2e}")
    assert worst_full <= TOL and worst_ref <= TOL


@needs_deepspeed
@pytest.mark.parametrize("arch", list(MODELS))
def test_slice_loaded_weights_are_checkpoint_slices(ranks, arch):
    for saved in ranks:
        info = saved[f"slice_{arch}"]
        assert info["meta"] == []
        weights = info["weights"]
        assert weights and all(ok for _, ok in weights.values()), [n for n, (_, ok) in weights.items() if not ok]
        sharded = [n for n, (is_slice, _) in weights.items() if is_slice]
        assert len(sharded) >= (8 if arch == "gpt2" else 15)  # the block linears (+ the llama head)
    if arch == "gpt2":
        assert all(saved["slice_gpt2"]["tied"] for saved in ranks)  # lm_head is wte


def _loaded_identity(path, dtype):
    """model_identity of the model as ``load_model`` loads it (from_pretrained; no tokenizer needed here)."""
    from transformers import AutoModelForCausalLM

    from lorif_ray.model.loading import DTYPES, model_identity

    return model_identity(AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True).eval())


@needs_deepspeed
def test_checkpoint_identity_equals_loaded_model_identity(ranks, weights, tmp_path):
    """load_sharded(identity=True) reads the fingerprint's samples from the files: same as the loaded model's."""
    _model("gpt2", weights).save_pretrained(tmp_path)  # the checkpoint the ranks read
    want = _loaded_identity(tmp_path, "float64")
    assert ranks[0]["slice_gpt2"]["identity"] == want == ranks[1]["slice_gpt2"]["identity"]


def test_checkpoint_sampler_casts_like_loading(tmp_path):
    """The fingerprint of a float32 checkpoint loaded in bfloat16, computed from the files, is the loaded model's."""
    from lorif_ray.model.loading import checkpoint_sampler, model_identity
    from lorif_ray.model.tensor_parallel import meta_model

    for arch, make in MODELS.items():
        make(dtype=torch.float32).save_pretrained(tmp_path / arch)
        model = meta_model(tmp_path / arch, "bfloat16")
        got = model_identity(model, sample=checkpoint_sampler(tmp_path / arch, torch.bfloat16, model.base_model_prefix))
        assert got == _loaded_identity(tmp_path / arch, "bfloat16"), arch
        assert all(p.is_meta for p in model.parameters())
