"""Fitting an attack: the attack of configs/attack/<name>.yaml, assembled from its parts, on one group of
trials (their SharedGradient), and its Lightning Trainer run; one optimizer step is one training step."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_idlg.attacks.inversion import GradientInversion
from lightning_idlg.attacks.result import AttackResult
from lightning_idlg.case.client import SharedGradient
from lightning_idlg.case.plan import Trial


@dataclass(frozen=True)
class Attack:
    """One attack of the run, built once from the config: its node (configs/attack/<name>.yaml), the run's
    optimizer unless the attack brings its own, the Trainer's settings, and the snapshot settings. Each
    group gets a GradientInversion of its own, with fresh parts (a part may hold state of its attack, and
    Lightning moves a module's parts with it, e.g. to float64)."""

    name: str
    node: DictConfig
    optimizer: DictConfig | None
    trainer: DictConfig
    snapshot_every: int
    progress_trials: int

    @classmethod
    def from_config(cls, cfg: DictConfig, name: str) -> "Attack":
        node = cfg.attack[name]
        optimizer = None if node.get("optimizer") is not None else cfg.optimizer
        return cls(name, node, optimizer, cfg.trainer, int(cfg.snapshot_every), int(cfg.progress_trials))

    def fit(self, shared: SharedGradient, group: list[Trial], logger, callbacks, trainer_args: dict | None = None,
            **slots) -> tuple[GradientInversion, pl.Trainer]:
        """Build the attack on the trials `group` (the group, or continuous batching's first trials: `slots`
        are GradientInversion's refill, on_finish, tokens and queued) and run its Trainer."""
        optimizer = {} if self.optimizer is None else {"optimizer": instantiate(self.optimizer)}
        attack: GradientInversion = instantiate(self.node)(
            shared=shared,
            name=self.name,
            dummy_seeds=[t.dummy_seed for t in group],
            snapshot_every=self.snapshot_every,
            snapshot_trials=sum(t.index < self.progress_trials for t in group),
            **optimizer,
            **slots,
        )
        trainer = instantiate(self.trainer, max_steps=attack.max_steps,
                              logger=logger if logger is not None else False, callbacks=callbacks,
                              **(trainer_args or {}))
        trainer.fit(attack)
        return attack, trainer

    def run(self, shared: SharedGradient, group: list[Trial], logger, callbacks,
            trainer_args: dict | None = None) -> tuple[AttackResult, int]:
        """(what the attacker ends with, the steps the group took)."""
        attack, _ = self.fit(shared, group, logger, callbacks, trainer_args)
        return attack.result(), int(attack.steps_used.max())


def attack_batch(cfg: DictConfig, method: str, shared: SharedGradient, batch: list[Trial], logger, callbacks,
                 trainer_args: dict | None = None) -> tuple[AttackResult, int]:
    """`Attack.run` of the attack `method` that `cfg` builds (for the Python API, a script or a test)."""
    return Attack.from_config(cfg, method).run(shared, batch, logger, callbacks, trainer_args)
