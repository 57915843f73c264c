"""The client side of one group of trials: their private images, their victims, and what each client shares
(its defense applied): the SharedGradient the attack receives, the PrivateBatch only evaluation reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from lightning_idlg.case.client import Client, PrivateBatch, SharedGradient, share_one_network, stack_victims
from lightning_idlg.case.dataset import TrialImages
from lightning_idlg.case.defense import Defense, compose
from lightning_idlg.case.model import make_victim
from lightning_idlg.case.plan import Trial
from lightning_idlg.errors import instantiate_part


@dataclass(frozen=True)
class ClientSide:
    """The run's client side, built once: the data set, how a trial's victim is built (`model.factory`,
    `model.init`), the client (`client`) and its defense (`defense`)."""

    dataset: TrialImages
    factory: Callable[..., nn.Module]
    init: Callable[[nn.Module], nn.Module]
    client: Client
    defense: Defense

    @classmethod
    def from_config(cls, cfg: DictConfig, dataset: TrialImages) -> "ClientSide":
        return cls(dataset, *client_parts(cfg))

    def victim(self, seed: int) -> nn.Module:
        c, h, _ = self.dataset.shape
        return make_victim(self.factory, self.init, in_channels=c, image_size=h,
                           num_classes=self.dataset.num_classes, seed=seed)

    def share(self, group: list[Trial]) -> tuple[PrivateBatch, SharedGradient, dict[str, torch.Tensor]]:
        """(private, shared, cost) of the group's clients: cost is the defense's price per trial (cosine
        similarity and relative error of the shared gradient against the true one), for evaluation only."""
        pairs = [[self.dataset[i] for i in t.images] for t in group]
        private = PrivateBatch(torch.stack([torch.stack([image for image, _ in p]) for p in pairs]),
                               torch.tensor([[label for _, label in p] for p in pairs]), [t.index for t in group])
        if self.init.one_network:  # a checkpoint: one network, viewed K times
            victim = self.victim(0)
            weights, buffers = share_one_network(victim, len(group))
        else:  # the paper: a fresh network per trial
            victims = [self.victim(t.victim_seed) for t in group]
            victim = victims[0]
            weights, buffers = stack_victims(victims)
        shared, cost = self.client.share(victim, weights, buffers, private, self.dataset.num_classes, self.defense,
                                         [t.defense_seed for t in group])
        return private, shared, cost


def prepare_batch(cfg: DictConfig, dataset: TrialImages, batch: list[Trial]):
    """`ClientSide.share` of the parts `cfg` builds (for a script or a test that shares one group)."""
    return ClientSide.from_config(cfg, dataset).share(batch)


def client_parts(cfg: DictConfig) -> tuple[Callable[..., nn.Module], Callable[[nn.Module], nn.Module], Client, Defense]:
    """(victim factory, victim init, client, defense) of `cfg`, built in the order a bad setting is reported:
    the client, the victim's init, the defenses (each part's own one-line error)."""
    client, init = instantiate_part(cfg.client), instantiate_part(cfg.model.init)
    return instantiate(cfg.model.factory), init, client, make_defense(cfg)


def make_defense(cfg: DictConfig) -> Defense:
    """The client's defenses (defense=..., a list applies them in order) as one transform."""
    return compose({name: instantiate_part(node) for name, node in (cfg.get("defense") or {}).items()})
