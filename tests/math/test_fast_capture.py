"""Stage-1 fast-path pieces: hooks without host syncs, one finite-check sync per batch, autocast forward
with projections kept in their own dtype."""

from contextlib import contextmanager

import pytest
import torch

from lorif_ray.errors import NonFiniteGradientError
from lorif_ray.math.capture import ProjectedGradientCapture, check_finite, check_finite_all, nonfinite_rows
from lorif_ray.model.layers import select_layers
from lorif_ray.stages.featurize import Featurizer, blocks_from_columns
from lorif_ray.store.schema import factor_columns
from tests.conftest import padded_batch, tiny_gpt2


def _featurizer(model, **kw):
    return Featurizer(model, select_layers(model, None), kind="factors", f=2, c=2, seed=0,
                      compute_dtype=kw.pop("compute_dtype", torch.float64), **kw)


@contextmanager
def _no_host_sync():
    """Tensor → Python conversions raise while active."""
    def refuse(*_):
        raise AssertionError("host sync inside a capture hook")
    saved = {a: getattr(torch.Tensor, a) for a in SYNCS}
    for attr in SYNCS:
        setattr(torch.Tensor, attr, refuse)
    try:
        yield
    finally:
        for attr, fn in saved.items():
            setattr(torch.Tensor, attr, fn)


SYNCS = ("__bool__", "item", "tolist", "numpy", "cpu")


class GuardedCapture(ProjectedGradientCapture):
    """The capture with every hook body run under ``_no_host_sync`` (the model itself may sync)."""

    calls = 0

    def _forward_hook(self, name):
        hook = super()._forward_hook(name)

        def guarded(*args):
            with _no_host_sync():
                GuardedCapture.calls += 1
                return hook(*args)
        return guarded

    def project_output(self, name, grad_output):
        with _no_host_sync():
            GuardedCapture.calls += 1
            return super().project_output(name, grad_output)


def test_hooks_do_no_host_sync():
    model = tiny_gpt2()
    feat = _featurizer(model, capture_factory=GuardedCapture)
    captured = feat.capture(["a", "b"], padded_batch([9, 7], [2, 3]))
    assert len(captured) == len(feat.layers) and GuardedCapture.calls == 2 * len(feat.layers)


def test_one_sync_check_names_the_same_layer_and_examples():
    good, bad = torch.ones(3, 4), torch.ones(3, 4)
    bad[1, 2] = float("nan")
    masks = [("l0", nonfinite_rows(good)), ("l1", nonfinite_rows(bad)), ("l2", nonfinite_rows(bad * 0 + 1))]
    with pytest.raises(NonFiniteGradientError) as one:
        check_finite_all(masks, ["x", "y", "z"])
    with pytest.raises(NonFiniteGradientError) as reference:
        check_finite(bad, "l1", ["x", "y", "z"])
    assert str(one.value) == str(reference.value)
    check_finite_all(masks[:1], ["x", "y", "z"])


def test_autocast_forward_keeps_float32_projections_and_close_factors():
    model = tiny_gpt2(dtype=torch.float32)
    batch = padded_batch([12, 9, 5], [2, 3, 1])
    ids = ["a", "b", "c"]
    exact = _featurizer(model, compute_dtype=torch.float32)
    fast = _featurizer(model, compute_dtype=torch.float32, autocast_dtype=torch.bfloat16)
    captured = fast.capture(ids, batch)
    assert all(a.dtype == b.dtype == torch.float32 for a, b in captured.values())
    ref, got = exact(ids, batch), fast(ids, batch)
    dense = lambda cols: blocks_from_columns(exact.specs, "factors", cols)  # noqa: E731
    for layer, want in dense(ref).items():  # compare the rank-c gradients u vᵀ, not the factors (sign/rotation free)
        err = (dense(got)[layer].dense() - want.dense()).norm() / want.dense().norm()
        assert err < 0.1, (layer, float(err))


