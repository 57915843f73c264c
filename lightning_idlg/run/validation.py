"""Every numeric and named setting checked before anything is loaded or built, each failure one line naming
the key and what is valid (`ConfigError`; the app prints it as `error: ...` and exits 2).

`experiment.validate` calls `validate_settings`; what a loader can only know after reading its files (an
image folder's own image size) is checked by `check_image_size`.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_idlg.errors import ConfigError
from lightning_idlg.attacks.labels import LABEL_RULES
from lightning_idlg.records.metrics import check_lpips
from lightning_idlg.records.rundir import RESUME_MODES
from lightning_idlg.attacks.stopping import KEEP
from lightning_idlg.case.model import ACTIVATIONS

# SSIM's 11-pixel Gaussian window (torchmetrics' default, metrics.ssim) reflect-pads 5 pixels, which needs
# images of at least 6 x 6; the victims (LeNet, MLP) take any size >= 1
MIN_IMAGE_SIZE = 6
GPU_ACCELERATORS = ("gpu", "cuda")
LINE_SEARCHES = (None, "strong_wolfe")
# a key whose name holds one of these is a probability or a share: it must lie in [0, 1] (also the keys of
# config groups added later, e.g. a defense's dropout probability)
PROBABILITY_WORDS = ("prob", "fraction")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive(cfg: DictConfig, key: str, *, integer: bool = False, zero: bool = False, optional: bool = False,
             what: str | None = None) -> None:
    """`key` (dotted) must be a number > 0 (>= 0 with zero=True; an integer; or null with optional=True)."""
    value = OmegaConf.select(cfg, key, default=None)
    if value is None and optional:
        return
    ok = (_integer(value) if integer else _number(value)) and (value >= 0 if zero else value > 0)
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = ">= 0" if zero else "> 0"
        extra = " or null" if optional else ""
        raise ConfigError(f"{key} must be {kind} {bound}{extra}{what or ''}, got {value!r}")


def one_of(key: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not known; valid: {', '.join(map(str, valid))}")


def validate_settings(cfg: DictConfig) -> None:
    """The run-wide settings, the model, the methods, the optimizer, the data set's sizes and the device."""
    missing = _missing(cfg)
    if "model.init.path" in missing:
        raise ConfigError("model/init=checkpoint needs model.init.path=<file saved with torch.save(model.state_dict())>")
    if missing:
        raise ConfigError(f"{missing[0]} has no value (???); set {missing[0]}=...")
    one_of("resume", cfg.get("resume", "auto"), RESUME_MODES)
    positive(cfg, "tolerance", optional=True,
             what=" (a trial stops once its gradient distance D < tolerance; null: never early)")
    positive(cfg, "patience", integer=True, optional=True)
    positive(cfg, "restarts", integer=True, zero=True)
    positive(cfg, "restart_distance")
    one_of("keep", cfg.get("keep", "last"), KEEP)
    positive(cfg, "threads", integer=True, optional=True)
    positive(cfg, "progress_trials", integer=True, zero=True)
    positive(cfg, "snapshot_every", integer=True)
    if not isinstance(cfg.get("continuous_batching", False), bool):
        raise ConfigError(f"continuous_batching must be true or false, got {cfg.continuous_batching!r}")
    _validate_device(cfg)
    _validate_dataset(cfg)
    _validate_model(cfg)
    for name, attack in (cfg.get("attack") or {}).items():
        if "divergence_bound" in (attack.get("stopping") or {}):
            positive(cfg, f"attack.{name}.stopping.divergence_bound")
        if "rule" in (attack.get("label_strategy") or {}):
            one_of(f"attack.{name}.label_strategy.rule", attack.label_strategy.rule, LABEL_RULES)
    _validate_optimizer(cfg)
    check_lpips(OmegaConf.select(cfg, "metrics.lpips", default=False))  # its weights too: before any attack
    _validate_probabilities(cfg, "")


