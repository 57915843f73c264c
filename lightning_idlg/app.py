"""The Hydra app behind `lightning-idlg` and `python -m lightning_idlg`: compose, run, summarize."""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
from hydra.errors import InstantiationException
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_idlg.experiment import ConfigError, run
from lightning_idlg.tracking import MetricNameError, metric_names, metric_value


class StdoutHandler(logging.StreamHandler):
    """The console handler of the run's logging (configs/hydra/job_logging): writes to `sys.stdout` as it
    is when a message comes, not as it was when logging was set up. While rich draws the progress bars on
    a terminal, sys.stdout is rich's proxy, which prints the line above the bars instead of through them."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the property above always wins
        pass


def _quiet_lightning() -> None:
    # one Trainer per attack batch: Lightning's per-fit banners would drown the progress bar
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # the attack logs its curves itself (monitor.py), at every step: Lightning's log_every_n_steps has no say
    warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")


@hydra.main(version_base="1.3", config_path="pkg://lightning_idlg.configs", config_name="config")
def app(cfg: DictConfig) -> dict | float:
    """The summary; with `optimized_metric` set, that one number of it (what a Hydra sweeper optimizes)."""
    _quiet_lightning()
    name = cfg.get("optimized_metric")
    try:
        if name and name not in metric_names(cfg.method):  # fail before the run, not after it
            raise ConfigError(f"optimized_metric={name!r} is not a metric of this run; valid: "
                              + ", ".join(metric_names(cfg.method)))
        summary = run(cfg, HydraConfig.get().runtime.output_dir)
        return metric_value(summary, name) if name else summary
    except InstantiationException as err:
        # a loader's or model's own one-line message, not Hydra's wrapper around it
        cause = err.__cause__
        if not isinstance(cause, (FileNotFoundError, ValueError, RuntimeError)):
            raise
        _fail(cause)
    except (ConfigError, FileNotFoundError, MetricNameError) as err:
        _fail(err)


def _fail(err: BaseException) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    app()
