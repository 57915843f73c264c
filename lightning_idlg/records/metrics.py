"""Reconstruction metrics, computed after the attack against the private data (evaluation only).

One definition for everything we report:
- `mse`: mean squared error over all pixels on raw, unclamped values (the paper's fidelity measure; a
  diverged dummy gives huge or non-finite values, which is the point);
- `psnr`: 10 log10(1 / MSE) of images clamped to [0, 1], in float64, per image;
- `ssim`: torchmetrics on images clamped to [0, 1] (data_range 1), per image;
- `lpips` (optional, `metrics.lpips=alex|vgg|squeeze`): torchmetrics' LPIPS of x' clamped to [0, 1]
  against x, both mapped to LPIPS' [-1, 1] (`normalize=True`); lower is more alike, 0 for identical images;
- `fidelity`: share of trials with MSE strictly below each threshold (the paper's Figure 1).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from lightning_idlg.errors import ConfigError

FIDELITY_THRESHOLDS = (0.01, 0.005, 0.001, 0.0005, 0.0001)
# metrics.lpips=<backbone>: the torchvision weights enum whose ImageNet weights LPIPS' backbone loads (the
# linear layers on top ship inside torchmetrics: functional/image/lpips_models/<backbone>.pth)
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}
# AlexNet's strides leave nothing of an image under 31 pixels (28 x 28 MNIST fails in its second max-pool);
# smaller images are upsampled to this size for every backbone, so that backbones see the same input
LPIPS_MIN_SIZE = 32


def mse(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K,) mean over C, H, W of (x' - x)^2 on raw values."""
    return ((reconstruction.double() - target.double()) ** 2).flatten(1).mean(1)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K,) PSNR in dB of x' clamped to [0, 1] against x, 10 log10(1 / MSE), in float64 as `mse`; inf for a
    perfect reconstruction. Written out: torchmetrics' `peak_signal_noise_ratio` takes log(10) in the default
    dtype, float64 inside a 64-true fit (where continuous batching records a trial) and float32 after it, so
    the same reconstruction got two PSNRs 3e-7 apart."""
    return 10 * torch.log10(1.0 / mse(clamped(reconstruction, torch.float64), target))


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(K,) SSIM (Gaussian window 11, sigma 1.5; torchmetrics defaults) of x' clamped to [0, 1]."""
    preds = clamped(reconstruction)
    return structural_similarity_index_measure(preds, target.float(), data_range=1.0, reduction="none")


def lpips(reconstruction: torch.Tensor, target: torch.Tensor, metric) -> torch.Tensor:
    """(K,) LPIPS of x' clamped to [0, 1] against x, by `metric` (`lpips_metric`: torchmetrics'
    LearnedPerceptualImagePatchSimilarity, reduction "none", normalize=True, which maps [0, 1] to LPIPS'
    [-1, 1]). The images go through `lpips_input` first: grayscale (MNIST, digits) repeated to 3 channels
    and images under 32 x 32 upsampled, since LPIPS' backbones are ImageNet RGB networks. Computed on the
    CPU: the images are small, and evaluation should not hold accelerator memory."""
    preds = lpips_input(clamped(reconstruction.detach().cpu()))
    truth = lpips_input(target.detach().cpu().float().clamp(0.0, 1.0))
    metric.reset()
    metric.update(preds, truth)
    scores = metric.compute().reshape(-1)
    metric.reset()  # the metric is cached across batches: hold no images
    return scores


def lpips_input(images: torch.Tensor) -> torch.Tensor:
    """(K, 3, H', W') images in [0, 1] as LPIPS' backbones take them: one channel repeated to RGB (a gray
    image is R = G = B), and sides under LPIPS_MIN_SIZE upsampled bilinearly to it."""
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    if min(images.shape[-2:]) < LPIPS_MIN_SIZE:
        size = [max(s, LPIPS_MIN_SIZE) for s in images.shape[-2:]]
        images = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0)


def lpips_weights(net: str) -> tuple[Path, str]:
    """(where torchvision looks for the backbone's ImageNet weights, where they come from):
    `torch.hub.get_dir()` ($TORCH_HOME/hub, default ~/.cache/torch/hub) / checkpoints / the URL's file name."""
    import torchvision

    url = getattr(torchvision.models, LPIPS_BACKBONES[net]).DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def check_lpips(net) -> None:
    """One-line ConfigError, before any attack, unless `net` is off (false / null) or a backbone whose
    weights are on disk: torchvision would otherwise try to download them mid-run (no network here: an
    error after the attacks), and skipping the metric silently would leave records without it."""
    if net in (False, None):
        return
    if net not in LPIPS_BACKBONES:
        raise ConfigError(f"metrics.lpips={net!r} is not known; valid: false, {', '.join(LPIPS_BACKBONES)}")
    path, url = lpips_weights(net)
    if not path.is_file():
        builder = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}[net]
        raise ConfigError(
            f"metrics.lpips={net} needs the backbone's ImageNet weights {path} (missing); on a machine with "
            f"internet run `python -c \"import torchvision; torchvision.models.{builder}(weights='DEFAULT')\"` "
            f"(or download {url}) and copy the file to {path} (set TORCH_HOME to choose the folder), "
            "or run with metrics.lpips=false")


def lpips_metric(net: str):
    """The LPIPS metric of backbone `net` (checked by `check_lpips`), built once per process and weights
    file: loading a backbone takes a moment, and evaluation asks for it every batch."""
    check_lpips(net)
    return _lpips_metric(net, str(lpips_weights(net)[0]))


@lru_cache(maxsize=None)
def _lpips_metric(net: str, weights: str):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    return LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)


def clamped(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # a diverged dummy may hold NaN; clamp does not remove it, nan_to_num maps it to 0 (black)
    return torch.nan_to_num(images.to(dtype), nan=0.0).clamp(0.0, 1.0)


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
