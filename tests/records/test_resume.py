"""Resume: a rerun into the same run dir computes only the trials that trials.jsonl lacks, and a run killed
mid-way loses no finished trial (records are flushed and fsynced per batch and method)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lightning_idlg.attacks.fit import Attack
from lightning_idlg.run import experiment
from lightning_idlg.records.store import read_records
from tests.conftest import compose_config

TINY = ["dataset=digits", "dataset.image_size=8", "steps=3", "progress_bar=false", "pictures=false", "threads=1"]


def cfg_of(*overrides: str):
    return compose_config(*TINY, *overrides)


@pytest.fixture
def attacks(monkeypatch):
    """Counts the trials each attack batch computes, per method."""
    computed: Counter = Counter()
    real = Attack.run

    def counting(self, shared, batch, *args, **kwargs):
        computed[self.name] += len(batch)
        return real(self, shared, batch, *args, **kwargs)

    monkeypatch.setattr(Attack, "run", counting)
    return computed


def lines(run_dir: Path) -> list[str]:
    return (run_dir / "trials.jsonl").read_text().splitlines()


def keys(run_dir: Path) -> list[tuple[str, int]]:
    return [(r["method"], r["index"]) for r in read_records(run_dir / "trials.jsonl")]


@pytest.mark.slow
def test_rerun_with_more_trials_computes_only_the_new_ones(tmp_path, attacks):
    # K fixed: the groups are chunks of the plan ([0, 1], [2, 3], [4, 5]); with auto, K = trials (<= 32) and the
    # rerun would run its one group [0..5] whole, appending only trials 4 and 5
    experiment.run(cfg_of("method=idlg", "trials=4", "trials_per_group=2"), tmp_path)
    first = lines(tmp_path)
    assert len(first) == 4 and attacks["idlg"] == 4

    attacks.clear()
    summary = experiment.run(cfg_of("method=idlg", "trials=6", "trials_per_group=2"), tmp_path)
    assert attacks["idlg"] == 2  # trials 4 and 5 only
    after = lines(tmp_path)
    assert after[:4] == first  # the first 4 records are untouched, byte for byte
    assert sorted(keys(tmp_path)) == [("idlg", i) for i in range(6)]
    assert summary["idlg"]["trials"] == 6
    assert json.loads((tmp_path / "summary.json").read_text())["idlg"]["trials"] == 6

    attacks.clear()
    experiment.run(cfg_of("method=idlg", "trials=6", "trials_per_group=2"), tmp_path)
    assert attacks["idlg"] == 0 and lines(tmp_path) == after  # same trials: nothing computed, nothing written


def test_rerun_with_another_method_computes_only_that_method(tmp_path, attacks):
    experiment.run(cfg_of("method=idlg", "trials=3"), tmp_path)
    attacks.clear()
    experiment.run(cfg_of("method=both", "trials=3"), tmp_path)
    assert attacks == Counter({"dlg": 3})
    assert Counter(keys(tmp_path)) == Counter({(m, i): 1 for m in ("dlg", "idlg") for i in range(3)})


def test_a_torn_last_line_is_skipped_and_swallows_no_new_record(tmp_path, attacks):
    experiment.run(cfg_of("method=idlg", "trials=3"), tmp_path)
    whole = lines(tmp_path)
    # a crash in the middle of writing record 2: half a line, no newline
    (tmp_path / "trials.jsonl").write_text("\n".join(whole[:2]) + "\n" + whole[2][:40])
    assert len(read_records(tmp_path / "trials.jsonl")) == 2

    attacks.clear()
    experiment.run(cfg_of("method=idlg", "trials=3"), tmp_path)
    assert attacks["idlg"] == 3  # trial 2's group (K = 3: [0, 1, 2]) runs whole, as in the uninterrupted run
    assert len(read_records(tmp_path / "trials.jsonl")) == 3  # ... but only trial 2 is appended
    assert sorted(keys(tmp_path)) == [("idlg", i) for i in range(3)]
    assert lines(tmp_path)[:2] == whole[:2]


def test_resume_reads_the_rank_files_of_an_interrupted_multi_rank_run(tmp_path, attacks):
    experiment.run(cfg_of("method=idlg", "trials=4"), tmp_path)
    records = lines(tmp_path)
    # what two ranks had written when the run died, before rank 0 could merge (rank 1: a torn last line)
    (tmp_path / "trials.jsonl").write_text(records[0] + "\n")
    (tmp_path / "trials.rank0.jsonl").write_text(records[0] + "\n" + records[2] + "\n")
    (tmp_path / "trials.rank1.jsonl").write_text(records[1] + "\n" + records[3][:25])

    attacks.clear()
    experiment.run(cfg_of("method=idlg", "trials=6"), tmp_path)
    assert attacks["idlg"] == 6  # trials 3 (torn), 4 and 5, in their group of the plan: [0..5] (K = 6)
    assert Counter(keys(tmp_path)) == Counter({("idlg", i): 1 for i in range(6)})
    assert not list(tmp_path.glob("trials.rank*.jsonl"))  # merged and removed


@pytest.mark.slow
def test_a_killed_run_loses_no_finished_trial_and_the_rerun_completes_it(tmp_path):
    args = ["method=idlg", "trials=16", "trials_per_group=1", "steps=20"]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "lightning_idlg", *TINY, *args, f"hydra.run.dir={tmp_path}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials_file = tmp_path / "trials.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (trials_file.exists() and trials_file.stat().st_size) and proc.poll() is None:
            assert time.monotonic() < deadline, "no record appeared within 120 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL

    text = trials_file.read_text()
    complete, _, torn = text.rpartition("\n")
    before = [json.loads(line) for line in complete.splitlines()]  # every finished line is valid JSON
    assert len(read_records(trials_file)) == len(before) >= (0 if torn else 1)
    assert len(before) < 16

    experiment.run(cfg_of(*args), tmp_path)
    after = read_records(trials_file)
    assert Counter((r["method"], r["index"]) for r in after) == Counter({("idlg", i): 1 for i in range(16)})
    assert after[:len(before)] == before  # what was recorded before the kill stays as it was


@pytest.mark.slow
def test_nothing_of_a_finished_batch_stays_in_memory(tmp_path, monkeypatch):
    """Records stream to disk, and each batch's attack module (its K trials' L-BFGS history) is freed before
    the next batch starts: memory does not grow with the number of trials."""
    import weakref

    from lightning_idlg.attacks.inversion import GradientInversion

    modules: list[weakref.ref] = []
    alive_at_batch_start: list[int] = []
    real_fit_start = GradientInversion.on_train_start

    def on_train_start(self):
        alive_at_batch_start.append(sum(ref() is not None for ref in modules))
        modules.append(weakref.ref(self))
        real_fit_start(self)

    monkeypatch.setattr(GradientInversion, "on_train_start", on_train_start)
    experiment.run(cfg_of("method=idlg", "trials=4", "trials_per_group=1"), tmp_path)
    assert len(modules) == 4 and alive_at_batch_start == [0, 0, 0, 0]
    assert len(lines(tmp_path)) == 4
