"""The attack: a LightningModule whose "training" optimizes dummy data to match a shared gradient.

`GradientInversion` receives a `SharedGradient` (model, weights, gradients) and nothing else: the private
image and label never reach it (tests/test_threat_model.py). It attacks K trials at once; every trial has
its own victim weights, dummy, optimizer state and stopping, so results do not depend on K.

- DLG: optimize the dummy x' ~ N(0, 1) and dummy label logits l' ~ N(0, 1) jointly; label = argmax l'.
- iDLG: extract the label from the last layer's gradient first, then optimize x' only.

One Lightning training step is one optimizer step (an L-BFGS step runs up to max_iter evaluations through
the closure). A trial stops when D < tolerance (converged) or when its dummy or D is no longer finite or
|x'| exceeds `divergence_bound` (diverged), or after `steps` steps (not converged); when all K stopped,
training stops.

Beyond the paper (all off by default, on in the `*_improved` presets), per trial:
- `patience`: stop early (not converged) once D has not halved within `patience` steps: a trial that
  stalls (at D ~ 1e-6 as most successful ones do, or far above it) stops costing evaluations;
- `restarts`: a trial that diverges, or stalls with D still above `restart_distance`, starts again from a
  fresh draw of the dummy (the next draws of its own seed) with a fresh optimizer state and `steps` steps,
  at most `restarts` times; the record counts its restarts.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_idlg.client import SharedGradient
from lightning_idlg.errors import ConfigError
from lightning_idlg.labels import LABEL_RULES, extract_label
from lightning_idlg.objective import batched_distance
from lightning_idlg.victim import output_layer

METHODS = ("dlg", "idlg")
CONVERGED, NOT_CONVERGED, DIVERGED = "converged", "not_converged", "diverged"


@dataclass
class AttackResult:
    """What the attacker ends with, per trial (K rows). Snapshots: step -> (S, C, H, W) dummies of the
    first S trials, taken every `snapshot_every` steps (step 0 is the initial draw)."""

    method: str
    dummy: torch.Tensor
    predicted_label: torch.Tensor
    distance: torch.Tensor
    status: list[str]
    steps: torch.Tensor
    evaluations: torch.Tensor
    seconds: float
    restarts: torch.Tensor
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)


class GradientInversion(pl.LightningModule):
    def __init__(self, shared: SharedGradient, method: str = "idlg",
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, steps: int = 300,
                 tolerance: float = 1e-6, divergence_bound: float = 1e4, label_rule: str = "weight_sum",
                 dummy_seeds: list[int] | None = None, snapshot_every: int = 10, snapshot_trials: int = 0,
                 patience: int | None = None, restarts: int = 0, restart_distance: float = 1e-2):
        super().__init__()
        if method not in METHODS:
            raise ConfigError(f"method={method!r} is not known; valid: {', '.join(METHODS)}")
        if label_rule not in LABEL_RULES:
            raise ConfigError(f"label_rule={label_rule!r} is not known; valid: {', '.join(LABEL_RULES)}")
        if not isinstance(shared, SharedGradient):
            raise TypeError("GradientInversion takes a SharedGradient record (what the client shared) only")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise ConfigError(f"patience must be null or a positive integer, got {patience!r}")
        if not isinstance(restarts, int) or restarts < 0:
            raise ConfigError(f"restarts must be a non-negative integer, got {restarts!r}")
        self.automatic_optimization = False  # the closure is ours: it returns one D per trial
        self.patience, self.max_restarts, self.restart_distance = patience, restarts, restart_distance
        self.method, self.label_rule = method, label_rule
        self.steps, self.tolerance, self.divergence_bound = steps, tolerance, divergence_bound
        self.snapshot_every, self.snapshot_trials = snapshot_every, snapshot_trials
        self.optimizer_factory = optimizer
        k = shared.trials
        self.model = copy.deepcopy(shared.model).requires_grad_(False)
        self._names = {"weight": list(shared.weights)}
        for i, name in enumerate(self._names["weight"]):
            self.register_buffer(f"weight_{i}", shared.weights[name].clone())
        self.num_classes = shared.num_classes
        self._distance = batched_distance(self.model, shared.input_shape)
        # what D compares against: the shared gradients, prepared once (the head's factored where it can be)
        targets = self._distance.prepare(shared.gradients)
        self._names["target"] = list(targets)
        for i, name in enumerate(self._names["target"]):
            self.register_buffer(f"target_{i}", targets[name].clone())

        seeds = dummy_seeds if dummy_seeds is not None else list(range(k))
        self.dummy_seeds = list(seeds)
        dummy, logits = _draw_dummies(seeds, shared.input_shape, shared.num_classes)
        self.dummy = nn.Parameter(dummy)
        if method == "dlg":
            self.dummy_label = nn.Parameter(logits)
        else:
            self.register_buffer("label", self._extract_label(shared))

        self.register_buffer("distance", torch.full((k,), float("inf")))
        self.register_buffer("steps_used", torch.zeros(k, dtype=torch.long))
        self.register_buffer("converged", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("diverged", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("stopped", torch.zeros(k, dtype=torch.bool))  # out of steps, or stalled
        self.register_buffer("attempt_steps", torch.zeros(k, dtype=torch.long))  # steps since the last (re)start
        self.register_buffer("restarts", torch.zeros(k, dtype=torch.long))
        # patience: the distance D last halved to, and the attempt step when that happened
        self.register_buffer("anchor_distance", torch.full((k,), float("inf")))
        self.register_buffer("anchor_step", torch.zeros(k, dtype=torch.long))
        self.snapshots: dict[int, torch.Tensor] = {}
        self._gathered: dict[tuple, tuple[dict, dict]] = {}  # see _held_rows
        self.gathers = 0
        self._started = 0.0
        self.seconds = 0.0
        self.evaluations = torch.zeros(k, dtype=torch.long)

    # what the attacker holds -------------------------------------------------------------------------
    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"{prefix}_{i}") for i, name in enumerate(self._names[prefix])}

    def _extract_label(self, shared: SharedGradient) -> torch.Tensor:
        name, layer = output_layer(shared.model)
        weight = shared.gradients[f"{name}.weight"]
        bias = shared.gradients.get(f"{name}.bias") if layer.bias is not None else None
        return extract_label(weight, bias, self.label_rule)

    @property
    def predicted_label(self) -> torch.Tensor:
        if self.method == "dlg":
            return self.dummy_label.detach().argmax(dim=-1)
        return self.label

    def label_probs(self, rows: torch.Tensor) -> torch.Tensor:
        if self.method == "dlg":
            return torch.softmax(self.dummy_label[rows], dim=-1)
        return nn.functional.one_hot(self.label[rows], self.num_classes).to(self.dummy.dtype)

    def objective(self, rows: torch.Tensor) -> torch.Tensor:
        """D for the trials `rows`, differentiable w.r.t. their dummies."""
        if rows.numel() == self.dummy.shape[0]:  # all trials: views, no copy
            rows = slice(None)
            weights, targets = self._tensors("weight"), self._tensors("target")
        else:
            weights, targets = self._held_rows(rows)
        return self._distance(weights, targets, self.dummy[rows], self.label_probs(rows))

    def _held_rows(self, rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The victims' weights and the targets of `rows`, gathered once per set of rows and kept for the
        last two sets: the trials being evaluated change only when one ends its step or its attack, and
        gathering anew for every evaluation (LFW's output layer: 17.6 MB per trial) took half of LFW's
        time once some trials had converged."""
        key = (self.dummy.device, tuple(rows.tolist()))
        if key not in self._gathered:
            self._gathered = {k: v for k, v in list(self._gathered.items())[-1:]}
            self._gathered[key] = ({n: w[rows] for n, w in self._tensors("weight").items()},
                                   {n: g[rows] for n, g in self._tensors("target").items()})
            self.gathers += 1
        return self._gathered[key]

    # Lightning -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [self.dummy] + ([self.dummy_label] if self.method == "dlg" else [])
        return self.optimizer_factory(params)

    @property
    def max_steps(self) -> int:
        """Steps a batch may take: `steps` per attempt, a restarted trial has `restarts` more attempts."""
        return self.steps * (1 + self.max_restarts)

    def train_dataloader(self):
        # The data is the shared gradient, held by the module; the loader only paces the steps.
        return DataLoader(range(self.max_steps), batch_size=None)

    def on_train_start(self) -> None:
        self._started = time.perf_counter()
        self._snapshot(0)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        raw = optimizer.optimizer

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            rows = raw.evaluating.nonzero().squeeze(1)
            distance = torch.zeros(raw.trials, device=self.device, dtype=self.dummy.dtype)
            if rows.numel():
                d = self.objective(rows)
                # non-finite trials are frozen below; keep their NaN out of the backward pass
                self.manual_backward(torch.where(torch.isfinite(d), d, torch.zeros_like(d)).sum())
                distance[rows] = d.detach()
            return distance

        running = raw.active.clone()
        distance = optimizer.step(closure=closure)
        self.distance = torch.where(running, distance, self.distance)
        self.steps_used += running.long()
        self.attempt_steps += running.long()
        self._update_status(running)
        self._restart(raw)
        raw.active = ~(self.converged | self.diverged | self.stopped)
        step = self.global_step
        if self.snapshot_every and step % self.snapshot_every == 0:
            self._snapshot(step)
        if not raw.active.any():
            self.trainer.should_stop = True
        return None

    def _update_status(self, running: torch.Tensor) -> None:
        flat = self.dummy.detach().flatten(1)
        finite = torch.isfinite(self.distance) & torch.isfinite(flat).all(1)
        blown_up = flat.abs().amax(1) > self.divergence_bound
        if self.method == "dlg":
            finite &= torch.isfinite(self.dummy_label.detach()).all(1)
        self.diverged |= running & (~finite | blown_up)
        self.converged |= running & ~self.diverged & (self.distance < self.tolerance)
        open_ = running & ~self.diverged & ~self.converged
        if self.patience is not None:
            halved = open_ & (self.distance < 0.5 * self.anchor_distance)
            self.anchor_distance = torch.where(halved, self.distance, self.anchor_distance)
            self.anchor_step = torch.where(halved, self.attempt_steps, self.anchor_step)
            self.stopped |= open_ & (self.attempt_steps - self.anchor_step >= self.patience)
        self.stopped |= open_ & (self.attempt_steps >= self.steps)

    def _restart(self, raw) -> None:
        """Trials that diverged, or stopped with D >= restart_distance, and have restarts left: a fresh
        dummy (the next draw of the trial's own seed), a fresh optimizer state, `steps` more steps."""
        if not self.max_restarts:
            return
        failed = self.diverged | (self.stopped & ~(self.distance < self.restart_distance))
        again = failed & (self.restarts < self.max_restarts)
        if not again.any():
            return
        rows = again.nonzero().squeeze(1)
        self.restarts[rows] += 1
        for row in rows.tolist():
            dummy, logits = _draw_dummies([self.dummy_seeds[row]], tuple(self.dummy.shape[1:]), self.num_classes,
                                          attempt=int(self.restarts[row]))
            with torch.no_grad():
                self.dummy[row] = dummy[0].to(self.dummy)
                if self.method == "dlg":
                    self.dummy_label[row] = logits[0].to(self.dummy_label)
        for flag in (self.diverged, self.stopped):
            flag[rows] = False
        self.attempt_steps[rows] = 0
        self.anchor_distance[rows] = float("inf")
        self.anchor_step[rows] = 0
        self.distance[rows] = float("inf")
        raw.reset(again)

    def _snapshot(self, step: int) -> None:
        if self.snapshot_trials:
            self.snapshots[step] = self.dummy.detach()[: self.snapshot_trials].cpu().clone()

    def on_train_end(self) -> None:
        self.seconds = time.perf_counter() - self._started
        self.evaluations = self.optimizers().optimizer.evaluations.cpu()
        self._gathered = {}  # copies of the victims' weights: free them with the attack done
        if self.snapshot_every and self.snapshot_trials:
            # a batch that stopped early keeps its final dummies: fill the later slots with them
            final = self.dummy.detach()[: self.snapshot_trials].cpu().clone()
            for step in range(0, self.steps + 1, self.snapshot_every):
                self.snapshots.setdefault(step, final)

    def result(self) -> AttackResult:
        status = [DIVERGED if d else CONVERGED if c else NOT_CONVERGED
                  for c, d in zip(self.converged.tolist(), self.diverged.tolist())]
        return AttackResult(
            method=self.method,
            dummy=self.dummy.detach().cpu().clone(),
            predicted_label=self.predicted_label.cpu(),
            distance=self.distance.cpu(),
            status=status,
            steps=self.steps_used.cpu(),
            evaluations=self.evaluations,
            seconds=self.seconds,
            snapshots=self.snapshots,
            restarts=self.restarts.cpu(),
        )


def _draw_dummies(seeds: list[int], input_shape: tuple[int, ...], num_classes: int, attempt: int = 0):
    """x' ~ N(0, 1) and l' ~ N(0, 1), each trial from its own seed (independent of the batch it runs in);
    restart number `attempt` takes the (attempt + 1)-th draw of the same generator."""
    dummies, logits = [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(int(seed))
        for _ in range(attempt + 1):
            dummy, logit = torch.randn(input_shape, generator=g), torch.randn(num_classes, generator=g)
        dummies.append(dummy)
        logits.append(logit)
    return torch.stack(dummies), torch.stack(logits)
