"""When a trial stops: the attack's stopping rules, one part of an attack (configs/attack/*.yaml `stopping`).

Per trial, after every optimizer step:
- converged: the gradient distance D < `tolerance` (the paper: 1e-6);
- diverged: D or the dummy is no longer finite, or |x'| exceeds `divergence_bound`;
- stopped: `steps` steps taken (the paper: 300), or, with `patience`, D has not halved within `patience`
  steps (beyond the paper: a stalled trial stops costing evaluations).
A trial that diverged, or stopped with D >= `restart_distance`, starts again from a fresh dummy at most
`restarts` times (beyond the paper; 0 keeps it off). With `restart_when: always` every attempt that ends
restarts while restarts are left (Inverting Gradients' restarts: all attempts run, the best is kept).
`keep`: the trial's reconstruction is its last iterate (DLG, iDLG) or the iterate of the lowest objective
over all its steps and attempts (`best`: Inverting Gradients, breaching).
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_idlg.errors import ConfigError, is_positive_int, is_positive_number, one_of


CONVERGED, NOT_CONVERGED, DIVERGED = "converged", "not_converged", "diverged"  # how a trial ended
STATUSES = (CONVERGED, NOT_CONVERGED, DIVERGED)
KEEP = ("last", "best")
RESTART_WHEN = ("failed", "always")


@dataclass(frozen=True)
class Stopping:
    steps: int = 300
    tolerance: float = 1e-6
    patience: int | None = None
    restarts: int = 0
    restart_distance: float = 1e-2
    divergence_bound: float = 1e4
    keep: str = "last"
    restart_when: str = "failed"

    def __post_init__(self) -> None:
        if not is_positive_int(self.steps):
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        if self.tolerance is not None and not is_positive_number(self.tolerance):
            raise ConfigError(f"tolerance must be null (never stop early) or a number > 0 (the paper: 1e-6), "
                              f"got {self.tolerance!r}")
        one_of("stopping.keep", self.keep, KEEP)
        one_of("stopping.restart_when", self.restart_when, RESTART_WHEN)
        if self.patience is not None and not is_positive_int(self.patience):
            raise ConfigError(f"patience must be null or a positive integer, got {self.patience!r}")
        if not (is_positive_int(self.restarts) or (self.restarts == 0 and isinstance(self.restarts, int)
                                                 and not isinstance(self.restarts, bool))):
            raise ConfigError(f"restarts must be a non-negative integer, got {self.restarts!r}")
        if not is_positive_number(self.restart_distance):
            raise ConfigError(f"restart_distance must be a number > 0, got {self.restart_distance!r}")
        if not is_positive_number(self.divergence_bound):
            raise ConfigError(f"divergence_bound must be a number > 0, got {self.divergence_bound!r}")

    @property
    def max_steps(self) -> int:
        """Steps a group may take: `steps` per attempt, and a restarted trial has `restarts` more attempts."""
        return self.steps * (1 + self.restarts)
