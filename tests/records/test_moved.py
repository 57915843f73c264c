"""Old run dirs keep working after the modules moved into stage folders (lightning_idlg/records/moved.py).

tests/data/faabc40/paper_digits was made by commit faabc40, before the move, with
`lightning-idlg experiment=paper_mnist dataset=digits trials=2 threads=1 progress_bar=false pictures=false`
(its .lock and empty pictures/ left out): its config.yaml and fingerprint.json name the old module paths."""

from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from lightning_idlg.records.moved import MOVED, MOVED_NAMES, modern_path
from lightning_idlg.records.store import read_records
from lightning_idlg.report import find_runs, group_records, setting
from lightning_idlg.run.experiment import run
from tests import cli
from tests.conftest import compose_config

OLD = Path(__file__).resolve().parents[1] / "data" / "faabc40" / "paper_digits"
OVERRIDES = yaml.safe_load((OLD / ".hydra" / "overrides.yaml").read_text())


def cfg_of(*overrides: str):
    return compose_config(*OVERRIDES, *overrides)


def test_the_stored_dir_names_the_old_modules():
    assert "lightning_idlg.victim.LeNet" in (OLD / "config.yaml").read_text()
    settings = json.loads((OLD / "fingerprint.json").read_text())["methods"]["idlg"]["settings"]
    assert settings["attack.idlg.label_strategy._target_"] == "lightning_idlg.labels.AnalyticLabel"


def test_every_old_module_has_a_new_home_that_imports():
    for old, new in MOVED.items():
        assert importlib.import_module(new).__name__ == new, old
    for old, new in MOVED_NAMES.items():
        module, name = new.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), old
    assert modern_path("lightning_idlg.labels.LLGPlus") == "lightning_idlg.attacks.labels.LLGPlus"
    assert modern_path("lightning_idlg.optim.BatchedLBFGS") == "lightning_idlg.attacks.optimizer.BatchedLBFGS"
    assert modern_path("lightning_idlg.fedavg.FedAvgClient") == "lightning_idlg.case.fedavg.FedAvgClient"
    assert modern_path("lightning_idlg.fedavg.LocalUpdates") == "lightning_idlg.attacks.local_updates.LocalUpdates"
    for unchanged in ("lightning_idlg.api.attack", "lightning_idlg.case.model.LeNet", "torch.nn.Linear", "dataset"):
        assert modern_path(unchanged) == unchanged


@pytest.mark.slow
def test_an_old_run_dir_resumes_and_keeps_its_records(tmp_path, one_thread):
    run_dir = tmp_path / "old"
    shutil.copytree(OLD, run_dir)
    before = (OLD / "trials.jsonl").read_text()
    run(cfg_of("trials=3"), run_dir)  # refused with "other settings" if the old paths were not mapped
    after = (run_dir / "trials.jsonl").read_text()
    assert after.startswith(before)  # the old records untouched, one more trial per method appended
    records = read_records(run_dir / "trials.jsonl")
    assert sorted((r["method"], r["index"]) for r in records) == [(m, i) for m in ("dlg", "idlg") for i in range(3)]
    book = json.loads((run_dir / "fingerprint.json").read_text())
    old_book = json.loads((OLD / "fingerprint.json").read_text())
    for method in ("dlg", "idlg"):
        old_print, new_print = old_book["methods"][method]["fingerprint"], book["methods"][method]["fingerprint"]
        assert old_print != new_print and book["renamed"][old_print] == new_print
        assert book["current"][method] == new_print
        assert book["methods"][method]["settings"]["model.factory._target_"] == "lightning_idlg.case.model.LeNet"
    assert "lightning_idlg.case.model.LeNet" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_an_old_run_dir_is_the_paper_protocol_and_pools_with_a_new_run(tmp_path, one_thread):
    run(cfg_of(), tmp_path / "new")
    old, new = find_runs([OLD, tmp_path / "new"])
    assert old.protocol == new.protocol == "paper"
    assert setting(old.config) == setting(new.config)  # nothing tells them apart: they pool
    groups = group_records([old, new])
    assert list(groups) == [("digits", "paper")]
    assert {m: len(g.records) for m, g in groups[("digits", "paper")].items()} == {"dlg": 4, "idlg": 4}


@pytest.mark.slow
def test_an_override_with_an_old_module_path_runs_and_records_the_new_one(tmp_path):
    done = cli.run([sys.executable, "-m", "lightning_idlg", "method=idlg", "trials=1", "steps=1", "threads=1",
                    "dataset.image_size=8", "progress_bar=false", "pictures=false",
                    "attack.idlg.label_strategy._target_=lightning_idlg.labels.AnalyticLabel",
                    f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("note: lightning_idlg.labels.AnalyticLabel -> lightning_idlg.attacks.labels.AnalyticLabel"
            in done.stderr)
    assert "lightning_idlg.attacks.labels.AnalyticLabel" in (tmp_path / "config.yaml").read_text()
