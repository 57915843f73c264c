"""Trials over several ranks (trainer=ddp, 2 CPU processes): one trials.jsonl and one summary.json with every
trial exactly once and the same results as one process; the launcher configs for many jobs compose."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from lightning_idlg.run import experiment, ranks
from lightning_idlg.errors import ConfigError

from lightning_idlg.records.store import merge_rank_files
from lightning_idlg.run.ranks import start_method, trials_per_group, world_size
from lightning_idlg.records.store import read_records
from tests.conftest import compose_config

TINY = ["dataset=digits", "dataset.image_size=8", "steps=3", "progress_bar=false", "threads=1"]
# what two runs of the same trials may differ in: timing, and how the trials were batched
VARYING = {"seconds", "group_size"}


def cfg_of(*overrides: str, hydra: bool = False):
    return compose_config(*overrides, hydra=hydra)


def comparable(records: list[dict]) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["index"]): {k: v for k, v in r.items() if k not in VARYING} for r in records}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn"])  # CPU ranks forked, or spawned
def test_two_cpu_ranks_write_one_file_with_every_trial_once_and_the_one_process_results(tmp_path, strategy):
    args = [*TINY, "method=both", "trials=6", "trials_per_group=2"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    shown = [a for a in args if a != "progress_bar=false"]  # rank 0's progress bar names its share
    done = subprocess.run([sys.executable, "-m", "lightning_idlg", "trainer=ddp", f"trainer.strategy={strategy}",
                           *shown, f"hydra.run.dir={tmp_path / 'ddp'}"], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # two ranks: rank 0 attacked batches 0 and 2 of 3 (4 trials, 2 methods each)
    for method in ("dlg", "idlg"):  # one bar per method, out of rank 0's share
        assert re.search(rf"{method} \(rank 0 of 2\).* 4/4", done.stderr), done.stderr[-3000:]
    assert done.stdout.count("lightning_idlg summary") == 1  # rank 0 alone prints the summary

    run_dir = tmp_path / "ddp"
    records = read_records(run_dir / "trials.jsonl")
    assert len((run_dir / "trials.jsonl").read_text().splitlines()) == len(records) == 12
    assert Counter((r["method"], r["index"]) for r in records) == Counter(
        {(m, i): 1 for m in ("dlg", "idlg") for i in range(6)})
    assert not list(run_dir.glob("trials.rank*.jsonl"))  # merged into trials.jsonl, then removed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {m: s["trials"] for m, s in summary.items()} == {"dlg": 6, "idlg": 6}
    assert sorted(p.name for p in (run_dir / "pictures").glob("trial_*.png")) == [
        f"trial_{i:05d}.png" for i in range(6)]

    # no gradient crossed between ranks: each trial ends exactly where it ends in one process
    one = experiment.run(cfg_of(*args, "pictures=false"), tmp_path / "one")
    assert comparable(records) == comparable(read_records(tmp_path / "one" / "trials.jsonl"))
    assert one == {m: {**s, "seconds": one[m]["seconds"]} for m, s in summary.items()}


def test_start_method_forks_cpu_ranks_on_linux_and_spawns_gpu_ranks(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    assert start_method(cfg_of("trainer=ddp")) == "fork"
    assert start_method(cfg_of("trainer=ddp", "trainer.strategy=ddp_spawn")) == "spawn"
    assert start_method(cfg_of("trainer=gpu", "trainer.devices=2")) == "spawn"  # CUDA cannot be forked
    monkeypatch.setattr(sys, "platform", "darwin")
    assert start_method(cfg_of("trainer=ddp")) == "spawn"


def test_world_size_and_auto_batch_size():
    assert world_size(cfg_of()) == 1
    assert world_size(cfg_of("trainer=ddp")) == 2
    assert world_size(cfg_of("trainer=ddp", "trainer.devices=3")) == 3
    assert world_size(cfg_of("trainer=gpu", "trainer.devices=[0,2]")) == 2
    # auto: the CPU constant, but an even share per rank when there are few trials
    assert trials_per_group(cfg_of(), 1000) == ranks.CPU_TRIALS_PER_GROUP
    assert trials_per_group(cfg_of("trainer=ddp"), 10, world=2) == 5
    assert trials_per_group(cfg_of("trainer=ddp", "trials_per_group=3"), 10, world=2) == 3


@pytest.mark.parametrize("override,message", [
    ("trainer.strategy=fsdp", "trainer.strategy='fsdp' cannot share out trials over 2 devices"),
    ("trainer.num_nodes=2", "trainer.num_nodes must be 1"),
    ("trainer.devices=0", "trainer.devices must be at least 1"),
])
def test_bad_rank_settings_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        world_size(cfg_of("trainer=ddp", override))


def test_merge_rank_files_adds_what_is_missing_once_and_removes_them(tmp_path):
    def record(method, index):
        return json.dumps({"method": method, "index": index, "status": "converged"})

    (tmp_path / "trials.jsonl").write_text(record("idlg", 0) + "\n" + '{"method": "idlg", "ind')  # torn tail
    (tmp_path / "trials.rank0.jsonl").write_text(record("idlg", 0) + "\n" + record("idlg", 2) + "\n")
    (tmp_path / "trials.rank1.jsonl").write_text(record("dlg", 1) + "\n" + record("idlg", 1) + "\n" + '{"me')
    assert merge_rank_files(tmp_path) == 3
    assert [(r["method"], r["index"]) for r in read_records(tmp_path / "trials.jsonl")] == [
        ("idlg", 0), ("dlg", 1), ("idlg", 1), ("idlg", 2)]
    assert not list(tmp_path.glob("trials.rank*.jsonl"))
    assert merge_rank_files(tmp_path) == 0


def test_ddp_trainer_alone_runs_one_process_without_ddp(tmp_path):
    # devices=1: no ranks are started and the attack Trainer gets no DDP strategy
    assert ranks.single_device_args(cfg_of("trainer=ddp", "trainer.devices=1"), None) == {"strategy": "auto"}
    summary = experiment.run(cfg_of("trainer=ddp", "trainer.devices=1", *TINY, "method=idlg", "trials=2",
                                    "pictures=false"), tmp_path)
    assert summary["idlg"]["trials"] == 2


JOBLIB = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


@pytest.mark.parametrize("launcher,target", [("local", JOBLIB), ("joblib", JOBLIB), ("slurm", SLURM)])
def test_hydra_launcher_configs_compose(launcher, target):
    cfg = cfg_of(f"hydra/launcher={launcher}", "trainer=ddp", hydra=True)
    launch = cfg.hydra.launcher
    assert launch._target_ == target
    if launcher == "local":
        assert launch.n_jobs == 2 and launch.prefer == "processes"
    if launcher == "slurm":  # one app process per job, on one node; it starts its own ranks
        assert (launch.nodes, launch.tasks_per_node) == (1, 1)
        assert launch.timeout_min > 0 and launch.cpus_per_task >= 1 and launch.mem_gb > 0
        assert launch.submitit_folder.endswith("/.submitit/%j")