def test_bf16_projection_dtype_is_used_in_the_hooks():
    model = tiny_gpt2(dtype=torch.float32)
    feat = _featurizer(model, compute_dtype=torch.float32, projection_dtype=torch.bfloat16)
    captured = feat.capture(["a", "b"], padded_batch([8, 6], [1, 2]))
    assert all(a.dtype == b.dtype == torch.bfloat16 for a, b in captured.values())
    assert feat(["a", "b"], padded_batch([8, 6], [1, 2]))[factor_columns(feat.specs[0].name)[0]].dtype == torch.float32


@contextmanager
def _count_host_syncs():
    """Counts Tensor → Python conversions (the host waiting for the device) while active."""
    counts = {"n": 0}
    saved = {a: getattr(torch.Tensor, a) for a in SYNCS}

    def counting(fn):
        def wrapped(*args, **kwargs):
            counts["n"] += 1
            return fn(*args, **kwargs)
        return wrapped
    for attr, fn in saved.items():
        setattr(torch.Tensor, attr, counting(fn))
    try:
        yield counts
    finally:
        for attr, fn in saved.items():
            setattr(torch.Tensor, attr, fn)


def test_stage_one_syncs_once_per_shard_not_per_batch():
    """featurize_chunk adds a fixed number of host syncs per shard (the joint NaN check and the copies),
    whatever its number of batches; only the model's own forward may sync per batch."""
    from lorif_ray.data import TokenizedExample, collate
    from lorif_ray.math.capture import per_example_token_loss
    from lorif_ray.stages.index import featurize_chunk

    model = tiny_gpt2(dtype=torch.float32)
    feat = _featurizer(model, compute_dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 61, (6, 7), generator=gen).tolist()
    chunk = [TokenizedExample(f"e{i}", row, row) for i, row in enumerate(tokens)]
    with _count_host_syncs() as plain:
        for p in model.parameters():
            p.requires_grad_(True)
        per_example_token_loss(model, collate(chunk[:2], 0)).sum().backward()
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
    syncs = {}
    for batches in (1, 3):
        with _count_host_syncs() as counts:
            ids, columns = featurize_chunk(feat, chunk, batch_size=6 // batches, pad_token_id=0)
        assert ids == [e.id for e in chunk] and all(v.shape[0] == 6 for v in columns.values())
        syncs[batches] = counts["n"]
    assert syncs[3] - syncs[1] == 2 * plain["n"], (syncs, plain)


def test_a_tensor_parallel_rank_checks_every_layer_but_factorizes_its_own():
    """A rank's share of featurize_chunk (distributed.featurize._RankShare): the columns of its layers
    equal the whole featurizer's, and its NaN/Inf check covers every layer, also those other ranks
    factorize (so every rank raises alike and none waits in the gather)."""
    from lorif_ray.data import TokenizedExample, collate
    from lorif_ray.distributed.featurize import _RankShare
    from lorif_ray.stages.featurize import ColumnMaker
    from lorif_ray.stages.index import featurize_chunk

    model = tiny_gpt2()
    feat = _featurizer(model)
    mine = feat.specs[: len(feat.specs) // 2]
    share = _RankShare(feat, ColumnMaker(mine, kind="factors", seed=0, iterations=feat.iterations,
                                         compute_dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    chunk = [TokenizedExample(f"e{i}", row, row) for i, row in enumerate(torch.randint(1, 61, (5, 6), generator=gen).tolist())]
    ids, columns = featurize_chunk(share, chunk, batch_size=2, pad_token_id=0)
    _, everything = featurize_chunk(feat, chunk, batch_size=2, pad_token_id=0)
    assert set(columns) == {c for s in mine for c in factor_columns(s.name)}
    assert all(torch.equal(columns[k], everything[k]) for k in columns)
    _, masks = share.unchecked(ids[:2], collate(chunk[:2], 0))  # NaN/Inf rows of A and B, per layer
    assert sorted({name for name, _ in masks}) == sorted(s.name for s in feat.specs)
    assert len(masks) == 2 * len(feat.specs)
