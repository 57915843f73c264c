"""The gradient-matching objective D (DLG eq. 4): the plain sum, over every parameter tensor, of squared
differences between the dummy's gradient and the shared gradient. No normalization (the paper's)."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import grad, vmap

from lightning_idlg.client import sample_loss


def gradient_distance(dummy_grads: dict[str, torch.Tensor], shared_grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """D = sum_l ||dummy_grad_l - shared_grad_l||^2 over all parameter tensors (one trial)."""
    return sum(((dummy_grads[name] - shared_grads[name]) ** 2).sum() for name in shared_grads)


def batched_distance(model: nn.Module):
    """D for K trials at once: (weights, shared_grads, dummy x', dummy label probs) -> (K,).

    Each trial has its own victim weights (vmap over functional_call); the dummy's gradient is taken with
    torch.func.grad, and the result stays differentiable w.r.t. x' and the label (double backprop)."""
    dummy_gradient = grad(sample_loss(model))

    def one_trial(weights, shared_grads, x, label_probs):
        return gradient_distance(dummy_gradient(weights, x, label_probs), shared_grads)

    return vmap(one_trial)
