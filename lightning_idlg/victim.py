"""The victim model: the network whose gradient the client shares.

The paper's victim is a LeNet without pooling, sigmoid activations, every weight and bias drawn from
U(-0.5, 0.5), untrained, a fresh network per trial. `make_victim` builds one from a seed so that the
same trial always attacks the same network, whatever batch it runs in.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lightning_idlg.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "leaky_relu": nn.LeakyReLU,
}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"model.activation={name!r} is not known; valid: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class LeNet(nn.Module):
    """The iDLG/DLG reference LeNet: three 5x5 convolutions (stride 2, 2, 1; 12 channels), no pooling,
    then one Linear layer. hidden = 12 * ceil(H/4) * ceil(W/4): 588 for 1x28x28, 768 for 3x32x32."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, activation: str = "sigmoid",
                 width: int = 12):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=5, stride=2, padding=2),
            _activation(activation),
            nn.Conv2d(width, width, kernel_size=5, stride=2, padding=2),
            _activation(activation),
            nn.Conv2d(width, width, kernel_size=5, stride=1, padding=2),
            _activation(activation),
        )
        side = -(-image_size // 4)  # two stride-2 convolutions with padding 2 halve (rounding up) twice
        self.classifier = nn.Linear(width * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class MLP(nn.Module):
    """A fully connected victim (flatten - hidden layers - Linear), for experiments beyond the paper."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, activation: str = "sigmoid",
                 hidden: tuple[int, ...] = (256,)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), _activation(activation)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def init_weights(model: nn.Module, init: str = "uniform", scale: float = 0.5) -> nn.Module:
    """Re-draw every parameter. `uniform`: U(-scale, scale) for all weights and biases (the paper: 0.5);
    `default`: keep PyTorch's own initialization."""
    if init == "default":
        return model
    if init != "uniform":
        raise ConfigError(f"model.init={init!r} is not known; valid: uniform, default")
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-scale, scale)
    return model


def make_victim(factory: Callable[..., nn.Module], *, in_channels: int, image_size: int, num_classes: int,
                seed: int, init: str = "uniform", init_scale: float = 0.5) -> nn.Module:
    """A fresh victim network drawn from `seed` (the paper draws a new network for every trial)."""
    # CUDA's generator only where CUDA is already in use: asking for it would initialize CUDA, which a CPU
    # rank forked from the app (experiment.start_method) must not do needlessly
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = factory(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        return init_weights(model, init, init_scale)


def output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear layer (name, module): the layer iDLG reads the label from."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer; iDLG label extraction needs the "
                         "last layer to be Linear (use method=dlg for other models)")
    return linears[-1]
