"""`lightning-idlg-train`: train a victim, so that attacks can target a trained network and not only the
paper's untrained one (gradients of trained networks are smaller and leak differently).

Hydra config configs/train.yaml reuses the app's `dataset` and `model` groups, so the network trained here
is the one `model=<same> model/init=checkpoint model.init.path=<run dir>/epoch_<N>.pt` rebuilds. SGD with
momentum and weight decay in a Lightning Trainer; `SaveVictim` writes the plain state dict
(`torch.save(model.state_dict())`, what `CheckpointInit` loads with weights_only=True) at the chosen epochs,
and `accuracy.json` beside them.

Splits: a data set with a `train` key (mnist, cifar100) trains on its train split and validates on its test
split, the one the attacks draw from; one with a single split (digits, faces, lfw, image_folder) holds out
`val_fraction` of its images, drawn by `seed`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_idlg.errors import ConfigError

log = logging.getLogger(__name__)
FINAL = "final"


def check_settings(cfg: DictConfig) -> None:
    """One line for the first bad key, saying what is valid, before any data is read."""
    positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if not (isinstance(cfg.epochs, int) and not isinstance(cfg.epochs, bool) and cfg.epochs >= 0):
        raise ConfigError(f"epochs must be an integer >= 0, got {cfg.epochs!r}")
    saves = cfg.save_epochs
    valid = f"epochs 0..{cfg.epochs} (0: before training) or '{FINAL}' (after epoch {cfg.epochs})"
    if not OmegaConf.is_list(saves) or not saves:
        raise ConfigError(f"save_epochs must be a non-empty list of {valid}, got {saves!r}")
    for entry in saves:
        if entry != FINAL and not (isinstance(entry, int) and not isinstance(entry, bool) and 0 <= entry <= cfg.epochs):
            raise ConfigError(f"save_epochs entry {entry!r} is not valid; valid: {valid}")
    for key, ok, what in (("batch_size", positive_int, "a positive integer"),
                          ("lr", lambda v: number(v) and v > 0, "a number > 0"),
                          ("momentum", lambda v: number(v) and 0 <= v < 1, "a number in [0, 1)"),
                          ("weight_decay", lambda v: number(v) and v >= 0, "a number >= 0"),
                          ("val_fraction", lambda v: number(v) and 0 < v < 1, "a number in (0, 1)"),
                          ("limit", lambda v: v is None or positive_int(v), "null (all images) or a positive integer"),
                          ("seed", lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")):
        if not ok(cfg[key]):
            raise ConfigError(f"{key} must be {what}, got {cfg[key]!r}")


def splits(cfg: DictConfig):
    """(train set, validation set, the TrialImages that sizes the victim): see the module docstring."""
    import torch
    from torch.utils.data import Subset, random_split

    if "train" in cfg.dataset:
        train, val = instantiate(cfg.dataset, train=True), instantiate(cfg.dataset, train=False)
        full = train
    else:
        full = instantiate(cfg.dataset)
        held_out = max(1, round(cfg.val_fraction * len(full)))
        train, val = random_split(full, [len(full) - held_out, held_out],
                                  generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.limit is not None:  # the first `limit` of each split (already shuffled where it was split here)
        train, val = Subset(train, range(min(cfg.limit, len(train)))), Subset(val, range(min(cfg.limit, len(val))))
    return train, val, full


def _victim_training_module():
    """The LightningModule class, defined on first use: Lightning is imported only once the config is good."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torchmetrics.classification import MulticlassAccuracy

    class VictimTraining(pl.LightningModule):
        """Cross-entropy training of `model` with SGD (momentum, weight decay). Validation measures the
        accuracy of the network as it is (eval mode: BatchNorm's running statistics) on two loaders:
        0 the train split (`train_accuracy`), 1 the validation split (`val_accuracy`)."""

        SPLITS = ("train_accuracy", "val_accuracy")

        def __init__(self, model: nn.Module, num_classes: int, lr: float, momentum: float, weight_decay: float):
            super().__init__()
            self.model = model
            self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
            self.accuracy = nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in self.SPLITS)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
            x, y = batch
            metric = self.accuracy[dataloader_idx]
            metric.update(self.model(x), y)
            self.log(self.SPLITS[dataloader_idx], metric, on_epoch=True, add_dataloader_idx=False, prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum,
                                   weight_decay=self.weight_decay)

    return VictimTraining


