"""Captured projected per-example gradients equal explicitly projected autograd gradients (float64)."""

import pytest
import torch

from lorif_ray.errors import NoLossTokensError, NonFiniteGradientError
from lorif_ray.math.capture import ProjectedGradientCapture, check_finite, dense_gradients, linear_dims, per_example_token_loss
from lorif_ray.math.projection import layer_projection
from lorif_ray.model.layers import select_layers
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
