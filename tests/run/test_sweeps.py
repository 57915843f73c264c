"""Every W&B sweep in sweeps/: valid for W&B's sweep schema, launches the Hydra app the way `wandb agent`
would, and every parameter set that W&B's own search code (the `sweeps` package, no server) proposes
composes as Hydra overrides of the real config; the metric it optimizes is a name the runs log."""

from __future__ import annotations

import math
import random
from pathlib import Path

import warnings

import pytest
import yaml
from hydra import compose, initialize_config_module
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from lightning_idlg.app import expand_shortcuts
from lightning_idlg.run import tracking
from lightning_idlg.run.experiment import validate

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # sweeps 0.3 declares a pydantic-v1 Config: its noise
    import sweeps

SWEEPS = sorted((Path(__file__).resolve().parents[2] / "sweeps").glob("*.yaml"))
LAUNCH = ["${env}", "${interpreter}", "-m", "lightning_idlg", "${args_no_hyphens}"]


def test_there_are_sweeps():
    assert {p.stem for p in SWEEPS} >= {"paper_grid", "lbfgs_bayes", "optimizer_random", "defense_strength",
                                        "client_batch", "fedavg_local_steps"}


def proposed_runs(config: dict, limit: int = 24) -> list[sweeps.SweepRun]:
    """What W&B's controller would hand to agents: all of a grid, `limit` of a random or bayes search
    (each finished with a made-up metric, so bayes has results to model)."""
    runs: list[sweeps.SweepRun] = []
    rng = random.Random(0)
    while len(runs) < limit:
        run = sweeps.next_run(config, runs, validate=True)
        if run is None:  # a grid is exhausted
            break
        metric = config.get("metric", {}).get("name", "unused")
        runs.append(sweeps.SweepRun(name=f"run{len(runs)}", state=sweeps.RunState.finished, config=run.config,
                                    summary_metrics={metric: rng.random()}))
    return runs


def agent_argv(command: list, run_config: dict) -> list[str]:
    """The argv `wandb agent` starts for a run (wandb_agent.py: each `${macro}` item is replaced by its
    list from create_sweep_command_args; everything else is passed as is)."""
    sweep_vars = create_sweep_command_args({"args": run_config})
    sweep_vars.update(env=["/usr/bin/env"], interpreter=["python"])
    argv: list[str] = []
    for item in map(str, command):
        argv += sweep_vars[item[2:-1]] if item.startswith("${") and item.endswith("}") else [item]
    return argv[:4] + expand_shortcuts(argv[4:])  # as the app's main() hands them to Hydra (labels=NAME)


@pytest.mark.slow
@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_composes_as_hydra_overrides(path, monkeypatch):
    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == [], path.name
    assert config["command"][:5] == LAUNCH, f"{path.name}: command must start with {LAUNCH}"
    if "metric" in config:
        names = tracking.metric_names(["dlg", "idlg"])
        assert config["metric"]["name"] in names, f"{path.name}: the metric is not a name the runs log"

    runs = proposed_runs(config)
    if config["method"] == "grid":
        sizes = [len(p["values"]) for p in config["parameters"].values() if "values" in p]
        assert len(runs) == math.prod(sizes)
    else:
        assert len(runs) == 24
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep1")  # what the agent sets for each run
    monkeypatch.setenv("WANDB_RUN_ID", "run1")
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        for run in runs:
            argv = agent_argv(config["command"], run.config)
            assert argv[:4] == ["/usr/bin/env", "python", "-m", "lightning_idlg"]
            cfg = compose("config", overrides=argv[4:], return_hydra_config=True)
            validate(cfg)
            assert cfg.hydra.run.dir == "outputs/sweeps/sweep1/run1"  # no two runs share a run dir
            assert cfg.logger._target_ == "lightning_idlg.run.tracking.WandbTracker"
            for key, value in ((k, v["value"]) for k, v in run.config.items()):
                if key in ("dataset", "optimizer", "experiment", "defense", "client", "model"):  # config groups: the choice took effect
                    assert cfg.hydra.runtime.choices[key] == value
                elif key == "labels":  # iDLG's label strategy by name
                    assert cfg.hydra.runtime.choices["label_strategy@attack.idlg.label_strategy"] == value
                elif key == "method":
                    assert list(cfg.attack) == [value], f"{path.name}: method={value} did not land"
                else:  # "null" is how a sweep spells None (Hydra's grammar; W&B would send the text None)
                    expected = None if value == "null" else value
                    assert _select(cfg, key) == expected, f"{path.name}: {key}={value} did not land"


def _select(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_paper_grid_runs_are_the_paper_experiments():
    """paper_grid.yaml names experiment=paper_<dataset> and one method: each run is the paper preset with
    that method alone (the config's defaults are the quick look, not the paper protocol)."""
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        for dataset in ("mnist", "cifar100", "lfw"):
            paper = compose("config", overrides=[f"experiment=paper_{dataset}"])
            for method in ("dlg", "idlg"):
                grid = compose("config", overrides=[f"experiment=paper_{dataset}", f"method={method}"])
                assert list(grid.attack) == [method] and grid.attack[method] == paper.attack[method]
                assert {k: v for k, v in grid.items() if k != "attack"} == \
                       {k: v for k, v in paper.items() if k != "attack"}, dataset


@pytest.mark.slow
def test_batch_and_local_step_sweeps_reach_the_client_and_attack():
    """client_batch.yaml: B in 1..8 with batch label strategies (iDLG's rule key removed, the strategy
    checked against B by validate); fedavg_local_steps.yaml: a FedAvg client of 4 samples, 1, 5, 10 local
    full-batch steps, attacked by IG simulating them."""
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        for path, method in (("client_batch", "idlg"), ("fedavg_local_steps", "ig")):
            config = yaml.safe_load((SWEEPS[0].parent / f"{path}.yaml").read_text())
            seen = set()
            for run in proposed_runs(config):
                cfg = compose("config", overrides=agent_argv(config["command"], run.config)[4:])
                validate(cfg)
                assert "rule" not in cfg.attack[method].label_strategy
                seen.add((cfg.client.batch_size, cfg.client.get("epochs"), cfg.attack[method].label_strategy._target_))
            if method == "idlg":
                assert {b for b, _, _ in seen} == {1, 2, 4, 8} and len(seen) == 8
            else:
                assert cfg.client._target_ == "lightning_idlg.case.fedavg.FedAvgClient" and cfg.client.local_batch_size is None
                assert cfg.attack.ig.objective._target_ == "lightning_idlg.attacks.local_updates.LocalUpdates"
                assert seen == {(4, e, "lightning_idlg.attacks.labels.BiasCorrected") for e in (1, 5, 10)}
