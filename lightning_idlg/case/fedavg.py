"""Federated averaging (McMahan et al. 2017), the client side: the client that trains locally and shares its
weight update (`FedAvgClient`, client=fedavg). The attacker's part that simulates that training with the
dummies is lightning_idlg.attacks.local_updates (`LocalUpdates`).

Local training: E epochs (`epochs`) of plain SGD (learning rate `lr`; no momentum, no weight decay) over the
client's B samples in local batches of `local_batch_size` samples, each step on the loss of its local
batch (`reduction` within it). The local batches are consecutive slices of the B samples in their given
order, the same every epoch, no shuffling: an attacker told the settings can replay the schedule exactly
(a shuffle would be one more secret of the client), and a test can replay it with a plain PyTorch loop.
When `local_batch_size` does not divide B the last batch of an epoch is smaller (DataLoader's
drop_last=False). So there are T = E * ceil(B / local_batch_size) local steps; breaching's
`num_local_updates` and `num_data_per_local_update_step` are T and local_batch_size where it divides B.

What is shared is the weight difference, as a pseudo-gradient u = (w_0 - w_E) / (lr T). Why that scale:
u is the mean of the T step gradients, so for one local step over the whole batch (epochs=1,
local_batch_size=B) it IS the gradient, and client=fedavg shares what client=gradient shares; every attack,
label strategy and defense reads u as a gradient unchanged, and for several steps it stays on a gradient's
scale (the head's rows still carry the label evidence the batch label strategies count, averaged over the
steps, which is their approximation here). It is computed as that mean, which equals (w_0 - w_E) / (lr T) in
exact arithmetic without float32's cancellation in w_0 - w_E.

Threat model (`disclose_local`): the server is told lr, epochs, local_batch_size and the number of steps
(breaching's `provide_local_hyperparams`), recorded as `SharedGradient.local`; or it is not (None), and the
attacker then simulates one step over the whole batch, i.e. matches u with a plain gradient; with the
cosine objective that comparison is scale-free, which is why Inverting Gradients is the natural attacker
there.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import grad

from lightning_idlg.case.client import Client, batch_loss, over_trials
from lightning_idlg.case.defense import Defense
from lightning_idlg.errors import ConfigError, positive_int

def local_batches(batch_size: int, local_batch_size: int) -> list[slice]:
    """One epoch's local batches: consecutive slices of the B samples in their given order (no shuffling)."""
    return [slice(start, min(start + local_batch_size, batch_size)) for start in range(0, batch_size, local_batch_size)]


def local_training(model: nn.Module, reduction: str, lr: float, epochs: int, local_batch_size: int,
                   batch_size: int):
    """update(weights, buffers, x (B, C, H, W), label_probs (B, classes)) -> name -> pseudo-gradient u of one
    client (the mean of its T step gradients, module docstring); vmap it over trials (`over_trials`).
    Written with torch.func and no in-place update, so u is differentiable w.r.t. x and the label
    probabilities through every local step: the attacker's simulation backpropagates through it."""
    step_gradient = grad(batch_loss(model, reduction))
    batches = local_batches(batch_size, local_batch_size)
    steps = epochs * len(batches)

    def update(weights, buffers, x, label_probs):
        total = None
        for _ in range(epochs):
            for part in batches:
                g = step_gradient(weights, buffers, x[part], label_probs[part])
                weights = {name: w - lr * g[name] for name, w in weights.items()}
                total = g if total is None else {name: total[name] + g[name] for name in g}
        return {name: t / steps for name, t in total.items()}

    return update


class FedAvgClient(Client):
    """The FedAvg client of one trial, K at once: B private samples -> E epochs of local SGD -> the (defended)
    pseudo-gradient u = (w_0 - w_E) / (lr T) (module docstring: the schedule and why this scale).

    batch_size, reduction, mode, share_buffers, disclose_defense: as Client (mode is the victim's mode
    during local training; in train mode BatchNorm normalizes by each local batch). epochs: E local passes
    over the B samples. local_batch_size: samples per local step (null: all B, one step per epoch). lr: the
    local SGD learning rate. disclose_local: the server is told lr, epochs, local_batch_size and the number
    of local steps (`SharedGradient.local`)."""

    def __init__(self, batch_size: int = 4, epochs: int = 1, local_batch_size: int | None = None, lr: float = 1e-3,
                 reduction: str = "mean", mode: str = "train", share_buffers: bool = False,
                 disclose_defense: bool = False, disclose_local: bool = True):
        super().__init__(batch_size, reduction, mode, share_buffers, disclose_defense)
        self.epochs = positive_int("client.epochs", epochs, "local passes over the client's samples")
        local_batch_size = batch_size if local_batch_size is None else local_batch_size
        if not isinstance(local_batch_size, int) or isinstance(local_batch_size, bool) \
                or not 1 <= local_batch_size <= batch_size:
            raise ConfigError(f"client.local_batch_size must be an integer in 1..client.batch_size={batch_size} "
                              f"(or null: all of them), got {local_batch_size!r}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"client.lr must be a number > 0 (the local SGD learning rate), got {lr!r}")
        self.local_batch_size, self.lr = local_batch_size, float(lr)
        self.disclose_local = bool(disclose_local)

    @property
    def steps(self) -> int:
        """T, the local SGD steps: E epochs of ceil(B / local_batch_size) steps."""
        return self.epochs * len(local_batches(self.batch_size, self.local_batch_size))

    def local(self) -> dict:
        """What `disclose_local` tells the server (SharedGradient.local)."""
        return {"lr": self.lr, "epochs": self.epochs, "local_batch_size": self.local_batch_size, "steps": self.steps}

    def undefended(self, victim: nn.Module, weights, buffers, images: torch.Tensor,
                   one_hot: torch.Tensor) -> dict[str, torch.Tensor]:
        """The undefended pseudo-gradient u after E epochs of local SGD (Client.share applies the defense to u
        as to a gradient)."""
        update = over_trials(local_training(victim, self.reduction, self.lr, self.epochs, self.local_batch_size,
                                            self.batch_size))
        return {name: u.detach() for name, u in update(weights, buffers, images, one_hot).items()}

    def per_sample_defended(self, defense: Defense, *args, **kwargs) -> dict[str, torch.Tensor]:
        raise ConfigError(f"the {defense.name} defense clips the per-sample gradients of one step; "
                          f"client=fedavg shares an update of {self.steps} local steps: use clip or a noise "
                          "defense on the update, or client=gradient")

    def disclosed_local(self) -> dict | None:
        return self.local() if self.disclose_local else None


# --- the attacker: simulate the local training with the dummies -------------------------------------------
