"""Shared fixtures: tiny models built in code (no hub), in float64 for the math tests."""

from __future__ import annotations

import pytest
import torch


def tiny_gpt2(vocab_size: int = 61, seed: int = 0, dtype=torch.float64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(vocab_size: int = 61, seed: int = 0, dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).to(dtype).eval()


def padded_batch(lengths, prompt_lengths, vocab=61, seed=0):
    """Right-padded batch of random tokens; labels -100 on prompt tokens and padding."""
    gen = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), t), generator=gen)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    labels = ids.clone()
    for i, (n, p) in enumerate(zip(lengths, prompt_lengths)):
        mask[i, :n] = 1
        ids[i, n:] = 0
        labels[i, n:] = -100
        labels[i, :p] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request):
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]()


WORDS = "the cat dog sat on mat a red blue big small ran fast slow tree house river stone old green".split()


def write_tiny_model_dir(directory, arch: str = "gpt2", n_train: int = 48, n_queries: int = 6, seed: int = 0) -> dict:
    """A random tiny causal LM saved as a local Hugging Face dir, with train/queries jsonl files."""
    import json
    import random

    from lorif_ray.embedded.tokenizer import build_tokenizer

    rng = random.Random(seed)
    sentence = lambda lo, hi: " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    train = [{"id": f"t{i}", "text": sentence(3, 12)} for i in range(n_train)]
    queries = [{"id": f"q{i}", "prompt": sentence(2, 4), "response": " " + sentence(1, 3)} for i in range(n_queries)]
    tokenizer = build_tokenizer(WORDS)
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)(vocab_size=len(tokenizer), seed=seed, dtype=torch.float32)
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    for name, rows in (("train", train), ("queries", queries)):
        (directory / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"model": directory / "model", "train": directory / "train.jsonl", "queries": directory / "queries.jsonl"}


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


SHARD_SIZE = 10  # 48 examples → 5 shards, split 3 + 2 between two workers
QUERY_CONFIG = dict(full_scores=True, top_k=5, train_batch_rows=7)  # batches never align with shards


@pytest.fixture(scope="session")
def baseline(tiny_assets, tmp_path_factory):

    """Index + curvature + query of the tiny model, all in one process.

    r = 64 + oversample 10 exceeds D = 64 of the attention output projection (exact eigh path) and
    not D = 192 / 256 of the other layers (randomized path), so both paths are compared.
    """
    import shutil

    from lorif_ray.config import ClusterConfig, QueryConfig
    from lorif_ray.stages.curvature import run_curvature
    from lorif_ray.stages.index import run_index
    from lorif_ray.outputs.folders import claim_output_dir
    from lorif_ray.stages.query import run_query
    from tests.stages.helpers import make_config
    root = tmp_path_factory.mktemp("dist")
    cfg = make_config(tiny_assets, root / "one", shard_size=SHARD_SIZE, query=QueryConfig(**QUERY_CONFIG),
                      cluster=ClusterConfig(backend="none"))
    claim_output_dir(cfg)  # this tool's folder, as the jobs make it (jobs/serve.py writes into it)
    run_index(cfg)
    run_curvature(cfg)
    run_query(cfg)

    def config(name: str, with_curvature: bool = False, **overrides):
        """A config on the same index, writing to its own output dir (optionally with the baseline curvature)."""
        overrides.setdefault("query", QueryConfig(**QUERY_CONFIG))
        other = make_config(tiny_assets, root / name, shard_size=SHARD_SIZE, index_dir=str(cfg.index_path),
                            **overrides)
        if with_curvature:
            shutil.copytree(cfg.curvature_path, other.curvature_path, dirs_exist_ok=True)
        return other

    return {"cfg": cfg, "config": config, "root": root}


@pytest.fixture(scope="session")
def ray_cluster():
    """A small local Ray cluster for the session: 2 CPUs, like the CI machine."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def recording_bars(monkeypatch):
    """Every progress bar the code makes in the test (``lorif_ray.progress.progress_bar``), by description: real
    tqdm bars writing to a string, each with the list of its ``update`` calls (``bar.updates``) and the largest
    count it showed (``bar.peak``); ``bar.enabled`` says whether it was made to draw (tqdm disables a bar it closes)."""
    import io

    import lorif_ray.progress as progress

    made: dict = {}

    class RecordingBar(progress.tqdm):
        def __init__(self, *args, **kwargs):
            self.updates, self.peak, self.enabled = [], 0, not kwargs.get("disable")
            super().__init__(*args, file=io.StringIO(), **kwargs)
            made.setdefault(kwargs.get("desc"), []).append(self)

        def update(self, n=1):
            self.updates.append(n)
            shown = super().update(n)
            self.peak = max(self.peak, self.n)
            return shown

    monkeypatch.setattr(progress, "Bar", RecordingBar)
    return made
def write_hub_cache(cache_dir, repo_id: str, model_dir, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """A pre-filled Hugging Face Hub cache holding ``model_dir``'s files as ``repo_id``, in the layout that
    huggingface_hub writes: ``models--<org>--<name>/blobs/<hash>`` (the bytes), ``snapshots/<revision>/<file>``
    (relative links to the blobs) and ``refs/main`` (the revision). Returns the snapshot folder."""
    import hashlib
    import os
    from pathlib import Path

    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(model_dir).iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
