"""The client side of federated learning: what it computes and what it shares.

A client holds B private samples and computes the cross-entropy gradient of the shared model on them
(loss reduction `mean` over the B samples, as PyTorch's default, or `sum`), applies its defense (noise,
clipping, pruning, ...; lightning_idlg.defenses) and sends the result. `SharedGradient` is exactly what
leaves the client (model architecture and weights, which the server already has, the defended gradient,
and the buffers or the defense's name only where the threat model says the server knows them) and is
therefore all the attack code ever receives. The private images and labels stay in `PrivateBatch`, used
only by evaluation. Everything is stacked over K independent trials (dim 0): one client per trial.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, grad, replace_all_batch_norm_modules_, stack_module_state, vmap

from lightning_idlg.defenses import Chain, Defense, compose, utility
from lightning_idlg.errors import ConfigError

REDUCTIONS = ("mean", "sum")
MODES = ("train", "eval")


@dataclass(frozen=True)
class SharedGradient:
    """What the attacker sees for K independent trials (stacked along dim 0).

    model: the architecture (weights are taken from `weights`, not from this module), in the mode the
        client used (train or eval).
    weights: name -> (K, *shape) victim parameters per trial (the server knows the model it sent); one set
        shared by all trials is an expanded view (stride 0 on dim 0), not K copies.
    gradients: name -> (K, *shape) the (defended) gradient each trial's client shared.
    input_shape: (C, H, W) of one input; num_classes: size of the label space.
    batch_size: B, the client's samples behind each gradient; reduction: how their losses were combined.
    buffers: name -> (K, *shape) the victim's buffers (BatchNorm statistics) where the server knows them
        (`client.share_buffers`), else None.
    defense: the defense's description where the threat model discloses it (`client.disclose_defense`),
        else None.
    """

    model: nn.Module
    weights: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int = 1
    reduction: str = "mean"
    buffers: dict[str, torch.Tensor] | None = None
    defense: dict | None = None

    @property
    def trials(self) -> int:
        return next(iter(self.gradients.values())).shape[0]


@dataclass(frozen=True)
class PrivateBatch:
    """The clients' private data for K trials: never passed to the attack, used to evaluate it."""

    images: torch.Tensor  # (K, B, C, H, W) in [0, 1]
    labels: torch.Tensor  # (K, B)
    indices: list[int] = field(default_factory=list)  # trial indices in the experiment


