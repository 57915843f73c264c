"""Trial planning: which images each trial attacks and the seeds drawn for it, fixed by the run's seed, so a
trial's draws never depend on the group, device or rank it runs in; and the fixed groups of K trials."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig


@dataclass(frozen=True)
class Trial:
    """One attacked image: its position in the experiment and what is drawn from the seed for it."""

    index: int
    images: tuple[int, ...]  # the client's B private images (data set indices)
    victim_seed: int
    dummy_seed: int

    @property
    def defense_seed(self) -> int:  # the client's defense draws (noise) for this trial
        return derive_seed(self.victim_seed, self.index, 2)


def derive_seed(seed: int, index: int, stream: int) -> int:
    """Independent seed per (experiment seed, trial, stream) so a trial's draws never depend on which
    batch, device or rank it runs in."""
    return ((seed * 1_000_003 + index) * 16 + stream) % (2**63)


def plan_trials(cfg: DictConfig, dataset_size: int) -> list[Trial]:
    """Trial i attacks the client holding images i*B .. i*B + B-1 of one seeded draw (B = 1: the paper's
    one random image per trial)."""
    b = int(cfg.client.batch_size)
    images = pick_trials(dataset_size, cfg.trials * b, cfg.seed)
    return [Trial(i, tuple(images[i * b:(i + 1) * b]), derive_seed(cfg.seed, i, 0), derive_seed(cfg.seed, i, 1))
            for i in range(cfg.trials)]


def plan_batches(trials: list[Trial], k: int, done: set[tuple[str, int]], methods: list[str]) -> list[list[Trial]]:
    """The attack batches: fixed chunks of K planned trials, those with any (method, index) not recorded.

    A chunk with a pending trial runs whole (only its pending records are appended), so a trial always
    runs beside the same trials as in an uninterrupted run and its record is that run's, bit for bit: the
    objective's summation order depends on K (objective._HeadDistance), so a resumed trial re-batched
    with whatever else was pending differed (MSE 6.33678 vs 6.33802, 42 vs 40 evaluations)."""
    chunks = [trials[start:start + k] for start in range(0, len(trials), k)]
    return [c for c in chunks if any((m, t.index) not in done for t in c for m in methods)]


def pick_trials(size: int, trials: int, seed: int) -> list[int]:
    """The image index of each trial, fixed by `seed`. The paper draws one random image per trial: distinct
    images (a seeded permutation) while there are enough, otherwise draws with replacement."""
    if size <= 0 or trials < 0:
        raise ValueError(f"cannot pick {trials} trials from a data set of {size} images")
    generator = torch.Generator().manual_seed(int(seed))
    if trials <= size:
        return torch.randperm(size, generator=generator)[:trials].tolist()
    return torch.randint(size, (trials,), generator=generator).tolist()
