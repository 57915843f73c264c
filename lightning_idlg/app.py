"""The Hydra app behind `lightning-idlg` and `python -m lightning_idlg`: compose, run, summarize."""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_idlg.experiment import ConfigError, run


def _quiet_lightning() -> None:
    # one Trainer per attack batch: Lightning's per-fit banners would drown the progress bar
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")


@hydra.main(version_base="1.3", config_path="pkg://lightning_idlg.configs", config_name="config")
def app(cfg: DictConfig) -> dict:
    _quiet_lightning()
    try:
        return run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    app()
