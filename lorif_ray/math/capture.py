"""Per-example projected gradients of linear layers, captured with hooks.

For a layer y = x Wᵀ (``nn.Linear``, W: O×I) or y = x W (transformers' GPT-2 ``Conv1D``, W: I×O),
the weight gradient of example i is δY_iᵀ X_i summed over its tokens. We never form it: a forward
hook keeps A_i = X_i P_in (T×d1) and a hook on the output tensor keeps B_i = δY_i P_out (T×d2), so
the projected gradient is G̃_i = A_iᵀ B_i (d1×d2).

δY is the gradient of each example's *summed* token loss (never a batch mean), so examples in one
batch do not scale each other; queries may be featurized with another per-example measurement
(``MEASUREMENTS``: the log-probability of the target tokens, the mean loss, or a user function). Right padding never contributes: a padded position has no loss and,
under causal attention, feeds no other position, so its δY is exactly zero.

While the capture is active every parameter is frozen, so backward computes activation gradients
only (no weight gradients are ever allocated); hooked outputs are made to require grad.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorif_ray.errors import NoLossTokensError, NonFiniteGradientError
from lorif_ray.math.projection import LayerProjection


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(I, O) of an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored I×O)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        in_features, out_features = module.weight.shape
        return in_features, out_features
    raise TypeError(f"{type(module).__name__} is not a supported linear layer (nn.Linear or Conv1D)")


class ProjectedGradientCapture:
    """Hooks that record A = X P_in and B = δY P_out for the given layers.

    Use as a context manager around one forward + backward; then ``pop()`` returns
    ``{name: (A (B, T, d1), B (B, T, d2))}``.

    Example:
        >>> with ProjectedGradientCapture(model, modules, projections) as capture:
        ...     per_example_token_loss(model, batch).sum().backward()
        ...     blocks = capture.pop()
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], projections: dict[str, LayerProjection]):
        missing = set(modules) - set(projections)
        if missing:
            raise KeyError(f"no projection for layers {sorted(missing)}")
        self.model = model
        self.modules = modules
        self.projections = projections
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._frozen: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> "ProjectedGradientCapture":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._forward_hook(name)))
        self._frozen = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._frozen:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._handles, self._frozen = [], []
        self._inputs.clear()
        self._outputs.clear()

    def project_input(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """A = X P_in: (B, T, I) → (B, T, d1). Subclasses (tensor parallel) project their input slice."""
        p_in = self.projections[name].p_in
        with torch.autocast(x.device.type, enabled=False):  # the projection's own dtype, even under autocast
            return x.to(p_in.dtype) @ p_in

    def project_output(self, name: str, grad_output: torch.Tensor) -> torch.Tensor:
        """B = δY P_out: (B, T, O) → (B, T, d2). Subclasses (tensor parallel) project their output slice."""
        p_out = self.projections[name].p_out
        with torch.autocast(grad_output.device.type, enabled=False):
            return grad_output.to(p_out.dtype) @ p_out

    def finalize(self, blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Hook for subclasses to combine partial blocks (e.g. an all-reduce across ranks) in ``pop``."""
        return blocks

    def _forward_hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled():
                return None
            if name in self._inputs:
                raise RuntimeError(f"layer {name} ran twice in one forward pass; shared layers are not supported")
            self._inputs[name] = self.project_input(name, inputs[0].detach())  # (B, T, d1)
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)

            def grad_hook(grad_output):
                self._outputs[name] = self.project_output(name, grad_output)  # (B, T, d2)

            output.register_hook(grad_hook)
            return output

        return hook

    def pop(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The (A, B) pairs of the last forward+backward, and reset."""
        missing = [n for n in self.modules if n not in self._inputs or n not in self._outputs]
        if missing:
            raise RuntimeError(f"layers {missing[:5]} saw no forward or no backward pass (not on the loss path?)")
        blocks = {n: (self._inputs[n], self._outputs[n]) for n in self.modules}
        self._inputs.clear()
        self._outputs.clear()
        return self.finalize(blocks)


def per_example_token_loss(model: nn.Module, batch: dict[str, torch.Tensor], ids: list[str] | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy of each example: (B,).

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T); labels are aligned with
            input_ids (Hugging Face convention) and -100 marks tokens without loss.
        ids: example ids, used only to name examples without loss tokens.
    """
    return per_example_measurement(model, batch, ids, "loss")


def token_losses(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy of every predicted position, 0 where the label is -100: (B, T-1)."""
    logits = outputs.logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # the loss in full precision, whatever the model's dtype
    labels = batch["labels"][:, 1:].to(logits.device)
    return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T-1)


def summed_loss(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_t −log p(y_t) over the example's loss tokens: (B,). What training examples are always featurized with."""
    return token_losses(outputs, batch).sum(dim=1)


def summed_logprob(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_t log p(y_t) over the target (loss) tokens: (B,) = −summed_loss."""
    return -token_losses(outputs, batch).sum(dim=1)


def mean_loss(outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """summed_loss / the number of target tokens: (B,)."""
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1).to(outputs.logits.device)
    return token_losses(outputs, batch).sum(dim=1) / counts


def sampled_labels(logits: torch.Tensor, labels: torch.Tensor, ids: list[str], seed: int) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution at the loss positions (the true Fisher's).

    Args:
        logits: (B, T, V) of a forward pass; ``logits[:, t]`` predicts the token at t + 1.
        labels: (B, T) training labels, Hugging Face aligned; -100 marks tokens without loss.
        ids: example ids: example i's draws come from a CPU generator seeded by (seed, ids[i]), so they do
            not depend on the batch it is in, the device or the process (Ray actors, TP ranks).
        seed: the run's seed.

    Returns:
        (B, T): y_t ~ softmax(logits[:, t-1]) where ``labels`` has a target, -100 elsewhere (inverse-CDF
        sampling in float64 from one uniform per position).
    """
    n, length = labels.shape
    uniforms = torch.stack([
        torch.rand(length - 1, generator=torch.Generator().manual_seed(_label_seed(seed, i)), dtype=torch.float64)
        for i in ids]).to(logits.device)  # (B, T-1)
    keep = labels[:, 1:].to(logits.device) != -100  # (B, T-1)
    cdf = torch.softmax(logits[:, :-1].detach()[keep].to(torch.float64), dim=-1).cumsum(dim=-1)  # (n_tok, V)
    draws = torch.searchsorted(cdf, (uniforms[keep] * cdf[:, -1]).unsqueeze(1)).squeeze(1).clamp_max(cdf.shape[1] - 1)
    out = torch.full((n, length), -100, dtype=torch.long, device=logits.device)
    out[:, 1:][keep] = draws
    return out.to(labels.device)


def _label_seed(seed: int, example_id: str) -> int:
    digest = hashlib.sha256(f"kfac_labels:{seed}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


Measurement = Callable[[object, dict[str, torch.Tensor]], torch.Tensor]
"""``(model outputs, batch) → (B,)`` per-example scalar whose gradient a query is featurized with."""

# name → (function, sign). The featurizer backpropagates sign · m, so that a positive score always means a
# proponent: up-weighting t by ε changes the query's m by about −sign·ε·score, i.e. lowers a loss or
# raises a log-probability. logprob's gradient is minus the loss gradient and its sign is −1, so its
# scores equal the summed loss's.
MEASUREMENTS: dict[str, tuple[Measurement, float]] = {
    "loss": (summed_loss, 1.0), "logprob": (summed_logprob, -1.0), "mean_loss": (mean_loss, 1.0)}


def measurement_function(measurement: str | Measurement) -> tuple[Measurement, float]:
    """(function, sign) of a measurement name in ``MEASUREMENTS``, or (a user function, +1): a user function is
    something to *lower* (like a loss); positive scores mean training on t lowers it."""
    if callable(measurement):
        return measurement, 1.0
    if measurement not in MEASUREMENTS:
        raise ValueError(f"measurement={measurement!r}: choose one of {tuple(MEASUREMENTS)} or pass a function")
    return MEASUREMENTS[measurement]


def per_example_measurement(model: nn.Module, batch: dict[str, torch.Tensor], ids: list[str] | None = None,
                            measurement: str | Measurement = "loss") -> torch.Tensor:
    """sign · m of each example, (B,), for a measurement name or function (``measurement_function``).

    Args:
        batch: ``input_ids``, ``attention_mask``, ``labels`` (B, T); -100 marks tokens without loss.
        ids: example ids, used only to name examples without loss tokens.

    Raises:
        NoLossTokensError: an example has no target token (all labels -100).
        ValueError: a user function returned another shape than (B,).
    """
    function, sign = measurement_function(measurement)
    labels = batch["labels"][:, 1:]
    counts = (labels != -100).sum(dim=1)
    if bool((counts == 0).any()):
        bad = [ids[i] if ids else str(i) for i in torch.nonzero(counts == 0).flatten().tolist()]
        raise NoLossTokensError(f"examples without loss tokens (all labels -100): {bad[:10]}")
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    values = function(outputs, batch)
    if values.shape != (batch["input_ids"].shape[0],):
        raise ValueError(f"measurement {getattr(function, '__name__', function)!r} returned shape "
                         f"{tuple(values.shape)}; expected one scalar per example ({batch['input_ids'].shape[0]},)")
    return sign * values if sign != 1.0 else values


def dense_gradients(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """G̃ = Aᵀ B per example: (B, T, d1), (B, T, d2) → (B, d1, d2)."""
    return torch.bmm(a.transpose(1, 2), b)


def check_finite(tensor: torch.Tensor, layer: str, ids: list[str]) -> None:
    """Raise NonFiniteGradientError naming the layer and examples if ``tensor`` (B, ...) has NaN/Inf."""
    check_finite_all([(layer, nonfinite_rows(tensor))], ids)


def nonfinite_rows(tensor: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows of ``tensor`` (B, ...) holding NaN/Inf (no host sync)."""
    return ~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)


def check_finite_all(masks: list[tuple[str, torch.Tensor]], ids: list[str]) -> None:
    """``check_finite`` for many tensors with one host sync.

    Args:
        masks: [(layer, nonfinite_rows(tensor))] in the order ``check_finite`` would have checked them.

    Raises:
        NonFiniteGradientError: the same error ``check_finite`` raises for the first bad tensor.
    """
    if not masks or not bool(torch.stack([m for _, m in masks]).any()):
        return
    for layer, bad in masks:
        if bool(bad.any()):
            names = [ids[i] for i in torch.nonzero(bad).flatten().tolist()]
            raise NonFiniteGradientError(f"NaN/Inf gradient in layer {layer} for examples {names[:10]} "
                                         f"({len(names)} in all)")
