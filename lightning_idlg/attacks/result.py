"""What an attack ends with, per trial: the attacker's reconstruction, its label, its objective and costs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttackResult:
    """What the attacker ends with, per trial (K rows of B samples). Snapshots: step -> (S, B, C, H, W)
    dummies of the first S trials, taken every `snapshot_every` steps (step 0 is the initial draw)."""

    method: str
    dummy: torch.Tensor            # (K, B, C, H, W)
    predicted_label: torch.Tensor  # (K, B)
    distance: torch.Tensor
    status: list[str]
    steps: torch.Tensor
    evaluations: torch.Tensor
    seconds: float
    restarts: torch.Tensor
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
