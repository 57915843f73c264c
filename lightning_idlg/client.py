"""The client side of federated learning: what it computes and what it shares.

The client computes the cross-entropy gradient of the shared model on its private sample and sends it.
`SharedGradient` is exactly what leaves the client (model architecture and weights, which the server
already has, plus the gradient) and is therefore all the attack code ever receives. The private image
and label stay in `PrivateBatch`, used only by evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap


@dataclass(frozen=True)
class SharedGradient:
    """What the attacker sees for K independent trials (stacked along dim 0).

    model: the architecture (weights are taken from `weights`, not from this module).
    weights: name -> (K, *shape) victim parameters per trial (the server knows the model it sent).
    gradients: name -> (K, *shape) the shared gradient of each trial's client.
    input_shape: (C, H, W) of one input; num_classes: size of the label space.
    defense: name of the client-side defense applied to the gradient ("none" in the paper).
    """

    model: nn.Module
    weights: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    defense: str = "none"

    @property
    def trials(self) -> int:
        return next(iter(self.gradients.values())).shape[0]


@dataclass(frozen=True)
class PrivateBatch:
    """The client's private data for K trials: never passed to the attack, used to evaluate it."""

    images: torch.Tensor  # (K, C, H, W) in [0, 1]
    labels: torch.Tensor  # (K,)
    indices: list[int] = field(default_factory=list)  # trial indices in the experiment


def soft_cross_entropy(logits: torch.Tensor, label_probs: torch.Tensor) -> torch.Tensor:
    """-sum p * log_softmax(logits), averaged over the batch. Equal to cross-entropy for one-hot p.
    log_softmax (not log(softmax)) so that spread logits never give -inf and NaN."""
    return -(label_probs * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def sample_loss(model: nn.Module):
    """loss(weights, x, label_probs) of one sample under `model` with the given weights (functional)."""

    def loss(weights: dict[str, torch.Tensor], x: torch.Tensor, label_probs: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, weights, (x.unsqueeze(0),))
        return soft_cross_entropy(logits, label_probs.unsqueeze(0))

    return loss


def stack_victims(victims: list[nn.Module]) -> dict[str, torch.Tensor]:
    """name -> (K, *shape) parameters of K victim networks of one architecture."""
    weights, _ = stack_module_state(victims)
    return {name: w.detach() for name, w in weights.items()}


def share_gradient(model: nn.Module, weights: dict[str, torch.Tensor], private: PrivateBatch,
                   num_classes: int) -> SharedGradient:
    """Each trial's client computes the cross-entropy gradient on its one private sample."""
    one_hot = nn.functional.one_hot(private.labels, num_classes).to(private.images.dtype)
    per_trial_grad = vmap(grad(sample_loss(model)))(weights, private.images, one_hot)
    return SharedGradient(
        model=model,
        weights=weights,
        gradients={name: g.detach() for name, g in per_trial_grad.items()},
        input_shape=tuple(private.images.shape[1:]),
        num_classes=num_classes,
    )