def soft_cross_entropy(logits: torch.Tensor, label_probs: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """-sum p * log_softmax(logits) per sample, averaged (or summed) over the batch. Equal to cross-entropy
    for one-hot p. log_softmax (not log(softmax)) so that spread logits never give -inf and NaN."""
    per_sample = -(label_probs * torch.log_softmax(logits, dim=-1)).sum(-1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def batch_loss(model: nn.Module, reduction: str = "mean"):
    """loss(weights, buffers, x (B, C, H, W), label_probs (B, classes)) under `model` (functional)."""

    def loss(weights: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
             label_probs: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**weights, **buffers}, (x,))
        return soft_cross_entropy(logits, label_probs, reduction)

    return loss


def functional_victim(model: nn.Module, mode: str) -> nn.Module:
    """A copy of `model` for torch.func in `mode`: in train mode BatchNorm uses the batch's statistics and
    must not update running ones inside vmap (torch.func's replace_all_batch_norm_modules_); in eval mode
    it reads the running statistics passed as buffers."""
    if mode not in MODES:
        raise ConfigError(f"client.mode={mode!r} is not known; valid: {', '.join(MODES)}")
    model = copy.deepcopy(model).requires_grad_(False)
    if mode == "train":
        replace_all_batch_norm_modules_(model.train())
    else:
        model.eval()
    return model


def stack_victims(victims: list[nn.Module]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(name -> (K, *shape) parameters, name -> (K, *shape) buffers) of K networks of one architecture."""
    weights, buffers = stack_module_state(victims)
    return ({name: w.detach() for name, w in weights.items()},
            {name: b.detach() for name, b in buffers.items()})


def share_one_network(victim: nn.Module, trials: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same network for all K trials (a checkpoint): expanded views of one copy, not K copies."""
    return ({n: p.detach()[None].expand(trials, *p.shape) for n, p in victim.named_parameters()},
            {n: b.detach()[None].expand(trials, *b.shape) for n, b in victim.named_buffers()})


class Client:
    """The client of one trial, K at once: B private samples -> (defended) gradient.

    batch_size: B samples per shared gradient (1 in DLG/iDLG). reduction: mean (PyTorch's default) or
    sum over them. mode: the victim's mode while computing it (train | eval). share_buffers: the server
    knows the victim's buffers (BatchNorm running statistics). disclose_defense: the attacker is told
    which defense was applied."""

    def __init__(self, batch_size: int = 1, reduction: str = "mean", mode: str = "train",
                 share_buffers: bool = False, disclose_defense: bool = False):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(f"client.batch_size must be a positive integer, got {batch_size!r}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"client.reduction={reduction!r} is not known; valid: {', '.join(REDUCTIONS)}")
        if mode not in MODES:
            raise ConfigError(f"client.mode={mode!r} is not known; valid: {', '.join(MODES)}")
        self.batch_size, self.reduction, self.mode = batch_size, reduction, mode
        self.share_buffers, self.disclose_defense = bool(share_buffers), bool(disclose_defense)

    def share(self, model: nn.Module, weights: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
              private: PrivateBatch, num_classes: int, defense: Defense | None = None,
              seeds: list[int] | None = None) -> tuple[SharedGradient, dict[str, torch.Tensor]]:
        """(what is shared, the defense's cost per trial: `cosine` and `relative_error` of the defended
        gradient against the true one, for evaluation only). `seeds`: one per trial, for the defense's
        random draws."""
        if private.images.shape[1] != self.batch_size:
            raise ValueError(f"the private batch holds {private.images.shape[1]} samples per trial, the "
                             f"client expects {self.batch_size}")
        defense = compose(defense) if not isinstance(defense, Defense) else defense
        seeds = list(range(private.images.shape[0])) if seeds is None else list(seeds)
        victim = functional_victim(model, self.mode)
        one_hot = nn.functional.one_hot(private.labels, num_classes).to(private.images.dtype)
        loss = batch_loss(victim, self.reduction)
        true = vmap(grad(loss))(weights, buffers, private.images, one_hot)
        if getattr(defense, "per_sample", False):  # DP-SGD: clip each sample's gradient, then aggregate
            first = defense.parts[0] if isinstance(defense, Chain) else defense
            if getattr(first, "reduction", self.reduction) != self.reduction:
                raise ConfigError(f"the {first.name} defense reduces with {first.reduction!r} but "
                                  f"client.reduction={self.reduction!r}; set both alike")
            per_sample = vmap(vmap(grad(batch_loss(victim, "sum")), in_dims=(None, None, 0, 0)))(
                weights, buffers, private.images[:, :, None], one_hot[:, :, None])
            shared = defense(per_sample, seeds)  # the defense reduces over B itself (dpsgd.reduction)
        else:
            shared = defense(true, seeds)
        gradients = {name: g.detach() for name, g in shared.items()}
        record = SharedGradient(
            model=victim,
            weights=weights,
            gradients=gradients,
            input_shape=tuple(private.images.shape[2:]),
            num_classes=num_classes,
            batch_size=self.batch_size,
            reduction=self.reduction,
            buffers=buffers if self.share_buffers else None,
            defense=defense.describe() if self.disclose_defense else None,
        )
        return record, utility(true, gradients)


def share_gradient(model: nn.Module, weights: dict[str, torch.Tensor], private: PrivateBatch,
                   num_classes: int, buffers: dict[str, torch.Tensor] | None = None) -> SharedGradient:
    """The undefended client of DLG/iDLG (B from the private batch, mean reduction, train mode)."""
    client = Client(batch_size=private.images.shape[1])
    return client.share(model, weights, buffers or {}, private, num_classes)[0]
