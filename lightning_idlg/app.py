"""The Hydra app behind `lightning-idlg` and `python -m lightning_idlg`: compose, run, summarize."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.errors import InstantiationException
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_idlg.errors import ConfigError
from lightning_idlg.records.moved import modernize_config
from lightning_idlg.records.rundir import RunDirLock
from lightning_idlg.run.quiet import quiet_lightning

# torch, Lightning and the experiment are imported once the run dir's lock is taken (`_run`): a second run
# into a busy dir stops in about a second instead of after ~5 s of imports


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


@hydra.main(version_base="1.3", config_path="pkg://lightning_idlg.configs", config_name="config")
def app(cfg: DictConfig) -> dict | float:
    """The summary; with `optimized_metric` set, that one number of it (what a Hydra sweeper optimizes)."""
    try:
        with RunDirLock(HydraConfig.get().runtime.output_dir):  # experiment.run takes it again (re-entrant)
            return _run(cfg)
    except ConfigError as err:  # the run dir is another run's
        fail(err)


def _run(cfg: DictConfig) -> dict | float:
    from lightning_idlg.run.experiment import run
    from lightning_idlg.run.tracking import MetricNameError, metric_names, metric_value

    quiet_lightning()
    for change in modernize_config(cfg):  # a _target_ of a module that moved (old YAML, old overrides)
        print(f"note: {change} (the module moved; the old path keeps working)", file=sys.stderr)
    name = cfg.get("optimized_metric")
    try:
        lpips = OmegaConf.select(cfg, "metrics.lpips", default=False) not in (False, None)
        if name and name not in metric_names(cfg.attack, lpips):  # fail before the run, not after it
            raise ConfigError(f"optimized_metric={name!r} is not a metric of this run; valid: "
                              + ", ".join(metric_names(cfg.attack, lpips)))
        summary = run(cfg, HydraConfig.get().runtime.output_dir, hydra_files(cfg))
        return metric_value(summary, name) if name else summary
    except InstantiationException as err:
        # a loader's or model's own one-line message, not Hydra's wrapper around it
        cause = err.__cause__
        if not isinstance(cause, (FileNotFoundError, ValueError, RuntimeError)):
            raise
        fail(cause)
    except (ConfigError, FileNotFoundError, MetricNameError) as err:
        fail(err)


def hydra_files(cfg: DictConfig) -> dict[str, str]:
    """What Hydra writes into <run dir>/.hydra/ (config, hydra, overrides). `hydra.output_subdir` is null, so
    Hydra itself writes nothing there before the app runs: a run refused by the run dir's lock or
    fingerprint must not overwrite the files of the run that made its records. `experiment.run` writes
    these once the dir is this run's."""
    hydra_cfg = HydraConfig.get()
    return {".hydra/config.yaml": OmegaConf.to_yaml(cfg),
            ".hydra/hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hydra_cfg)})),
            ".hydra/overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task)}


def fail(err: BaseException) -> None:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)


# Keys that moved when attacks became assembled from parts (configs/attack/*.yaml): old key -> new place.
# A key ending in "." moves everything below it.
MOVED = {
    "method.idlg.label_rule": "attack.idlg.label_strategy.rule",
    "method.dlg.divergence_bound": "attack.dlg.stopping.divergence_bound",
    "method.idlg.divergence_bound": "attack.idlg.stopping.divergence_bound",
    "method.": "attack.",
    "model.init_scale": "model.init.scale",
    "model.init": "model/init (a group: model/init=uniform|default|checkpoint)",
    "label_rule": "attack.idlg.label_strategy.rule",
    "divergence_bound": "attack.<dlg|idlg>.stopping.divergence_bound",
    "trials_per_batch": "trials_per_group (trials optimized at once; client.batch_size is the client's samples)",
}


def moved_key(argument: str) -> str | None:
    """The one-line message for a command-line override of a key that moved, else None."""
    key = argument.split("=", 1)[0].lstrip("+~")
    if "=" not in argument or "/" in key or key.startswith("hydra"):
        return None
    for old, new in MOVED.items():
        if key == old:
            return f"{key} moved to {new}"
        if old.endswith(".") and key.startswith(old):
            return f"{key} moved to {new}{key[len(old):]} (attacks are configs/attack/<name>.yaml)"
    return None


# labels=NAME: iDLG's label strategy, configs/label_strategy/NAME.yaml; Hydra's own form names the attack's node
LABELS_SHORTCUT = "label_strategy@attack.idlg.label_strategy"


def expand_shortcuts(arguments: list[str]) -> list[str]:
    """`labels=NAME` as Hydra's override of the iDLG attack's nested default (configs/attack/idlg.yaml);
    another attack's: `label_strategy@attack.<name>.label_strategy=NAME` (attack=ig: label_strategy@attack.ig...)."""
    return [LABELS_SHORTCUT + argument[len("labels"):] if argument.startswith("labels=") else argument
            for argument in arguments]


def main() -> None:
    for argument in sys.argv[1:]:
        message = moved_key(argument)
        if message:
            fail(ConfigError(message))
    sys.argv[1:] = expand_shortcuts(sys.argv[1:])
    app()
