"""The attacker's objective part for a FedAvg client (client=fedavg, lightning_idlg.case.fedavg): it simulates
the client's local training with the dummies and compares the simulated update with the shared one, as
Dimitrov et al. 2022 and breaching's `local_updates` user do. What the server is told of the training
(`SharedGradient.local`) sets the simulation; without it, one step over the whole batch (a plain gradient)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_idlg.attacks.objective import LAYER_WEIGHTS, gradient_distance, layer_weights
from lightning_idlg.case.client import over_trials
from lightning_idlg.case.fedavg import local_training
from lightning_idlg.errors import ConfigError

INNER_DISTANCES = ("cosine", "squared_l2")


class LocalUpdates:
    """An objective part (configs/attack/*.yaml `objective`) for FedAvg clients: from each trial's weights it
    runs the client's local SGD on the dummies x' (K, B, C, H, W) and label probabilities, differentiably
    through every step (torch.func), and compares the simulated pseudo-gradient with the shared one by
    `inner`: cosine (1 - cosine similarity, Inverting Gradients; `layer_weights` as there) or squared_l2
    (DLG's sum of squares). The local settings come from SharedGradient.local (client.disclose_local);
    where the server was not told them (None) it simulates one step over the whole batch, the plain
    gradient, which only the scale-free cosine compares fairly with a several-step update."""

    name = "local_updates"
    uses_local = True  # GradientInversion passes SharedGradient.local to `build`

    def __init__(self, inner: str = "cosine", layer_weights: str = "equal"):
        if inner not in INNER_DISTANCES:
            raise ConfigError(f"objective.inner={inner!r} is not known; valid: {', '.join(INNER_DISTANCES)}")
        if layer_weights not in LAYER_WEIGHTS:
            raise ConfigError(f"objective.layer_weights={layer_weights!r} is not known; valid: "
                              f"{', '.join(LAYER_WEIGHTS)}")
        if inner == "squared_l2" and layer_weights != "equal":
            raise ConfigError(f"objective.layer_weights={layer_weights!r} weighs the cosine only; valid with "
                              "objective.inner=squared_l2: equal")
        self.inner, self.layer_weights = inner, layer_weights

    def build(self, model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1, reduction: str = "mean",
              local: dict | None = None) -> "BatchedLocalUpdates":
        return BatchedLocalUpdates(model, batch_size, reduction, local, self.inner, self.layer_weights)


def _weighted_cosine_distance(weights: dict[str, float]):
    """1 - <u', u> / (|u'| |u|) over all tensors as one vector, each tensor weighted (objective.layer_weights)."""

    def distance(simulated, shared):
        dot = sum(weights[n] * (simulated[n] * shared[n]).sum() for n in shared)
        simulated_norm2 = sum(weights[n] * simulated[n].square().sum() for n in shared)
        shared_norm2 = sum(weights[n] * shared[n].square().sum() for n in shared)
        return 1 - dot / (simulated_norm2.sqrt() * shared_norm2.sqrt())

    return distance


class BatchedLocalUpdates:
    """D for K trials at once, with BatchedDistance's interface: distance(weights, targets, x', label probs,
    buffers) -> (K,), targets as `prepare` returns them (the shared pseudo-gradients as they are)."""

    def __init__(self, model: nn.Module, batch_size: int, reduction: str, local: dict | None, inner: str,
                 scheme: str = "equal"):
        if local is None:  # not told: one step over the whole batch, the plain gradient (lr drops out)
            lr, epochs, local_batch_size = 1.0, 1, batch_size
        else:
            lr, epochs, local_batch_size = float(local["lr"]), int(local["epochs"]), int(local["local_batch_size"])
        self.local = local
        simulate = local_training(model, reduction, lr, epochs, local_batch_size, batch_size)
        if inner == "cosine":
            compare = _weighted_cosine_distance(layer_weights([n for n, _ in model.named_parameters()], scheme))
        else:
            compare = gradient_distance

        def one_trial(weights, targets, x, label_probs, buffers):
            return compare(simulate(weights, buffers, x, label_probs), targets)

        self._distance = over_trials(one_trial)

    def prepare(self, shared_grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(shared_grads)

    def __call__(self, weights, targets, x, label_probs, buffers=None) -> torch.Tensor:
        return self._distance(weights, targets, x, label_probs, buffers or {})
