"""Parts a user might add, defined outside the package: the tests run them through the real entry point
(tests/configs/ holds their YAML files) to show that adding a defense, a label strategy or a victim is one
module and one YAML file, with no edit of the package."""

from __future__ import annotations

import torch
from torch import nn

from lightning_idlg.case.defense import Defense
from lightning_idlg.attacks.labels import LabelStrategy


class SignOnly(Defense):
    """Shares only the sign of each gradient entry, scaled by `scale` (a toy sign-SGD client)."""

    name = "sign"
    parameters = ("scale",)

    def __init__(self, scale: float = 1e-3):
        self.scale = float(scale)

    def _apply(self, gradients, seeds):
        return {n: self.scale * torch.sign(g) for n, g in gradients.items()}


class OracleFreeBiasLabel(LabelStrategy):
    """The label as the most negative entry of the output layer's bias gradient (iDLG's `bias` rule, written
    again as a user would)."""

    name = "bias-argmin"
    max_batch = 1

    def restore(self, shared):
        return shared.gradients["classifier.bias"].argmin(dim=-1)[:, None]


class TinyBN(nn.Module):
    """Conv - BatchNorm - ReLU - Linear: a victim with buffers (BatchNorm's running statistics)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.classifier = nn.Linear(4 * image_size * image_size, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class TinyNet(nn.Module):
    """A user's own model for 1x8x8 inputs whose constructor takes none of the engine's arguments but num_classes."""

    def __init__(self, num_classes: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Sigmoid(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def bn_victims(k: int, side: int, classes: int) -> list[nn.Module]:
    """k TinyBN victims (float64, PyTorch's init, seeds 0..k-1) whose running statistics differ from any
    batch's, so that eval mode (which reads them) is told apart from train mode."""
    from hydra.utils import instantiate

    from lightning_idlg.case.model import make_victim

    victims = []
    for s in range(k):
        net = make_victim(TinyBN, instantiate({"_target_": "lightning_idlg.case.model.DefaultInit"}),
                          in_channels=1, image_size=side, num_classes=classes, seed=s).double()
        with torch.no_grad():
            net.features[1].running_mean.uniform_(-0.5, 0.5)
            net.features[1].running_var.uniform_(0.5, 2.0)
        victims.append(net)
    return victims