def _save_victim_callback():
    import lightning.pytorch as pl
    import torch

    class SaveVictim(pl.Callback):
        """The victim's plain state dict at the chosen epochs, as `<out>/epoch_<N>.pt` (`final.pt` after the
        last), and `<out>/accuracy.json`: train and validation accuracy at each saved epoch.

        Why not ModelCheckpoint: it writes Lightning checkpoints (optimizer state, loops, hyperparameters
        around a `model.`-prefixed state dict), saves on a period rather than at a list of epochs, and never
        before training; the attack wants `torch.save(model.state_dict())` of the untrained network too.
        Epoch 0 is the validation run before `fit`; epoch N the one at the end of the N-th epoch."""

        def __init__(self, out: Path, save_epochs: list, epochs: int):
            self.out, self.epochs = out, epochs
            self.save_epochs = {e for e in save_epochs if e != FINAL}
            self.final = FINAL in save_epochs
            self.saved: list[dict] = []

        def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            epoch = 0 if trainer.state.fn == "validate" else trainer.current_epoch + 1
            names = [f"epoch_{epoch}.pt"] * (epoch in self.save_epochs) + ["final.pt"] * (self.final and epoch == self.epochs)
            if not names:
                return
            state = {name: tensor.detach().cpu().clone() for name, tensor in module.model.state_dict().items()}
            for name in names:
                torch.save(state, self.out / name)
            metrics = trainer.callback_metrics
            self.saved.append({"epoch": epoch, "files": names,
                               **{key: round(float(metrics[key]), 6) for key in module.SPLITS}})
            (self.out / "accuracy.json").write_text(json.dumps(self.saved, indent=1) + "\n")
            log.info("epoch %d: train accuracy %.3f, val accuracy %.3f -> %s", epoch, self.saved[-1]["train_accuracy"],
                     self.saved[-1]["val_accuracy"], ", ".join(str(self.out / n) for n in names))

    return SaveVictim


def train(cfg: DictConfig, out: str | Path) -> list[dict]:
    """Train the victim of `cfg` and save it into `out`; the accuracy at each saved epoch (accuracy.json)."""
    check_settings(cfg)
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from lightning_idlg.case.model import make_victim

    from lightning_idlg.run.quiet import quiet_lightning

    quiet_lightning(logging.WARNING, filters=False)  # their banners (GPU available: ...), set on import
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_set, val_set, full = splits(cfg)
    c, h, _ = full.shape
    model = make_victim(instantiate(cfg.model.factory), instantiate(cfg.model.init), in_channels=c, image_size=h,
                        num_classes=full.num_classes, seed=cfg.seed)
    module = _victim_training_module()(model, full.num_classes, cfg.lr, cfg.momentum, cfg.weight_decay)
    saver = _save_victim_callback()(out, list(cfg.save_epochs), cfg.epochs)
    pl.seed_everything(cfg.seed, verbose=False)  # the order of the training batches
    evaluation = [DataLoader(data, batch_size=cfg.batch_size) for data in (train_set, val_set)]
    # a last batch of one image would give BatchNorm a single value per channel where the map is 1x1
    batches = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=len(train_set) > cfg.batch_size)
    trainer = pl.Trainer(**OmegaConf.to_container(cfg.trainer), max_epochs=cfg.epochs, callbacks=[saver], logger=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         enable_progress_bar=bool(cfg.progress_bar))
    trainer.validate(module, dataloaders=evaluation, verbose=False)  # epoch 0: the network before training
    if cfg.epochs > 0:
        trainer.fit(module, train_dataloaders=batches, val_dataloaders=evaluation)
    return saver.saved


def attack_command(path: Path) -> str:
    """The app's command line that attacks the saved victim: this run's data set and model overrides and the
    checkpoint's path."""
    choices = HydraConfig.get().runtime.choices
    keys = [o for o in HydraConfig.get().overrides.task
            if o.lstrip("+~").startswith(("dataset.", "model.")) and not o.lstrip("+~").startswith("model.init")]
    return " ".join(["lightning-idlg", f"dataset={choices['dataset']}", f"model={choices['model']}", *keys,
                     "model/init=checkpoint", f"model.init.path={path}"])


@hydra.main(version_base="1.3", config_path="pkg://lightning_idlg.configs", config_name="train")
def app(cfg: DictConfig) -> list[dict]:
    from hydra.errors import InstantiationException

    from lightning_idlg.app import fail
    from lightning_idlg.run.quiet import quiet_lightning

    quiet_lightning()
    out = HydraConfig.get().runtime.output_dir
    try:
        saved = train(cfg, out)
    except InstantiationException as err:  # a loader's or model's own one-line message
        if not isinstance(err.__cause__, (ConfigError, FileNotFoundError, ValueError)):
            raise
        fail(err.__cause__)
    except (ConfigError, FileNotFoundError) as err:
        fail(err)
    log.info("attack it: %s", attack_command(Path(out) / saved[-1]["files"][-1]))
    return saved


def main() -> None:
    app()


if __name__ == "__main__":
    main()