def _validate_device(cfg: DictConfig) -> None:
    """A GPU request on a machine without one: refused before any data is loaded."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but this machine has no usable CUDA GPU "
                          "(torch.cuda.is_available() is False); valid here: trainer=cpu, trainer=ddp "
                          "(CPU processes) or trainer.accelerator=auto")


def _validate_dataset(cfg: DictConfig) -> None:
    data = cfg.dataset
    if data.get("image_size") is not None:
        check_image_size("dataset.image_size", data.image_size)
    if "channels" in data:
        one_of("dataset.channels", data.channels, (1, 3))
    if "num_classes" in data:
        positive(cfg, "dataset.num_classes", integer=True)


def check_image_size(what: str, size) -> None:
    if not _integer(size) or size < MIN_IMAGE_SIZE:
        raise ConfigError(f"{what}={size!r} is not a valid image size: images must be at least {MIN_IMAGE_SIZE}x"
                          f"{MIN_IMAGE_SIZE} (SSIM's 11-pixel window); valid: an integer >= {MIN_IMAGE_SIZE}")


def _validate_model(cfg: DictConfig) -> None:
    factory = cfg.model.get("factory") or {}
    if not str(factory.get("_target_", "")).startswith("lightning_idlg.case.model.") or "target" in factory:
        factory = {}  # an own model (model=custom, or a _target_ of yours) checks its own arguments
    if "activation" in factory:
        one_of("model.factory.activation", factory.activation, tuple(ACTIVATIONS))
    if "width" in factory:
        positive(cfg, "model.factory.width", integer=True)
    if "hidden" in factory:
        hidden = factory.hidden
        if not isinstance(hidden, (ListConfig, list, tuple)) or not all(_integer(h) and h > 0 for h in hidden):
            raise ConfigError(f"model.factory.hidden must be a list of positive integers (layer widths), "
                              f"got {hidden!r}")
    init = cfg.model.get("init") or {}
    if "scale" in init:
        positive(cfg, "model.init.scale")



def _validate_optimizer(cfg: DictConfig) -> None:
    opt = cfg.optimizer
    positive(cfg, "optimizer.lr")
    for key in ("max_iter", "history_size"):
        if key in opt:
            positive(cfg, f"optimizer.{key}", integer=True)
    if "max_eval" in opt:
        positive(cfg, "optimizer.max_eval", integer=True, optional=True)
    for key in ("tolerance_grad", "tolerance_change"):
        if key in opt:
            positive(cfg, f"optimizer.{key}", zero=True)
    if "eps" in opt:
        positive(cfg, "optimizer.eps")
    if "line_search_fn" in opt:
        one_of("optimizer.line_search_fn", opt.line_search_fn, LINE_SEARCHES)
    if "betas" in opt:
        betas = opt.betas
        if len(betas) != 2 or not all(_number(b) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(betas)!r}")


def _validate_probabilities(node, prefix: str) -> None:
    for key in node:
        if prefix == "" and key in ("hydra", "logger"):
            continue
        name = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue  # ??? or ${...}: resolved (and checked) where it is used
        value = node[key]
        if isinstance(value, DictConfig):
            _validate_probabilities(value, name + ".")
        elif any(word in str(key).lower() for word in PROBABILITY_WORDS) and value is not None:
            if not (_number(value) and 0 <= value <= 1):
                raise ConfigError(f"{name} is a probability: it must be a number in [0, 1], got {value!r}")


def _missing(node, prefix: str = "") -> list[str]:
    """The dotted keys below `node` that hold no value yet (`???`), without resolving anything."""
    missing = []
    for key in node.keys():
        if key == "hydra":
            continue
        if OmegaConf.is_missing(node, key):
            missing.append(f"{prefix}{key}")
        elif isinstance(node._get_node(key), DictConfig):
            missing += _missing(node._get_node(key), f"{prefix}{key}.")
    return missing
