"""DLG and iDLG written the way the papers' scripts write them, one trial at a time, with nothing of the
engine's attack code: the paper's LeNet and its U(-0.5, 0.5) init, the shared gradient by plain autograd,
`torch.optim.LBFGS` (lr 1, PyTorch's defaults) on a closure whose D is the double-backprop sum of squared
gradient differences, and the stopping rules of the paper protocol checked after every step (converged:
D < tolerance; diverged: D or x' not finite, or max |x'| > the divergence bound; else out of steps).

tests/run/test_regression.py runs the app and this on the same trials and compares the records. The two take
different routes through the arithmetic (the engine batches K trials with vmap, factors the head's
rank-one gradient, writes its own L-BFGS over a trial axis; this is per trial and unfactored), so they
already differ by rounding on any one CPU: a check that holds between them holds on every CPU, while a
change of the engine's objective or optimizer shows as a different trajectory."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


class PaperLeNet(nn.Module):
    """The LeNet of the DLG / iDLG scripts: three 5x5 convolutions (stride 2, 2, 1, padding 2, 12 channels),
    sigmoid, no pooling, one Linear layer."""

    def __init__(self, channel: int, side: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channel, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), nn.Sigmoid(),
        )
        hidden = 12 * (-(-side // 4)) ** 2
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def paper_victim(seed: int, channel: int, side: int, num_classes: int) -> PaperLeNet:
    """The scripts' `weights_init`: every weight, then bias, of every layer re-drawn from U(-0.5, 0.5)."""
    torch.manual_seed(seed)
    net = PaperLeNet(channel, side, num_classes)

    def weights_init(m):
        if hasattr(m, "weight"):
            m.weight.data.uniform_(-0.5, 0.5)
        if hasattr(m, "bias"):
            m.bias.data.uniform_(-0.5, 0.5)

    net.apply(weights_init)
    return net


@dataclass
class Outcome:
    status: str
    steps: int
    evaluations: int
    predicted_label: int
    distance: float
    mse: float


def attack(method: str, net: nn.Module, image: torch.Tensor, label: int, dummy_seed: int, steps: int,
           tolerance: float = 1e-6, bound: float = 1e4, dtype: torch.dtype = torch.float32, max_iter: int = 20,
           line_search_fn: str | None = None) -> Outcome:
    """One trial of `method` (dlg | idlg) on `image` (C, H, W) in [0, 1] with its true `label`."""
    net = net.to(dtype)
    params = list(net.parameters())
    x = image[None].to(dtype)
    shared = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(x), torch.tensor([label])), params)]
    num_classes = shared[-1].shape[0]
    g = torch.Generator().manual_seed(int(dummy_seed))
    # the scripts' draw: x' then the label logits, float32, from the trial's own generator
    dummy = torch.randn(x.shape, generator=g, dtype=torch.float32).to(dtype).requires_grad_(True)
    logits = torch.randn((1, num_classes), generator=g, dtype=torch.float32).to(dtype).requires_grad_(True)
    if method == "idlg":  # iDLG's script: argmin over classes of the summed last-layer weight gradient
        restored = torch.argmin(torch.sum(shared[-2], dim=-1), dim=-1)
        probs, variables = F.one_hot(restored.view(1), num_classes).to(dtype), [dummy]
    else:
        probs, variables = None, [dummy, logits]
    calls, last = 0, None  # closure calls in this step; the point of the last one and its D

    def distance() -> torch.Tensor:
        p = torch.softmax(logits, dim=-1) if probs is None else probs
        loss = torch.mean(torch.sum(-p * F.log_softmax(net(dummy), dim=-1), dim=-1))
        dummy_grads = torch.autograd.grad(loss, params, create_graph=True)
        return sum(((a - b) ** 2).sum() for a, b in zip(dummy_grads, shared))

    def closure():
        nonlocal calls, last
        calls += 1
        optimizer.zero_grad()
        d = distance()
        d.backward()
        last = ([v.detach().clone() for v in variables], float(d.detach()))
        return d

    optimizer = torch.optim.LBFGS(variables, lr=1, max_iter=max_iter, line_search_fn=line_search_fn)
    evaluations, status, d = 0, "not_converged", float("nan")
    for step in range(1, steps + 1):
        calls = 0
        optimizer.step(closure)
        # the engine starts a step where the last one ended without evaluating that point again (torch
        # does), and evaluates a step's end point only where no evaluation was made there
        evaluations += calls - (step > 1)
        if all(torch.equal(a, v) for a, v in zip(last[0], variables)):
            d = last[1]
        else:
            with torch.enable_grad():
                d = float(distance().detach())
            evaluations += 1
        if not (math.isfinite(d) and torch.isfinite(dummy).all()) or dummy.abs().max() > bound:
            status = "diverged"
            break
        if d < tolerance:
            status = "converged"
            break
    predicted = int(restored) if method == "idlg" else int(logits.detach().argmax())
    mse = float(((dummy.detach().double() - x.double()) ** 2).mean())
    return Outcome(status, step, evaluations, predicted, d, mse)
