"""Captured projected per-example gradients equal explicitly projected autograd gradients (float64)."""

import pytest
import torch

from lorif_ray.errors import NoLossTokensError, NonFiniteGradientError
from lorif_ray.math.capture import ProjectedGradientCapture, check_finite, dense_gradients, linear_dims, per_example_token_loss
from lorif_ray.math.projection import layer_projection
from lorif_ray.model.layers import select_layers
from lorif_ray.store.schema import dense_column
from tests.conftest import padded_batch




def _reference(model, layers, projections, example):
    """Autograd weight gradient of one unpadded example, projected explicitly: P_inᵀ ∂L/∂W(I×O) P_out."""
    model.zero_grad()
    for p in model.parameters():
        p.requires_grad_(True)
    per_example_token_loss(model, example).sum().backward()
    out = {}
    for name, module in layers.items():
        grad = module.weight.grad
        grad_io = grad.T if isinstance(module, torch.nn.Linear) else grad  # Conv1D stores W as I×O
        out[name] = projections[name].p_in.T @ grad_io @ projections[name].p_out
    return out


def test_capture_matches_autograd_per_example(tiny_model):
    layers = select_layers(tiny_model)
    kinds = {type(m).__name__ for m in layers.values()}
    assert kinds == ({"Conv1D"} if "GPT2" in type(tiny_model).__name__ else {"Linear"})
    assert not any("lm_head" in n for n in layers)
    projections = {n: layer_projection(7, n, *linear_dims(m), 4, dtype=torch.float64) for n, m in layers.items()}
    lengths, prompts = [9, 5, 12], [0, 2, 6]
    batch = padded_batch(lengths, prompts)
    with ProjectedGradientCapture(tiny_model, layers, projections) as capture:
        per_example_token_loss(tiny_model, batch).sum().backward()
        blocks = capture.pop()
    assert all(not p.requires_grad or p.grad is None for p in tiny_model.parameters())
    for i, n in enumerate(lengths):
        example = {k: v[i:i + 1, :n] for k, v in batch.items()}
        expected = _reference(tiny_model, layers, projections, example)
        for name, (a, b) in blocks.items():
            got = dense_gradients(a[i:i + 1], b[i:i + 1])[0]
            err = (got - expected[name]).norm() / expected[name].norm()
            assert err <= 1e-10, (name, i, float(err))


def test_parameters_restored_and_hooks_removed():
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2()
    layers = select_layers(model)
    projections = {n: layer_projection(0, n, *linear_dims(m), 8, dtype=torch.float64) for n, m in layers.items()}
    with ProjectedGradientCapture(model, layers, projections):
        pass
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in layers.values())


def test_examples_without_loss_tokens_are_named():
    from tests.conftest import tiny_gpt2

    batch = padded_batch([6, 4], [0, 4])  # second example: every label masked
    with pytest.raises(NoLossTokensError, match=r"\['b'\]"):
        per_example_token_loss(tiny_gpt2(), batch, ids=["a", "b"])


def test_non_finite_gradients_are_named():
    g = torch.ones(3, 2, 2)
    g[1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"layer h.0.mlp .*\['y'\]"):
        check_finite(g, "h.0.mlp", ["x", "y", "z"])


def _margin(outputs, batch):
    """A user measurement: −Σ (target logit − the largest other logit) over target tokens, (B,)."""
    logits, labels = outputs.logits[:, :-1], batch["labels"][:, 1:]
    target = logits.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    others = logits.scatter(2, labels.clamp(min=0).unsqueeze(2), float("-inf")).max(dim=2).values
    return -((target - others) * (labels != -100)).sum(dim=1)


@pytest.mark.parametrize("measurement", ["loss", "logprob", "mean_loss", _margin])
def test_featurizer_captures_the_gradient_of_the_query_measurement(measurement):
    """The featurizer's per-example gradient of sign·m equals autograd's, in float64: m = the summed loss, the
    summed log-probability of the target tokens (sign −1: its scores equal the loss's), the mean loss, or a
    user function (sign +1)."""
    from lorif_ray.math.capture import measurement_function, summed_logprob
    from lorif_ray.stages.featurize import Featurizer
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2()
    layers = select_layers(model)
    featurizer = Featurizer(model, layers, kind="dense", f=4, c=1, seed=5, compute_dtype=torch.float64,
                            measurement=measurement)
    lengths, prompts = [9, 5, 12], [0, 2, 6]
    batch = padded_batch(lengths, prompts)
    columns = featurizer(["a", "b", "c"], batch)
    function, sign = measurement_function(measurement)
    for i, n in enumerate(lengths):
        example = {k: v[i:i + 1, :n] for k, v in batch.items()}
        model.zero_grad()
        for p in model.parameters():
            p.requires_grad_(True)
        outputs = model(input_ids=example["input_ids"], attention_mask=example["attention_mask"])
        (sign * function(outputs, example)).sum().backward()
        for name, module in layers.items():
            grad = module.weight.grad  # Conv1D: I×O
            expected = featurizer.projections[name].p_in.T @ grad @ featurizer.projections[name].p_out
            got = columns[dense_column(name)][i].reshape(expected.shape)
            assert (got - expected).norm() <= 1e-10 * expected.norm(), (name, i)
    if measurement == "logprob":  # sign convention: logprob's query gradient is the loss's
        assert summed_logprob(model(input_ids=batch["input_ids"]), batch).shape == (3,)
        loss = Featurizer(model, layers, kind="dense", f=4, c=1, seed=5, compute_dtype=torch.float64)(["a", "b", "c"], batch)
        assert all(torch.allclose(loss[k], columns[k], rtol=0, atol=1e-12) for k in loss)


def test_measurement_errors():
    from lorif_ray.stages.featurize import Featurizer
    from tests.conftest import tiny_gpt2

    model = tiny_gpt2()
    with pytest.raises(ValueError, match="measurement='margin'"):
        Featurizer(model, select_layers(model), kind="dense", f=4, c=1, seed=0, measurement="margin")
    featurizer = Featurizer(model, select_layers(model), kind="dense", f=4, c=1, seed=0, compute_dtype=torch.float64,
                            measurement=lambda outputs, batch: outputs.logits.sum(dim=2))
    with pytest.raises(ValueError, match=r"returned shape \(2, 6\); expected one scalar per example \(2,\)"):
        featurizer(["a", "b"], padded_batch([6, 4], [0, 1]))
