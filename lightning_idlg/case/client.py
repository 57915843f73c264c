"""The client side of federated learning: what it computes and what it shares.

A client holds B private samples and computes the cross-entropy gradient of the shared model on them
(loss reduction `mean` over the B samples, as PyTorch's default, or `sum`), applies its defense (noise,
clipping, pruning, ...; lightning_idlg.case.defense) and sends the result. `SharedGradient` is exactly what
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
from torch.func import functional_call, grad, stack_module_state, vmap

from lightning_idlg.case.defense import Chain, Defense, compose, utility
from lightning_idlg.errors import ConfigError, one_of, positive_int

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
    local: a FedAvg client's local training {lr, epochs, local_batch_size, steps} where the threat model
        discloses it (`client.disclose_local`, lightning_idlg.case.fedavg), else None (and None for a client that
        shares one gradient).
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
    local: dict | None = None

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


def over_trials(fn):
    """vmap `fn` over the trial axis (dim 0) of its arguments, where a dict's tensor that is one tensor viewed
    for all trials (stride 0 on the trial axis: one checkpoint for every trial), or the only trial's, enters
    unbatched. Then a layer's weights meet all K trials' inputs at once (one convolution over K x B images)
    instead of K copies of themselves (a grouped convolution): the same numbers, less work. And a single
    trial never takes vmap's route for a batch of one weight tensor: for a ConvNet (torch 2.14, CPU) that
    route gave a weight gradient 2.8% off the float64 one for one CIFAR-100 image, where the unbatched
    route and batches of two or more are within 2e-6 (tests/case/test_victims.py)."""

    def shared(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() > 0 and (t.shape[0] == 1 or t.stride(0) == 0)

    def batched(*args):
        dims = tuple({n: None if shared(t) else 0 for n, t in a.items()} if isinstance(a, dict) else 0
                     for a in args)
        args = tuple({n: t[0] if shared(t) else t for n, t in a.items()} if isinstance(a, dict) else a
                     for a in args)
        return vmap(fn, in_dims=dims)(*args)

    return batched


class BatchStatisticsNorm(nn.Module):
    """BatchNorm as in train mode, from elementary ops: (x - mean) / sqrt(var + eps) * weight + bias, with
    the batch's mean and biased variance over every dim but the channels (dim 1); no running statistics.

    Why not nn.BatchNorm itself: torch.func's batching rule for batch_norm's backward is wrong for
    grad_input (pytorch/functorch#534, open). The client's first-order gradient is right, but the attack
    differentiates D = ||grad - shared||^2 w.r.t. the dummy with autograd through vmap(grad(loss)), and that
    derivative came out wrong (torch 2.14: 0.05% off for one Conv-BN-ReLU-Linear layer, up to 40% per
    element for a ResNet; finite differences and a per-trial autograd loop agree with this module).
    Parameter and buffer names stay those of the BatchNorm it replaces, so weights and shared buffers fit."""

    def __init__(self, norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):  # names the buffers keep
            self.register_buffer(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalized in float64: the backward's per-channel sums (of dL/dy and of dL/dy * x-hat) cancel, and
        # PyTorch's own CPU BatchNorm accumulates them in double; in float32 a ConvNet's gradient came out 2.8%
        # off for one CIFAR-100 image (tests/case/test_victims.py)
        dims = [0, *range(2, x.dim())]
        wide = x.double() if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x
        centred = wide - wide.mean(dims, keepdim=True)
        out = (centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + self.eps)).to(x.dtype)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        return out + self.bias.view(shape) if self.bias is not None else out


def functional_victim(model: nn.Module, mode: str) -> nn.Module:
    """A copy of `model` for torch.func in `mode`: in train mode BatchNorm uses the batch's statistics and
    must not update running ones inside vmap (`BatchStatisticsNorm`, which also keeps the attack's second
    derivatives right); in eval mode it reads the running statistics passed as buffers."""
    if mode not in MODES:
        raise ConfigError(f"client.mode={mode!r} is not known; valid: {', '.join(MODES)}")
    model = copy.deepcopy(model).requires_grad_(False)
    getattr(model, mode)()
    for name, module in list(model.named_modules()):
        # a BatchNorm without running statistics normalizes by the batch's in eval mode too
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (mode == "train" or module.running_mean is None):
            model.set_submodule(name, BatchStatisticsNorm(module))
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
        positive_int("client.batch_size", batch_size)
        one_of("client.reduction", reduction, REDUCTIONS)
        one_of("client.mode", mode, MODES)
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
        true = self.undefended(victim, weights, buffers, private.images, one_hot)
        if getattr(defense, "per_sample", False):  # DP-SGD: clip each sample's gradient, then aggregate
            shared = self.per_sample_defended(defense, victim, weights, buffers, private.images, one_hot, seeds)
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
            local=self.disclosed_local(),
        )
        return record, utility(true, gradients)

    def undefended(self, victim: nn.Module, weights, buffers, images: torch.Tensor,
                   one_hot: torch.Tensor) -> dict[str, torch.Tensor]:
        """What the client would share without a defense: the gradient of its B samples' loss."""
        return over_trials(grad(batch_loss(victim, self.reduction)))(weights, buffers, images, one_hot)

    def per_sample_defended(self, defense: Defense, victim: nn.Module, weights, buffers, images: torch.Tensor,
                            one_hot: torch.Tensor, seeds: list[int]) -> dict[str, torch.Tensor]:
        """A per-sample defense (DP-SGD) on each sample's gradient; it reduces over B itself."""
        first = defense.parts[0] if isinstance(defense, Chain) else defense
        if getattr(first, "reduction", self.reduction) != self.reduction:
            raise ConfigError(f"the {first.name} defense reduces with {first.reduction!r} but "
                              f"client.reduction={self.reduction!r}; set both alike")
        per_sample = vmap(vmap(grad(batch_loss(victim, "sum")), in_dims=(None, None, 0, 0)))(
            weights, buffers, images[:, :, None], one_hot[:, :, None])
        return defense(per_sample, seeds)

    def disclosed_local(self) -> dict | None:
        """What the server is told of the client's local training (SharedGradient.local): none here."""
        return None


def share_gradient(model: nn.Module, weights: dict[str, torch.Tensor], private: PrivateBatch,
                   num_classes: int, buffers: dict[str, torch.Tensor] | None = None) -> SharedGradient:
    """The undefended client of DLG/iDLG (B from the private batch, mean reduction, train mode)."""
    client = Client(batch_size=private.images.shape[1])
    return client.share(model, weights, buffers or {}, private, num_classes)[0]
