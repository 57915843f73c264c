"""Continuous batching (`continuous_batching=true`): K slots in flight, each refilled as its trial ends.

A fixed group of K trials (run/experiment.py) runs until its slowest trial stops, with fewer and
fewer trials per evaluation: on the paper protocol a group's last steps evaluate one or two trials, where a
step costs about as much as at eight. Here the attack module keeps K slots (GradientInversion's `refill` and
`on_finish`): a trial that converged, diverged or ran out of steps or patience (and restarts) is evaluated
and recorded at once, and its slot takes the next pending trial of this rank (its client's shared gradient
computed then, its own victim, label, dummy draw and optimizer state), so every evaluation has K trials
until the queue is empty.

Nothing couples the slots, so a trial's record is the one it gets alone, up to float32 rounding of the
batched kernels (tests/run/test_continuous.py compares with solo runs in float64). Records are appended as trials
end (a crash loses no finished trial) and resume skips them; a resumed trial runs beside other trials than
it first did, which changes its record only by that rounding (a fixed group reproduces it bit for bit:
case.plan.plan_batches). Attacks run one after the other (attack=both: all DLG trials, then all iDLG
trials); a trial's picture is drawn once all its attacks have ended.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Protocol

import torch
from rich.progress import Progress

from lightning_idlg.attacks.result import AttackResult
from lightning_idlg.attacks.slots import Arrival
from lightning_idlg.case.client import PrivateBatch, SharedGradient
from lightning_idlg.case.plan import Trial
from lightning_idlg.case.share import ClientSide
from lightning_idlg.run.monitor import AttackProgress, ReconstructionMonitor


def stack(shared: list[SharedGradient], one_network: bool) -> SharedGradient:
    """K one-trial SharedGradients as one of K trials; with `one_network` the first's weights and buffers
    viewed K times (stride 0: held once, as case.share.ClientSide shares a checkpoint)."""
    def cat(parts: list[dict[str, torch.Tensor]], held_once: bool) -> dict[str, torch.Tensor]:
        if held_once:
            return {name: t.expand(len(parts), *t.shape[1:]) for name, t in parts[0].items()}
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    buffers = None if shared[0].buffers is None else cat([s.buffers for s in shared], one_network)
    return dataclasses.replace(shared[0], weights=cat([s.weights for s in shared], one_network),
                               gradients=cat([s.gradients for s in shared], False), buffers=buffers)


class Recorder(Protocol):
    """Where a stream's finished trials go (run/experiment.Recording)."""

    def record(self, method: str, group: list[Trial], private: PrivateBatch, result: AttackResult, cost,
               group_size: int) -> list[str]: ...

    def pictures(self, group: list[Trial], private: PrivateBatch, results: dict[str, AttackResult]) -> None: ...


class Stream:
    """One attack's pending trials of this rank, fed to K slots: `first` (the initial group, shared
    together), `refill` (the next trial's client, sharing when a slot frees), `finish` (evaluate and record
    a trial that ended, draw its picture once every attack of the run has it). `clients`: the run's client
    side; `wanted`: trial index -> the attacks it waits for; `results`: their results so far."""

    def __init__(self, method: str, todo: list[Trial], slots: int, clients: ClientSide, recorder: Recorder,
                 wanted: dict[int, set[str]], results: dict, progress_trials: int):
        self.method, self.clients, self.recorder = method, clients, recorder
        self.wanted, self.results, self.progress_trials = wanted, results, progress_trials
        self.first, self._queue = todo[:slots], iter(todo[slots:])
        self.queued = max(0, len(todo) - slots)
        self.group_size = min(slots, len(todo))
        self.in_flight: dict[int, tuple] = {}  # trial index -> (trial, private, cost)
        self.statuses: list[str] = []

    def initial(self) -> SharedGradient:
        """The first K trials' SharedGradient. Each client computes alone, as a refilled one will and as a
        solo run does (a group's batched client rounds its float32 gradient otherwise), so a trial's record
        does not depend on the slots; a network held once (a checkpoint) stays held once."""
        shared = []
        for trial in self.first:
            private, one, cost = self.clients.share([trial])
            self.in_flight[trial.index] = (trial, private, cost)
            shared.append(one)
        return stack(shared, self.clients.init.one_network)

    def refill(self) -> Arrival | None:
        trial = next(self._queue, None)
        if trial is None:
            return None
        with _default_dtype(torch.float32):  # as the initial group's client, shared before training began
            private, shared, cost = self.clients.share([trial])
        self.in_flight[trial.index] = (trial, private, cost)
        return Arrival(trial.index, shared, trial.dummy_seed, snapshot=trial.index < self.progress_trials)

    def finish(self, index: int, result: AttackResult) -> None:
        trial, private, cost = self.in_flight.pop(index)
        self.recorder.record(self.method, [trial], private, result, cost, self.group_size)
        self.statuses.append(result.status[0])
        mine = self.results.setdefault(index, {})
        mine[self.method] = result
        if set(mine) >= self.wanted[index]:  # every attack of this trial has ended: its picture
            self.recorder.pictures([trial], private, self.results.pop(index))

    def truth(self, index: int) -> torch.Tensor | None:
        client = self.in_flight.get(index)
        return None if client is None else client[1].images[0]


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Inside Trainer.fit, Lightning's "64-true" precision makes float64 the default dtype, so a victim built
    there would be float64 while its images are float32; the client must compute as it does outside."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


class SlotMonitor(ReconstructionMonitor):
    """ReconstructionMonitor over slots: the private images are those of the trials now in the slots (an
    emptied slot keeps its last trial's)."""

    def __init__(self, stream: Stream, step_offset: int, truth: torch.Tensor):
        super().__init__(truth.flatten(0, 1).clone(), step_offset,
                         trial_indices=[t.index for t in stream.first for _ in range(truth.shape[1])])
        self.stream, self.batch_size = stream, truth.shape[1]

    def _follow(self, pl_module) -> None:
        for row, index in enumerate(pl_module.tokens):
            images = self.stream.truth(index)
            if images is not None:
                at = slice(row * self.batch_size, (row + 1) * self.batch_size)
                self.private_images[at] = images
                self.trial_indices[at] = [index] * self.batch_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.logger is not None:
            self._follow(pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class StreamProgress(AttackProgress):
    """The method's bar moves as trials are recorded (Stream.finish); per step, only the steps bar moves, by
    the slots' global step, with the number of trials in flight."""

    def __init__(self, progress: Progress, steps_task, steps: int):
        super().__init__(progress, None, steps_task, steps, [])

    def on_train_start(self, trainer, pl_module) -> None:
        self.progress.reset(self.steps_task, total=None, description=f"{pl_module.method} steps", info="")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        active = ~(pl_module.converged | pl_module.diverged | pl_module.stopped)
        distance = pl_module.distance[active] if active.any() else pl_module.distance
        self.progress.update(self.steps_task, completed=trainer.global_step,
                             info=f"{int(active.sum())} in flight, median D {float(distance.median()):.1e}")
