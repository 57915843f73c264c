"""The run's parts, built once from its config, before any data is loaded, so that a bad setting of the
client, a defense, the victim's init or an attack's parts fails in one line at once (label strategies also
check the client batch). The loops then take these objects instead of the config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from omegaconf import DictConfig
from torch import nn

from lightning_idlg.attacks.fit import Attack
from lightning_idlg.case.client import Client
from lightning_idlg.case.dataset import TrialImages
from lightning_idlg.case.defense import Defense
from lightning_idlg.case.share import ClientSide, client_parts
from lightning_idlg.errors import instantiate_part
from lightning_idlg.records.evaluate import Evaluation

ATTACK_PARTS = ("label_strategy", "stopping", "dummy", "objective")  # checked here; each group gets fresh ones


@dataclass(frozen=True)
class Parts:
    """factory and init: a trial's victim (`model`); client and defense: what it shares (`client`, `defense`);
    attacks: name -> Attack (`attack`, in config order: attack=both is dlg, then idlg); evaluation: how its
    records are made (`metrics`, the record's axes)."""

    factory: Callable[..., nn.Module]
    init: Callable[[nn.Module], nn.Module]
    client: Client
    defense: Defense
    attacks: dict[str, Attack]
    evaluation: Evaluation

    @classmethod
    def build(cls, cfg: DictConfig) -> "Parts":
        parts = cls(*client_parts(cfg), {name: Attack.from_config(cfg, name) for name in cfg.attack},
                    Evaluation.from_config(cfg))
        for node in cfg.attack.values():
            for part in (instantiate_part(node[p]) for p in ATTACK_PARTS if node.get(p)):
                if hasattr(part, "check") and hasattr(part, "learned"):  # a label strategy
                    part.check(int(cfg.client.batch_size))
        return parts

    @property
    def methods(self) -> list[str]:
        return list(self.attacks)

    def client_side(self, dataset: TrialImages) -> ClientSide:
        return ClientSide(dataset, self.factory, self.init, self.client, self.defense)

