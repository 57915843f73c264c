"""Pictures of reconstructions, written with torchvision's image utilities.

- `trial_NNNNN.png`: one row, ground truth | DLG | iDLG (the methods that ran, in that order);
- `progress_NNNNN.png`: one row per method, a snapshot every `snapshot_every` steps from step 0 (the
  random draw) to the last step (the paper's Figure 2).
Reconstructions are shown clamped to [0, 1], the domain the metrics use; NaN shows black.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from lightning_idlg.metrics import _clamped


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def save_trial_picture(path: Path, truth: torch.Tensor, reconstructions: list[torch.Tensor]) -> None:
    """truth (C, H, W) beside each method's reconstruction (C, H, W)."""
    row = _to_rgb(_clamped(torch.stack([truth, *reconstructions])))
    save_image(make_grid(row, nrow=len(row), padding=2, pad_value=1.0), path)


def save_progress_strip(path: Path, rows: list[list[torch.Tensor]]) -> None:
    """rows[m][s]: method m's dummy (C, H, W) at snapshot s; all rows equally long."""
    width = len(rows[0])
    images = _to_rgb(_clamped(torch.stack([img for row in rows for img in row])))
    save_image(make_grid(images, nrow=width, padding=2, pad_value=1.0), path)
