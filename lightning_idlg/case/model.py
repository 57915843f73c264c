"""The victim model: the network whose gradient the client shares.

The paper's victim is a LeNet without pooling, sigmoid activations, every weight and bias drawn from
U(-0.5, 0.5), untrained, a fresh network per trial. `make_victim` builds one from a seed so that the
same trial always attacks the same network, whatever group it runs in. How its weights are set is a part
of its own (configs/model/init/*.yaml): `UniformInit` (the paper), `DefaultInit` (PyTorch's), or
`CheckpointInit` (one saved network for all trials).
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


def custom(target: str, *, in_channels: int, image_size: int, num_classes: int, **arguments) -> nn.Module:
    """Your own victim (`model=custom model.factory.target=mypackage.MyNet`): the class or function at the
    import path `target`, called with those of in_channels, image_size and num_classes that its signature
    takes, plus `arguments` (`+model.factory.hidden=64`). The attack needs no more of it than an
    nn.Module whose forward maps (N, C, H, W) inputs to (N, classes) logits."""
    import inspect

    from hydra.utils import get_object

    try:
        build = get_object(target)
    except Exception:
        raise ConfigError(f"model.factory.target={target!r} cannot be imported; give an import path such as "
                          "mypackage.models.MyNet (on PYTHONPATH)") from None
    accepted = inspect.signature(build).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
    sizes = {"in_channels": in_channels, "image_size": image_size, "num_classes": num_classes}
    model = build(**{k: v for k, v in sizes.items() if takes_all or k in accepted}, **arguments)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.factory.target={target!r} returned {type(model).__name__}, not an nn.Module")
    return model


class UniformInit:
    """The paper's victim: every weight and bias re-drawn from U(-scale, scale) (scale 0.5), a fresh network
    per trial (from the trial's seed)."""

    one_network = False

    def __init__(self, scale: float = 0.5):
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise ConfigError(f"model.init.scale must be a number > 0 (the paper: 0.5), got {scale!r}")
        self.scale = float(scale)

    def __call__(self, model: nn.Module) -> nn.Module:
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-self.scale, self.scale)
        return model

    def describe(self) -> dict:
        return {"name": "uniform", "scale": self.scale}


class DefaultInit:
    """PyTorch's own initialization of each layer, a fresh network per trial (from the trial's seed)."""

    one_network = False

    def __call__(self, model: nn.Module) -> nn.Module:
        return model

    def describe(self) -> dict:
        return {"name": "default"}


class CheckpointInit:
    """One trained (or otherwise saved) network for every trial: its weights and buffers loaded from `path`
    with `torch.load(weights_only=True)` (a plain state dict, or a Lightning checkpoint's `state_dict`,
    whose keys may carry a `model.` prefix)."""

    one_network = True

    def __init__(self, path: str):
        if not path:
            raise ConfigError("model.init.path is empty; set model.init.path=<file saved with torch.save(model.state_dict())>")
        self.path = str(path)

    def __call__(self, model: nn.Module) -> nn.Module:
        from pathlib import Path

        if not Path(self.path).is_file():
            raise FileNotFoundError(f"checkpoint not found: model.init.path={self.path}")
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickle with code in it, truncated file, not a torch file
            raise ConfigError(f"model.init.path={self.path} is not a weights-only torch checkpoint "
                              f"({type(err).__name__}); save one with torch.save(model.state_dict(), path)") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict):
            raise ConfigError(f"model.init.path={self.path} holds no state dict")
        names = set(model.state_dict())
        if not names & set(state):  # a LightningModule's keys: "<attribute>.<name>"
            state = {k.split(".", 1)[1]: v for k, v in state.items() if "." in k and k.split(".", 1)[1] in names}
        missing, unexpected = sorted(names - set(state)), sorted(set(state) - names)
        if missing or unexpected:
            raise ConfigError(f"model.init.path={self.path} does not fit {type(model).__name__}: "
                              f"{len(missing)} missing (first: {missing[:1]}), {len(unexpected)} unexpected "
                              f"(first: {unexpected[:1]}); check model= and its width/activation keys")
        model.load_state_dict(state)
        return model

    def describe(self) -> dict:
        return {"name": "checkpoint", "path": self.path}


def make_victim(factory: Callable[..., nn.Module], init: Callable[[nn.Module], nn.Module] | None = None, *,
                in_channels: int, image_size: int, num_classes: int, seed: int) -> nn.Module:
    """A victim network built by `factory` and initialized by `init` (lightning_idlg.case.model.UniformInit:
    the paper draws a new network for every trial, from `seed`)."""
    init = init if init is not None else UniformInit()
    # CUDA's generator only where CUDA is already in use: asking for it would initialize CUDA, which a CPU
    # rank forked from the app (experiment.start_method) must not do needlessly
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            model = factory(in_channels=in_channels, image_size=image_size, num_classes=num_classes)
        except TypeError as err:  # e.g. model.factory._target_=MyNet beside lenet's activation and width keys
            raise ConfigError(f"model.factory could not build the victim ({err}); for a class of your own use "
                              "model=custom model.factory.target=<import path>, which passes only the arguments "
                              "it takes") from None
        return init(model)


def output_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last Linear layer (name, module): the layer iDLG reads the label from."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear layer; iDLG label extraction needs the "
                         "last layer to be Linear (use method=dlg for other models)")
    return linears[-1]
