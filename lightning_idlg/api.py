"""The Python API: attack a gradient of your own model from a notebook or a script.

    from lightning_idlg import attack, show
    result = attack(model, gradient, input_shape=(1, 28, 28), method="idlg")
    result.images, result.labels, result.distance     # what the attacker recovered
    result.evaluate(private_images, private_labels)   # afterwards: MSE, PSNR, SSIM per trial (matched)
    show(result, private_images)                      # a matplotlib figure

`attack` composes the same Hydra config as the command line (`attack=<method>` plus your `overrides`),
builds the same parts and runs the same `GradientInversion` with the same Lightning Trainer
(attacks.fit.Attack): only where the shared gradient comes from differs. The gradient needs no trial
axis; `trials=N` attacks it N times from N different dummy draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from torch import nn

from lightning_idlg.records import metrics
from lightning_idlg.case.client import SharedGradient, functional_victim, share_one_network
from lightning_idlg.app import expand_shortcuts
from lightning_idlg.errors import ConfigError
from lightning_idlg.records.moved import modernize_config
from lightning_idlg.run.quiet import quieted
from lightning_idlg.attacks.fit import attack_batch
from lightning_idlg.case.plan import Trial, derive_seed
from lightning_idlg.case.model import output_layer


@dataclass
class Reconstruction:
    """What the attack recovered, per trial (K attacks of the same gradient, each from its own dummy).

    images: (K, B, C, H, W) reconstructions; labels: (K, B) labels; distance: (K,) the final objective;
    status: converged | not_converged | diverged per trial; steps, evaluations: (K,) costs."""

    method: str
    images: torch.Tensor
    labels: torch.Tensor
    distance: torch.Tensor
    status: list[str]
    steps: torch.Tensor
    evaluations: torch.Tensor
    seconds: float

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                 lpips: str | bool = False) -> dict[str, torch.Tensor]:
        """Per trial (K,): mse, psnr, ssim (means over the B images after Hungarian matching), with
        labels label_accuracy, with `lpips` ("alex", "vgg", "squeeze": the backbone, whose weights must be
        cached; see metrics.check_lpips) lpips. `images`: the private (B, C, H, W) (or (C, H, W) for B = 1)
        in [0, 1]."""
        k, b = self.images.shape[:2]
        truth = images.reshape(1, b, *self.images.shape[2:]).expand(k, -1, -1, -1, -1).to(self.images.dtype)
        order = metrics.match(self.images, truth)
        matched = torch.stack([r[o] for r, o in zip(self.images, order)])
        flat, flat_truth = matched.flatten(0, 1), truth.flatten(0, 1)
        out = {name: f(flat, flat_truth).view(k, b).mean(1).double()
               for name, f in (("mse", metrics.mse), ("psnr", metrics.psnr), ("ssim", metrics.ssim))}
        if lpips not in (False, None):
            out["lpips"] = metrics.lpips(flat, flat_truth, metrics.lpips_metric(lpips)).view(k, b).mean(1).double()
        if labels is not None:
            guesses = torch.stack([p[o] for p, o in zip(self.labels, order)])
            out["label_accuracy"] = (guesses == labels.reshape(1, b)).double().mean(1)
        return out


def attack(model: nn.Module, gradient: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
           input_shape: Sequence[int], *, method: str = "idlg", num_classes: int | None = None,
           batch_size: int = 1, reduction: str = "mean", buffers: bool = False, trials: int = 1, seed: int = 0,
           overrides: Sequence[str] = (), device: str = "cpu") -> Reconstruction:
    """Invert `gradient`, the gradient of `model`'s loss that a client shared.

    gradient: name -> tensor (as `model.named_parameters()`), or a list in `model.parameters()` order;
        the cross-entropy gradient of `batch_size` samples combined by `reduction`.
    input_shape: one input's (C, H, W). method: an attack of configs/attack/ (dlg, idlg, or your own).
    num_classes: the label space (default: the output layer's size). buffers: the attacker knows the
        model's buffers (BatchNorm statistics), as the model holds them now. The model's mode (train or
        eval) is the one the client used.
    overrides: command-line style settings, e.g. ["steps=100", "patience=20", "optimizer=adam",
        "attack.idlg.label_strategy.rule=bias"]. device: "cpu" or "cuda"."""
    gradient = _named(model, gradient)
    if num_classes is None:
        num_classes = output_layer(model)[1].out_features
    cfg = _config(method, [f"seed={seed}", f"client.batch_size={batch_size}", f"client.reduction={reduction}",
                           *(["trainer=gpu"] if device.startswith("cuda") else []), *overrides])
    weights, held = share_one_network(model, trials)
    shared = SharedGradient(
        model=functional_victim(model, "train" if model.training else "eval"),
        weights=weights,
        gradients={n: g.detach()[None].expand(trials, *g.shape).clone() for n, g in gradient.items()},
        input_shape=tuple(int(s) for s in input_shape),
        num_classes=int(num_classes),
        batch_size=batch_size,
        reduction=reduction,
        buffers=held if buffers else None,
    )
    plan = [Trial(i, (), derive_seed(seed, i, 0), derive_seed(seed, i, 1)) for i in range(trials)]
    with quieted():
        result, _ = attack_batch(cfg, method, shared, plan, logger=None, callbacks=[],
                                 trainer_args={"enable_progress_bar": False})
    return Reconstruction(result.method, result.dummy, result.predicted_label, result.distance, result.status,
                          result.steps, result.evaluations, result.seconds)


def show(result: Reconstruction, images: torch.Tensor | None = None, scale: float = 1.5):
    """A matplotlib figure: one row per trial (the private images first, where given), B images each."""
    import matplotlib.pyplot as plt

    k, b = result.images.shape[:2]
    rows = [("private", images.reshape(b, *result.images.shape[2:]))] if images is not None else []
    rows += [(f"{result.method} trial {i}: {result.status[i]}", result.images[i]) for i in range(k)]
    figure, axes = plt.subplots(len(rows), b, figsize=(scale * b, scale * len(rows)), squeeze=False)
    for r, (title, row) in enumerate(rows):
        for j, image in enumerate(metrics.clamped(row)):
            axes[r, j].imshow(image.permute(1, 2, 0).squeeze(-1), cmap="gray", vmin=0, vmax=1,
                              interpolation="nearest")
            axes[r, j].set_axis_off()
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    figure.tight_layout()
    return figure


def _named(model: nn.Module, gradient) -> dict[str, torch.Tensor]:
    names = [n for n, _ in model.named_parameters()]
    if isinstance(gradient, Mapping):
        missing = sorted(set(names) - set(gradient))
        if missing:
            raise ConfigError(f"the gradient lacks {len(missing)} of the model's parameters (first: {missing[0]}); "
                              "pass name -> tensor for every model.named_parameters()")
        gradient = {n: gradient[n] for n in names}
    else:
        gradient = list(gradient)
        if len(gradient) != len(names):
            raise ConfigError(f"the gradient has {len(gradient)} tensors, the model {len(names)} parameters; "
                              "pass them in model.parameters() order")
        gradient = dict(zip(names, gradient))
    for (name, p), g in zip(model.named_parameters(), gradient.values()):
        if tuple(g.shape) != tuple(p.shape):
            raise ConfigError(f"gradient[{name!r}] has shape {tuple(g.shape)}, the parameter {tuple(p.shape)} "
                              "(no trial axis: one gradient as the client shared it)")
    return gradient


def _config(method: str, overrides: list[str]):
    """The app's config for `attack=<method>` (the same composition as the command line)."""
    GlobalHydra.instance().clear()
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        try:
            cfg = compose("config", overrides=[f"attack={method}", "progress_bar=false", *expand_shortcuts(overrides)])
        except Exception as err:  # Hydra's own message names the bad override
            raise ConfigError(str(err).splitlines()[0]) from None
    modernize_config(cfg)  # an override naming a module by its path before the move
    return cfg
