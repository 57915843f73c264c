"""Image priors added to the matching objective: one optional part of an attack (configs/attack/*.yaml
`regularizers`, a mapping name -> `_target_` node). Each takes the dummies x' (K, B, C, H, W) and returns
its weighted term per trial (K,). DLG and iDLG use none; Inverting Gradients adds total variation.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import total_variation

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
