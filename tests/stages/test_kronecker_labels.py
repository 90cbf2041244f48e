"""kfac_labels=sampled: stage 1's K-FAC statistics from labels drawn from the model (the true Fisher) — they equal
an explicit recomputation, are deterministic, leave the stored rows alone, are recorded in the index, and Ray
gives the one-process statistics."""

from dataclasses import replace

import pytest
import torch

from lorif_ray.config import ClusterConfig
from lorif_ray.errors import ConfigError, IndexMismatchError
from lorif_ray.math.capture import ProjectedGradientCapture, per_example_token_loss, sampled_labels
from lorif_ray.model.layers import select_layers
from lorif_ray.stages.featurize import Featurizer
from lorif_ray.stages.index import run_index
from lorif_ray.eval.index_cache import index_key
from lorif_ray.store import IndexFolder
from tests.conftest import padded_batch, tiny_gpt2
from tests.stages.helpers import index_columns, make_config

IDS = ["a", "b", "c"]


def _featurizer(model, labels: str) -> Featurizer:
    return Featurizer(model, select_layers(model), kind="dense", f=4, c=1, seed=5, compute_dtype=torch.float64,
                      statistics=True, statistics_labels=labels)


def test_sampled_labels_keep_the_loss_positions_and_depend_only_on_seed_and_id():
    torch.manual_seed(0)
    logits = torch.randn(3, 8, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 8))
    labels[0, :3] = -100  # a prompt
    labels[2, 6:] = -100  # padding
    drawn = sampled_labels(logits, labels, IDS, seed=0)
    assert torch.equal(drawn[:, 1:] == -100, labels[:, 1:] == -100) and int(drawn.max()) < 11  # position 0 has none
    assert torch.equal(drawn, sampled_labels(logits, labels, IDS, seed=0))
    assert not torch.equal(drawn, sampled_labels(logits, labels, IDS, seed=1))
    alone = sampled_labels(logits[1:2], labels[1:2], ["b"], seed=0)  # another batch: the same draws for "b"
    assert torch.equal(alone[0], drawn[1])
    peaked = sampled_labels(logits * 1e6, labels, IDS, seed=0)  # a point mass: the argmax
    keep = labels[:, 1:] != -100
    assert torch.equal(peaked[:, 1:][keep], logits[:, :-1].argmax(-1)[keep])


def test_sampled_labels_follow_the_predictive_distribution():
    probs = torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64)
    logits = probs.log().expand(1, 2001, 3)
    labels = torch.zeros(1, 2001, dtype=torch.long)
    drawn = sampled_labels(logits, labels, ["x"], seed=3)[0, 1:]
    frequencies = torch.bincount(drawn, minlength=3).double() / drawn.numel()
    assert float((frequencies - probs).abs().max()) < 0.04  # 4 s.d. of a binomial at n = 2000


def test_sampled_statistics_equal_an_explicit_recomputation_and_leave_the_rows_alone():
    """float64: S̃ = Σ_tokens δ̃δ̃ᵀ of the summed loss on sampled_labels of the model's own logits (to 1e-6 rel.),
    Ã is the training pass's, S̃ differs from the training labels' S̃, and the returned pairs (the stored rows) are
    the training loss's."""
    model = tiny_gpt2().double()
    batch = padded_batch([9, 5, 12], [0, 2, 6])
    training, sampled = _featurizer(model, "training"), _featurizer(model, "sampled")
    rows, sampled_rows = training(IDS, batch), sampled(IDS, batch)
    assert all(torch.equal(rows[k], sampled_rows[k]) for k in rows)
    ours, theirs = sampled.statistics.pop(), training.statistics.pop()

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = sampled_labels(logits, batch["labels"], IDS, seed=5)
    assert not torch.equal(labels, batch["labels"])
    with ProjectedGradientCapture(model, sampled.layers, sampled.projections) as capture:
        per_example_token_loss(model, {**batch, "labels": labels}).sum().backward()
        captured = capture.pop()
    keep = batch["attention_mask"].bool()
    for name, (x, delta) in captured.items():
        x, delta = x[keep], delta[keep]
        for value, expected in ((ours[name].gradients, delta.T @ delta), (ours[name].activations, x.T @ x)):
            assert float((value - expected).norm()) <= 1e-6 * float(expected.norm()), name
        torch.testing.assert_close(ours[name].activations, theirs[name].activations, rtol=1e-12, atol=0)
        gap = float((ours[name].gradients - theirs[name].gradients).norm())
        assert gap > 1e-3 * float(theirs[name].gradients.norm()), name
        assert (ours[name].tokens, ours[name].examples) == (theirs[name].tokens, theirs[name].examples)


def test_unknown_labels_are_refused():
    with pytest.raises(ValueError, match="statistics_labels='model'"):
        _featurizer(tiny_gpt2(), "model")


@pytest.fixture(scope="module")
def sampled_index(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("kfac_labels")
    cfg = make_config(tiny_assets, root / "sampled", method="logra", shard_size=16, kfac_labels="sampled",
                      cluster=ClusterConfig(backend="none"))
    run_index(cfg)
    return cfg, root


def test_the_index_records_its_labels_and_is_deterministic(sampled_index, tiny_assets):
    cfg, root = sampled_index
    again = replace(cfg, output_dir=str(root / "again"))
    training = replace(cfg, output_dir=str(root / "training"), kfac_labels="training")
    run_index(again)
    run_index(training)
    assert IndexFolder(cfg.index_path).manifest().meta["kfac_labels"] == "sampled"
    assert IndexFolder(training.index_path).settings.kfac_labels == "training"
    assert "kfac_labels" not in IndexFolder(training.index_path).manifest().meta  # absent = training: older indexes
    assert index_columns(cfg.index_path).keys() == index_columns(training.index_path).keys()
    for name, column in index_columns(training.index_path).items():  # the stored rows do not change
        torch.testing.assert_close(index_columns(cfg.index_path)[name], column, rtol=0, atol=0)
    (ours, _), (repeat, _), (theirs, _) = (IndexFolder(c.index_path).folded_statistics()
                                           for c in (cfg, again, training))
    for name, stats in ours.items():
        assert torch.equal(stats["gradients"], repeat[name]["gradients"])
        assert not torch.allclose(stats["gradients"], theirs[name]["gradients"], rtol=1e-3)
    with pytest.raises(IndexMismatchError, match="kfac_labels"):  # resuming with the other labels is refused
        run_index(replace(training, index_dir=str(cfg.index_path)))
    identity, data = {"sha": "x"}, "y"
    assert index_key(cfg, identity, data) != index_key(training, identity, data)
    assert "kfac_labels" not in index_key(training, identity, data)
    with pytest.raises(ConfigError, match="kfac_labels"):
        replace(cfg, kfac_labels="model")


def test_ray_gives_the_one_process_sampled_statistics(sampled_index, tiny_assets, ray_cluster):
    from lorif_ray.distributed.featurize import RayFeaturize
    from tests.distributed.test_distributed_index import _assert_same_index

    cfg, root = sampled_index
    ray_cfg = replace(cfg, output_dir=str(root / "ray"),
                      cluster=ClusterConfig(backend="ray", gradient_actors=2, writer_actors=1))
    run_index(ray_cfg, RayFeaturize)
    assert IndexFolder(ray_cfg.index_path).manifest().meta["kfac_labels"] == "sampled"
    _assert_same_index(ray_cfg.index_path, cfg.index_path)
