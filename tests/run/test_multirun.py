"""Hydra multirun through the real entry point: one job dir per combination, each with its results; and
the Optuna sweeper config, which needs the app to return `optimized_metric` as a float."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from hydra import compose, initialize_config_module
from tests.conftest import run_app

FAST = ["trials=1", "steps=2", "dataset.image_size=8", "optimizer.max_iter=2", "threads=1", "progress_bar=false",
        "pictures=false"]


def multirun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_app(*args, timeout=timeout, WANDB_MODE="disabled")  # no test here may reach for W&B


@pytest.mark.slow
def test_multirun_writes_one_dir_per_job(tmp_path):
    done = multirun("-m", "method=dlg,idlg", "dataset=digits,faces", f"hydra.sweep.dir={tmp_path}", *FAST)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        (record,) = [json.loads(line) for line in (job / "trials.jsonl").read_text().splitlines()]
        assert list(summary) == [record["method"]]
        seen.add((record["method"], record["dataset"]))
    assert seen == {(m, d) for m in ("dlg", "idlg") for d in ("digits", "faces")}


def test_optuna_config_composes():
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("config", overrides=["hparams_search=optuna_lbfgs"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "optimizer.max_iter", "optimizer.history_size"}
    assert cfg.optimized_metric == "idlg/fidelity/1e-03" and list(cfg.attack) == ["idlg"]
    assert cfg.optimizer._target_.endswith("BatchedLBFGS")


@pytest.mark.slow
def test_optuna_runs_two_trials_on_the_returned_metric(tmp_path):
    fast = [o for o in FAST if not o.startswith("optimizer.")]  # a fixed value would take it out of the search
    done = multirun("-m", "hparams_search=optuna_lbfgs", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}",
                   *fast)
    assert done.returncode == 0, done.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert isinstance(result["best_value"], float) and 0.0 <= result["best_value"] <= 1.0
    assert set(result["best_params"]) == {"optimizer.lr", "optimizer.max_iter", "optimizer.history_size"}
    assert len([p for p in tmp_path.iterdir() if (p / "summary.json").is_file()]) == 2


def test_bad_optimized_metric_fails_before_running(tmp_path):
    done = multirun("optimized_metric=dlg/fidelity/1e-03", "method=idlg", f"hydra.run.dir={tmp_path}", *FAST)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: optimized_metric='dlg/fidelity/1e-03' is not a metric of this run; valid: "
                           "idlg/trials, idlg/label_accuracy, idlg/fidelity/1e-02, ")
    assert not (tmp_path / "trials.jsonl").exists()


@pytest.mark.slow
def test_a_defense_multirun_and_the_report_that_reads_it(tmp_path):
    """`-m defense=none,gaussian,prune` (and a strength grid of one defense): one job per defense; the report
    adds the leakage section (every defense, its strength, the client's cost) and the --by table."""
    sweep = tmp_path / "sweep"
    done = multirun("-m", "defense=none,gaussian,prune", "trials=2", f"hydra.sweep.dir={sweep}", *FAST[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    grid = tmp_path / "grid"
    done = multirun("-m", "defense=gaussian", "defense.gaussian.variance=1e-4,1e-2", "trials=2",
                   f"hydra.sweep.dir={grid}", *FAST[1:])
    assert done.returncode == 0, done.stderr[-3000:]
    from lightning_idlg.report import main as report
    out = tmp_path / "report"
    assert report([str(sweep), str(grid), "--out", str(out), "--no-progress", "--by", "defense,defense.ratio"]) == 0
    text = (out / "report.md").read_text()
    assert "## Leakage against defense strength" in text and "## By defense, defense.ratio" in text
    rows = (out / "leakage.csv").read_text().splitlines()
    found = {tuple(line.split(",")[1:4]) for line in rows[1:]}
    assert {("none", "", "dlg"), ("gaussian", "0.001", "idlg"), ("gaussian", "0.0001", "dlg"),
            ("gaussian", "0.01", "idlg"), ("prune", "0.2", "dlg")} <= found
    assert (out / "leakage.png").stat().st_size > 1000 and (out / "by.csv").exists()
