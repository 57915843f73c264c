"""Lightning quieted, in one place. One Trainer per attack group (and per API call): Lightning's per-fit
banners ("GPU available: ...") and its warnings that say nothing about this use would drown the progress
bar and the one-line errors."""

from __future__ import annotations

import contextlib
import logging
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
# the attack logs its curves itself (run/monitor.py) at every step: Lightning's log_every_n_steps has no say;
# its data loader only paces the steps (no workers needed); LeafSpec and litlogger are Lightning's own notices
NOISE = (".*log_every_n_steps.*", ".*does not have many workers.*", ".*LeafSpec.*", ".*litlogger.*")


def quiet_lightning(level: int = logging.ERROR, filters: bool = True) -> None:
    """For the rest of the process (the apps): Lightning's loggers at `level`, its noise filtered out."""
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if filters:
        for pattern in NOISE:
            warnings.filterwarnings("ignore", pattern)


@contextlib.contextmanager
def quieted():
    """The same for one call (the Python API), the loggers' levels and the warning filters restored after."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        quiet_lightning()
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
