"""Continuous batching inside the attack module (GradientInversion's `refill` and `on_finish`, run/continuous.py
feeds them): the K rows are slots, and a trial that stopped for good is handed over at once and its slot
takes the next trial, with everything a trial has of its own started as in a fresh attack."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from lightning_idlg.case.client import SharedGradient


@dataclass(frozen=True)
class Arrival:
    """A trial entering a freed slot (continuous batching): `token` names it to `on_finish`, `shared` is its
    client's SharedGradient (one trial), `dummy_seed` its dummy draw's seed, `snapshot` whether its
    progress snapshots are kept."""

    token: Any
    shared: SharedGradient
    dummy_seed: int
    snapshot: bool = False


class Slots:
    """The slot machinery of GradientInversion (a mixin: its state is the module's own, see there)."""

    def _init_slots(self, k: int, refill, on_finish, tokens, queued: int, snapshot_trials: int) -> None:
        # continuous batching: who is in each slot, since when, its snapshots; `handed_over`: the slot's trial
        # went to on_finish and nothing came to replace it (the slot is empty)
        self.refill, self.on_finish = refill, on_finish
        self.tokens = list(tokens) if tokens is not None else list(range(k))
        self.queued = queued  # trials refill may still bring (bounds the steps Lightning is given)
        self._entered = [0.0] * k
        self._slot_snapshots: list[dict[int, torch.Tensor] | None] = \
            [{} if row < snapshot_trials else None for row in range(k)]
        self.register_buffer("handed_over", torch.zeros(k, dtype=torch.bool))

    def _snapshot_slots(self, running: torch.Tensor) -> None:
        """Each slot's snapshots at its trial's own step counts (a trial entering at global step 57 has its
        step 10 at global step 67)."""
        if not self.snapshot_every:
            return
        for row, kept in enumerate(self._slot_snapshots):
            steps = int(self.steps_used[row])
            if kept is not None and running[row] and steps % self.snapshot_every == 0:
                kept[steps] = self.dummy.detach()[row].cpu().clone()

    def _hand_over(self, raw) -> None:
        """Trials stopped for good go to on_finish; their slots take the next trials from refill."""
        done = (self.converged | self.diverged | self.stopped) & ~self.handed_over
        now = time.perf_counter()
        for row in done.nonzero().flatten().tolist():
            # the record's `seconds`: its time in flight, shared with the K slots it ran beside
            self.on_finish(self.tokens[row], self._rows_result([row], raw.evaluations[[row]].cpu(),
                                                               (now - self._entered[row]) / self.trials))
            arrival = self.refill() if self.refill is not None else None
            if arrival is None:
                self.handed_over[row] = True
            else:
                self._enter(row, arrival, raw)

    def _enter(self, row: int, arrival: Arrival, raw) -> None:
        """Put a new trial into slot `row`: everything a trial has of its own starts as in a fresh attack."""
        shared = arrival.shared
        if shared.trials != 1 or shared.batch_size != self.batch_size or shared.num_classes != self.num_classes:
            raise ValueError("a refilled trial must be one trial of the group's client batch size and classes")
        held = {"weight": shared.weights, "buffer": shared.buffers or {},
                "target": self._distance.prepare(shared.gradients)}
        for prefix, tensors in held.items():
            if list(tensors) != self._names[prefix]:
                raise ValueError(f"a refilled trial's {prefix}s {list(tensors)} differ from the group's "
                                 f"{self._names[prefix]}: continuous batching needs trials alike in what they share")
            for i, (name, t) in enumerate(tensors.items()):
                slot = getattr(self, f"{prefix}_{i}")
                if (prefix, name) in self._one_network:  # one network for all: it must be that one
                    if not torch.equal(slot[0], t[0].to(slot)):
                        raise ValueError("this group holds one network for all trials; a refilled trial "
                                         "brought another")
                else:
                    slot[row] = t[0].to(slot)
        self._gathered = {}  # gathered rows of the old trial's victim
        if not self.label_strategy.learned:
            self.label[row] = self.label_strategy.restore(shared)[0].to(self.label)
        self.tokens[row], self.dummy_seeds[row] = arrival.token, arrival.dummy_seed
        self._new_attempt(row, 0)
        self.steps_used[row] = self.restarts[row] = 0
        if self.stopping.keep == "best":
            self.best_distance[row] = float("inf")
            self.best_dummy[row] = self.dummy.detach()[row]
            if self.label_strategy.learned:
                self.best_label[row] = self.dummy_label.detach()[row]
        mask = torch.zeros_like(self.converged)
        mask[row] = True
        raw.reset(mask)
        raw.evaluations[row] = 0
        self._entered[row] = time.perf_counter()
        self._slot_snapshots[row] = {0: self.dummy.detach()[row].cpu().clone()} if arrival.snapshot else None
