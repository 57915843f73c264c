"""The attack: a LightningModule whose "training" optimizes dummy data to match a shared gradient.

`GradientInversion` receives a `SharedGradient` (model, weights, gradients, buffers where shared) and the
attack's parts, and nothing else: the private images and labels never reach it
(tests/apps/test_app.py::test_the_attack_sees_only_the_shared_gradient). An attack is assembled from parts,
each a Hydra `_target_` node of configs/attack/<name>.yaml:
- `dummy`: where x' starts (lightning_idlg.attacks.dummy, e.g. N(0, 1) from each trial's seed);
- `label_strategy`: learned jointly with x' (DLG) or restored from the shared gradient first (iDLG; lightning_idlg.attacks.labels);
- `objective`: the gradient-matching distance D (lightning_idlg.attacks.objective, squared L2 with its fast routes);
- `regularizers`: terms of x' added to D with their weights (lightning_idlg.attacks.regularizers; none in DLG/iDLG);
- `optimizer`: per-trial optimizer factory (lightning_idlg.attacks.optimizer, L-BFGS in the paper);
- `stopping`: steps, tolerance, patience, restarts, which iterate is kept (lightning_idlg.attacks.stopping);
- `box`: the data's value range (lo, hi); x' is clamped into it after every step (Inverting Gradients), or
  null (DLG, iDLG).
So DLG and iDLG differ only in their `label_strategy` part, and a new attack is new parts and a YAML file
(Inverting Gradients: configs/attack/ig.yaml).

It attacks K trials at once; every trial has its own victim weights, client batch of B dummies, optimizer
state and stopping, so results do not depend on K. One Lightning training step is one optimizer step (an
L-BFGS step runs up to max_iter evaluations through the closure). A trial stops when the objective
< tolerance (converged), when its dummy or objective is no longer finite or |x'| exceeds the divergence
bound (diverged), or when it is out of steps or patience (not converged); a failed trial restarts from a
fresh draw of its own seed while it has restarts left; when all K stopped, training stops.

Continuous batching (`refill` and `on_finish`, lightning_idlg.run.continuous): the K rows are slots. A trial
that has stopped for good (no restarts left) is handed to `on_finish` at once, as a one-row AttackResult,
and its slot takes the next trial from `refill` (its own victim, shared gradient, label, dummy draw,
optimizer state and stopping counters), so no slot idles while trials are waiting; training stops when
`refill` has nothing left and every slot has handed its trial over. Nothing couples the rows, so a trial's
record is the one it gets alone (to rounding; tests/run/test_continuous.py compares in float64).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable, Mapping, Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_idlg.case.client import SharedGradient
from lightning_idlg.attacks.dummy import GaussianDummy
from lightning_idlg.errors import ConfigError
from lightning_idlg.attacks.labels import LabelStrategy
from lightning_idlg.attacks.objective import SquaredL2
from lightning_idlg.attacks.result import AttackResult
from lightning_idlg.attacks.slots import Arrival, Slots
from lightning_idlg.attacks.stopping import CONVERGED, DIVERGED, NOT_CONVERGED, Stopping


class GradientInversion(Slots, pl.LightningModule):
    def __init__(self, shared: SharedGradient, label_strategy: LabelStrategy,
                 optimizer: Callable[..., torch.optim.Optimizer], stopping: Stopping | None = None,
                 objective=None, dummy=None, regularizers: Mapping[str, Callable] | None = None,
                 name: str = "attack", dummy_seeds: list[int] | None = None, snapshot_every: int = 10,
                 snapshot_trials: int = 0, box: Sequence[float] | None = None,
                 refill: Callable[[], Arrival | None] | None = None,
                 on_finish: Callable[[Any, AttackResult], None] | None = None,
                 tokens: Sequence[Any] | None = None, queued: int = 0):
        super().__init__()
        if not isinstance(shared, SharedGradient):
            raise TypeError("GradientInversion takes a SharedGradient record (what the client shared) only")
        if optimizer is None:
            raise TypeError("GradientInversion needs an optimizer factory, e.g. "
                            "functools.partial(lightning_idlg.attacks.optimizer.BatchedLBFGS, lr=1.0)")
        label_strategy.check(shared.batch_size)
        self.automatic_optimization = False  # the closure is ours: it returns one objective per trial
        self.method, self.label_strategy = name, label_strategy
        self.stopping = stopping if stopping is not None else Stopping()
        self.dummy_part = dummy if dummy is not None else GaussianDummy()
        # a prior with weight 0 is off (not computed): e.g. Inverting Gradients' BatchNorm prior by default
        self.regularizers = {name: r for name, r in (regularizers or {}).items()
                             if r is not None and getattr(r, "weight", 1) != 0}
        self.box = _box(box)
        self.snapshot_every, self.snapshot_trials = snapshot_every, snapshot_trials
        self.optimizer_factory = optimizer
        k = self.trials = shared.trials
        self.batch_size, self.num_classes = shared.batch_size, shared.num_classes
        self.model = copy.deepcopy(shared.model).requires_grad_(False)
        self._names: dict[str, list[str]] = {}
        self._one_network: set[tuple[str, str]] = set()  # (prefix, name) held once for all trials
        self._store("weight", shared.weights)
        self._store("buffer", shared.buffers or {})
        objective = objective if objective is not None else SquaredL2()
        # an objective that simulates the client's local training (lightning_idlg.case.fedavg) also reads what the
        # server knows of it; every other objective is built as before
        extra = {"local": shared.local} if getattr(objective, "uses_local", False) else {}
        self._distance = objective.build(self.model, shared.input_shape, shared.batch_size, shared.reduction, **extra)
        # what D compares against: the shared gradients, prepared once (the head's factored where it can be)
        self._store("target", self._distance.prepare(shared.gradients))

        self.dummy_seeds = list(dummy_seeds) if dummy_seeds is not None else list(range(k))
        dummy, logits = self.dummy_part.draw(self.dummy_seeds, shared.input_shape, self.batch_size, self.num_classes)
        self.dummy = nn.Parameter(dummy)
        if label_strategy.learned:
            self.dummy_label = nn.Parameter(logits)
        else:
            self.register_buffer("label", label_strategy.restore(shared))
        for regularizer in self.regularizers.values():
            if hasattr(regularizer, "bind"):  # a prior on the victim's internals (BatchNormPrior)
                regularizer.bind(self.model, shared)

        self._register_trial_state(k)
        self.snapshots: dict[int, torch.Tensor] = {}
        self._init_slots(k, refill, on_finish, tokens, queued, snapshot_trials)
        self._gathered: dict[tuple, tuple[dict, dict, dict]] = {}  # see _held_rows
        self.gathers = 0
        self._started = 0.0
        self.seconds = 0.0
        self.evaluations = torch.zeros(k, dtype=torch.long)


    def _register_trial_state(self, k: int) -> None:
        """Each trial's stopping state (objective, steps, statuses, restarts, patience; the best iterate with
        keep=best), as buffers that move with the module."""
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
        if self.stopping.keep == "best":  # the lowest objective seen and the iterate it was measured at
            self.register_buffer("best_distance", torch.full((k,), float("inf")))
            self.register_buffer("best_dummy", self.dummy.detach().clone())
            if self.label_strategy.learned:
                self.register_buffer("best_label", self.dummy_label.detach().clone())

    # what the attacker holds -------------------------------------------------------------------------
    def _store(self, prefix: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Register `tensors` as buffers `<prefix>_<i>`; one network shared by all trials (an expanded
        view, stride 0 on the trial axis: a checkpoint) is kept once, not as K copies."""
        self._names[prefix] = list(tensors)
        for i, (name, t) in enumerate(tensors.items()):
            if t.dim() and t.shape[0] == self.trials and t.shape[0] > 1 and t.stride(0) == 0:
                self._one_network.add((prefix, name))
                t = t[:1]
            self.register_buffer(f"{prefix}_{i}", t.clone())

    def _tensors(self, prefix: str, rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """name -> (K, ...) or, with `rows`, (len(rows), ...): views where they can be, copies of rows else."""
        out = {}
        for i, name in enumerate(self._names[prefix]):
            t = getattr(self, f"{prefix}_{i}")
            n = self.trials if rows is None else rows.numel()
            if (prefix, name) in self._one_network:
                out[name] = t.expand(n, *t.shape[1:])
            else:
                out[name] = t if rows is None else t[rows]
        return out

    @property
    def predicted_label(self) -> torch.Tensor:
        """(K, B) labels: argmax of the learned logits, or the restored labels."""
        if self.label_strategy.learned:
            return self.dummy_label.detach().argmax(dim=-1)
        return self.label

    def label_probs(self, rows) -> torch.Tensor:
        if self.label_strategy.learned:
            return torch.softmax(self.dummy_label[rows], dim=-1)
        return nn.functional.one_hot(self.label[rows], self.num_classes).to(self.dummy.dtype)

    def objective(self, rows: torch.Tensor) -> torch.Tensor:
        """D (plus the weighted regularizers) for the trials `rows`, differentiable w.r.t. their dummies."""
        if rows.numel() == self.trials:  # all trials: views, no copy
            rows = slice(None)
            weights, targets, buffers = self._tensors("weight"), self._tensors("target"), self._tensors("buffer")
        else:
            weights, targets, buffers = self._held_rows(rows)
        x = self.dummy[rows]
        d = self._distance(weights, targets, x, self.label_probs(rows), buffers)
        for regularizer in self.regularizers.values():
            if getattr(regularizer, "uses_victim", False):
                d = d + regularizer(x, weights, buffers)
            else:
                d = d + regularizer(x)
        return d

    def _held_rows(self, rows: torch.Tensor):
        """The victims' weights, targets and buffers of `rows`, gathered once per set of rows and kept for
        the last two sets: the trials being evaluated change only when one ends its step or its attack, and
        gathering anew for every evaluation (LFW's output layer: 17.6 MB per trial) took half of LFW's
        time once some trials had converged."""
        key = (self.dummy.device, tuple(rows.tolist()))
        if key not in self._gathered:
            self._gathered = {k: v for k, v in list(self._gathered.items())[-1:]}
            self._gathered[key] = tuple(self._tensors(p, rows) for p in ("weight", "target", "buffer"))
            self.gathers += 1
        return self._gathered[key]

    # Lightning -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        return self.optimizer_factory([self.dummy] + ([self.dummy_label] if self.label_strategy.learned else []))

    @property
    def continuous(self) -> bool:
        return self.on_finish is not None

    @property
    def max_steps(self) -> int:
        """A bound on the optimizer steps: one trial's; continuous batching: a slot may run every trial
        that is queued after the group's own, one after the other."""
        return self.stopping.max_steps * (1 + self.queued)

    def train_dataloader(self):
        # The data is the shared gradient, held by the module; the loader only paces the steps.
        return DataLoader(range(self.max_steps), batch_size=None)

    def on_train_start(self) -> None:
        self._started = time.perf_counter()
        self._entered = [self._started] * self.trials
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
        keep_best = self.stopping.keep == "best"
        before = self._iterate() if keep_best and raw.measures_start else None
        distance = optimizer.step(closure=closure)
        self.distance = torch.where(running, distance, self.distance)
        if keep_best:  # where the returned objective was measured: the step's start (Adam) or end (L-BFGS)
            self._keep_best(running, distance, before if before is not None else self._iterate())
        if self.box is not None:
            with torch.no_grad():
                self.dummy.copy_(torch.where(running.view(-1, *[1] * (self.dummy.dim() - 1)),
                                             self.dummy.clamp(*self.box), self.dummy))
        self.steps_used += running.long()
        self.attempt_steps += running.long()
        self._update_status(running)
        self._restart(raw)
        step = self.global_step
        if self.continuous:
            self._snapshot_slots(running)
            self._hand_over(raw)
        elif self.snapshot_every and step % self.snapshot_every == 0:
            self._snapshot(step)
        raw.active = ~(self.converged | self.diverged | self.stopped)
        if not raw.active.any():
            self.trainer.should_stop = True
        return None

    def _iterate(self) -> tuple[torch.Tensor, ...]:
        """The point about to be evaluated: x' (and the label logits where they are learned)."""
        if self.label_strategy.learned:
            return self.dummy.detach().clone(), self.dummy_label.detach().clone()
        return (self.dummy.detach().clone(),)

    def _keep_best(self, running: torch.Tensor, distance: torch.Tensor, before: tuple[torch.Tensor, ...]) -> None:
        """stopping.keep=best: remember `before` (the point where `distance` was measured) for the trials whose
        objective is their lowest yet."""
        better = running & (distance < self.best_distance)
        self.best_distance = torch.where(better, distance, self.best_distance)
        mask = better.view(-1, *[1] * (self.dummy.dim() - 1))
        self.best_dummy = torch.where(mask, before[0], self.best_dummy)
        if self.label_strategy.learned:
            self.best_label = torch.where(better.view(-1, 1, 1), before[1], self.best_label)

    def _update_status(self, running: torch.Tensor) -> None:
        rules = self.stopping
        flat = self.dummy.detach().flatten(1)
        finite = torch.isfinite(self.distance) & torch.isfinite(flat).all(1)
        blown_up = flat.abs().amax(1) > rules.divergence_bound
        if self.label_strategy.learned:
            finite &= torch.isfinite(self.dummy_label.detach()).flatten(1).all(1)
        self.diverged |= running & (~finite | blown_up)
        if rules.tolerance is not None:
            self.converged |= running & ~self.diverged & (self.distance < rules.tolerance)
        open_ = running & ~self.diverged & ~self.converged
        if rules.patience is not None:
            halved = open_ & (self.distance < 0.5 * self.anchor_distance)
            self.anchor_distance = torch.where(halved, self.distance, self.anchor_distance)
            self.anchor_step = torch.where(halved, self.attempt_steps, self.anchor_step)
            self.stopped |= open_ & (self.attempt_steps - self.anchor_step >= rules.patience)
        self.stopped |= open_ & (self.attempt_steps >= rules.steps)

    def _restart(self, raw) -> None:
        """Trials that diverged, or stopped with D >= restart_distance, and have restarts left: a fresh
        dummy (the next draw of the trial's own seed), a fresh optimizer state, `steps` more steps."""
        rules = self.stopping
        if not rules.restarts:
            return
        if rules.restart_when == "always":
            failed = self.diverged | self.stopped | self.converged
        else:
            failed = self.diverged | (self.stopped & ~(self.distance < rules.restart_distance))
        again = failed & (self.restarts < rules.restarts)
        if not again.any():
            return
        rows = again.nonzero().squeeze(1)
        self.restarts[rows] += 1
        for row in rows.tolist():
            self._new_attempt(row, int(self.restarts[row]))
        raw.reset(again)

    def _new_attempt(self, row: int, attempt: int) -> None:
        """Trial `row` starts over: draw `attempt` of its dummy seed, stopping counters of an attempt reset."""
        dummy, logits = self.dummy_part.draw([self.dummy_seeds[row]], tuple(self.dummy.shape[2:]), self.batch_size,
                                             self.num_classes, attempt=attempt)
        with torch.no_grad():
            self.dummy[row] = dummy[0].to(self.dummy)
            if self.label_strategy.learned:
                self.dummy_label[row] = logits[0].to(self.dummy_label)
        for flag in (self.diverged, self.stopped, self.converged):
            flag[row] = False
        self.attempt_steps[row] = self.anchor_step[row] = 0
        self.distance[row] = self.anchor_distance[row] = float("inf")

    def _snapshot(self, step: int) -> None:
        if self.continuous:  # the trials' own steps (step 0: each slot's first draw)
            for row, kept in enumerate(self._slot_snapshots):
                if kept is not None:
                    kept[0] = self.dummy.detach()[row].cpu().clone()
        elif self.snapshot_trials:
            self.snapshots[step] = self.dummy.detach()[: self.snapshot_trials].cpu().clone()

    def on_train_end(self) -> None:
        self.seconds = time.perf_counter() - self._started
        raw = self.optimizers().optimizer
        self.evaluations = raw.evaluations.cpu()
        if self.continuous:  # stopped by Lightning (a step bound): what is still in a slot is handed over too
            self.stopped |= ~(self.converged | self.diverged | self.handed_over)
            self.refill = None
            self._hand_over(raw)
        self._gathered = {}  # copies of the victims' weights: free them with the attack done
        if self.snapshot_every and self.snapshot_trials:
            # a group that stopped early keeps its final dummies: fill the later slots with them
            final = self.dummy.detach()[: self.snapshot_trials].cpu().clone()
            for step in range(0, self.stopping.steps + 1, self.snapshot_every):
                self.snapshots.setdefault(step, final)

    def result(self) -> AttackResult:
        """The K trials' results (a fixed group; with continuous batching, on_finish had them one by one)."""
        return self._rows_result(list(range(self.trials)), self.evaluations, self.seconds)

    def _rows_result(self, rows: list[int], evaluations: torch.Tensor, seconds: float) -> AttackResult:
        status = [DIVERGED if d else CONVERGED if c else NOT_CONVERGED
                  for c, d in zip(self.converged[rows].tolist(), self.diverged[rows].tolist())]
        dummy, label, distance = self.dummy.detach()[rows], self.predicted_label[rows], self.distance[rows]
        if self.stopping.keep == "best":  # trials that never had a finite objective keep their last iterate
            found = torch.isfinite(self.best_distance[rows])
            dummy = torch.where(found.view(-1, *[1] * (dummy.dim() - 1)), self.best_dummy[rows], dummy)
            distance = torch.where(found, self.best_distance[rows], distance)
            if self.label_strategy.learned:
                label = torch.where(found[:, None], self.best_label[rows].argmax(-1), label)
        snapshots = self.snapshots
        if self.continuous:  # one trial: its own snapshots, its last dummy in the steps after it stopped
            kept = self._slot_snapshots[rows[0]] or {}
            final = self.dummy.detach()[rows[0]].cpu().clone()
            every = self.snapshot_every
            snapshots = {step: kept.get(step, final)[None]
                         for step in range(0, self.stopping.steps + 1, every or 1)} if kept and every else {}
        return AttackResult(
            method=self.method,
            dummy=dummy.cpu().clone(),
            predicted_label=label.cpu(),
            distance=distance.cpu(),
            status=status,
            steps=self.steps_used[rows].cpu(),
            evaluations=evaluations,
            seconds=seconds,
            snapshots=snapshots,
            restarts=self.restarts[rows].cpu(),
        )


def _box(box: Sequence[float] | None) -> tuple[float, float] | None:
    if box is None:
        return None
    if len(box) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box) \
            or not box[0] < box[1]:
        raise ConfigError(f"box must be null or [lo, hi] with lo < hi (the data's value range, e.g. [0, 1]), "
                          f"got {list(box)!r}")
    return float(box[0]), float(box[1])
