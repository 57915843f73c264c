"""Image priors added to the matching objective: one optional part of an attack (configs/attack/*.yaml
`regularizers`, a mapping name -> `_target_` node). Each takes the dummies x' (K, B, C, H, W) and returns
its weighted term per trial (K,). DLG and iDLG use none; Inverting Gradients adds total variation.
A prior on the victim's internals (`uses_victim`, e.g. BatchNormPrior) is bound to the victim once (`bind`)
and then also takes the trials' weights and buffers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call
from torchmetrics.functional.image import total_variation

from lightning_idlg.case.client import BatchStatisticsNorm, over_trials
from lightning_idlg.errors import ConfigError


class TotalVariation:
    """weight * sum over the trial's B images of the anisotropic total variation
    sum |x[i+1, j] - x[i, j]| + |x[i, j+1] - x[i, j]| over channels and pixels (torchmetrics' `total_variation`,
    reduction per image), optionally divided by the number of pixels per image (`mean: true`)."""

    def __init__(self, weight: float = 1e-4, mean: bool = False):
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight < 0:
            raise ConfigError(f"regularizers.tv.weight must be a number >= 0, got {weight!r}")
        self.weight, self.mean = float(weight), bool(mean)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        k, b = x.shape[:2]
        per_image = total_variation(x.flatten(0, 1), reduction="none")
        if self.mean:
            per_image = per_image / x[0, 0].numel()
        return self.weight * per_image.view(k, b).sum(1)


class BatchNormPrior:
    """DeepInversion's BatchNorm prior (Yin et al., CVPR 2020; used for gradient inversion in "See through
    Gradients", Yin et al., CVPR 2021; breaching's `deep_inversion`): weight * sum over the victim's
    BatchNorm layers l of c_l (|mu_l(x') - running_mean_l| + |var_l(x') - running_var_l|), Euclidean norms
    over channels, with mu and the biased var of the layer's input over the trial's B dummies and pixels,
    c_1 = first_bn_multiplier and 1 for the other layers.

    Threat model: it needs the victim's running statistics, so the server must know the buffers
    (client.share_buffers=true); an untrained victim's are mean 0, variance 1. The statistics of x' are taken
    in a forward pass of their own, in the client's mode (client.mode), so the prior costs one more forward
    and backward per evaluation."""

    name = "bn"
    uses_victim = True

    def __init__(self, weight: float = 0.1, first_bn_multiplier: float = 10.0):
        for key, value in (("weight", weight), ("first_bn_multiplier", first_bn_multiplier)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"regularizers.bn.{key} must be a number >= 0, got {value!r}")
        self.weight, self.first_bn_multiplier = float(weight), float(first_bn_multiplier)
        self._inputs: dict[str, torch.Tensor] = {}

    def bind(self, model: nn.Module, shared) -> None:
        """Hook every BatchNorm layer of a copy of the victim (the copy: hooks must not fire in D's pass)."""
        if shared.buffers is None:
            raise ConfigError("regularizers.bn needs the victim's BatchNorm statistics: set "
                              "client.share_buffers=true (the threat model where the server knows them)")
        self.model = copy.deepcopy(model)
        # in train mode the functional victim's BatchNorms are client.BatchStatisticsNorm (same names)
        self.layers = [name for name, m in self.model.named_modules()
                       if isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchStatisticsNorm))]
        if not self.layers:
            raise ConfigError(f"regularizers.bn needs a victim with BatchNorm layers; "
                              f"{type(model).__name__} has none")
        for name in self.layers:
            self.model.get_submodule(name).register_forward_hook(self._capture(name))
        self._per_trial = over_trials(self._one_trial)

    def _capture(self, name: str):
        def hook(module, inputs, output):
            self._inputs[name] = inputs[0]
        return hook

    def _one_trial(self, weights, buffers, x):
        functional_call(self.model, {**weights, **buffers}, (x,))
        total = x.new_zeros(())
        for i, name in enumerate(self.layers):
            features = self._inputs.pop(name)
            dims = [0, *range(2, features.dim())]  # all but the channels
            mean, var = features.mean(dims), features.var(dims, unbiased=False)
            r = ((var - buffers[f"{name}.running_var"]).norm()
                 + (mean - buffers[f"{name}.running_mean"]).norm())
            total = total + (self.first_bn_multiplier if i == 0 else 1.0) * r
        return self.weight * total

    def __call__(self, x: torch.Tensor, weights: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._per_trial(weights, buffers, x)
