"""Reconstruction metrics, computed after the attack against the private data (evaluation only).

One definition for everything we report:
- `mse`: mean squared error over all pixels on raw, unclamped values (the paper's fidelity measure; a
  diverged dummy gives huge or non-finite values, which is the point);
- `psnr`, `ssim`: torchmetrics on images clamped to [0, 1] (data_range 1), per image;
- `fidelity`: share of trials with MSE strictly below each threshold (the paper's Figure 1).
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

FIDELITY_THRESHOLDS = (0.01, 0.005, 0.001, 0.0005, 0.0001)


def mse(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K,) mean over C, H, W of (x' - x)^2 on raw values."""
    return ((reconstruction.double() - target.double()) ** 2).flatten(1).mean(1)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K,) PSNR in dB of x' clamped to [0, 1] against x; inf for a perfect reconstruction."""
    preds = _clamped(reconstruction)
    return torch.stack([
        peak_signal_noise_ratio(p[None], t[None], data_range=1.0) for p, t in zip(preds, target.float())
    ])


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K,) SSIM (Gaussian window 11, sigma 1.5; torchmetrics defaults) of x' clamped to [0, 1]."""
    preds = _clamped(reconstruction)
    return structural_similarity_index_measure(preds, target.float(), data_range=1.0, reduction="none")


def _clamped(images: torch.Tensor) -> torch.Tensor:
    # a diverged dummy may hold NaN; clamp does not remove it, nan_to_num maps it to 0 (black)
    return torch.nan_to_num(images.float(), nan=0.0).clamp(0.0, 1.0)


def fidelity(mses: list[float], thresholds=FIDELITY_THRESHOLDS) -> dict[str, float]:
    """{"0.01": share of MSE < 0.01, ...}; NaN MSE counts as a failure."""
    n = len(mses)
    return {_key(t): (sum(1 for m in mses if m < t) / n if n else float("nan")) for t in thresholds}


def _key(threshold: float) -> str:
    return repr(threshold) if threshold >= 1e-3 else f"{threshold:.4f}".rstrip("0")


def median(values: list[float]) -> float:
    """Median that keeps inf (a perfect PSNR) and skips NaN; NaN for no values."""
    finite_or_inf = sorted(v for v in values if not math.isnan(v))
    if not finite_or_inf:
        return float("nan")
    mid = len(finite_or_inf) // 2
    if len(finite_or_inf) % 2:
        return finite_or_inf[mid]
    return (finite_or_inf[mid - 1] + finite_or_inf[mid]) / 2


def match(reconstructions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(K, B) assignment for K clients of B samples ((K, B, C, H, W) each): order[k, j] is the
    reconstruction matched to private image j, the assignment of least total MSE (Hungarian method,
    scipy's linear_sum_assignment). A reconstruction's position carries no meaning (the gradient of a batch
    is invariant to its order), so metrics compare matched pairs. B = 1: all zeros."""
    k, b = targets.shape[:2]
    if b == 1:
        return torch.zeros(k, 1, dtype=torch.long)
    from scipy.optimize import linear_sum_assignment

    orders = []
    for rec, tgt in zip(reconstructions, targets):
        cost = ((rec.double().flatten(1)[:, None] - tgt.double().flatten(1)[None]) ** 2).mean(-1)  # (rec, tgt)
        cost = torch.nan_to_num(cost, nan=1e300, posinf=1e300)  # a diverged dummy matches last, never fails
        rows, cols = linear_sum_assignment(cost.numpy())
        order = torch.empty(b, dtype=torch.long)
        order[torch.as_tensor(cols)] = torch.as_tensor(rows)
        orders.append(order)
    return torch.stack(orders)
