"""Run dirs that cannot lie, through the real entry point: one run per dir (lock), a rerun with other
settings refused (fingerprint), records unique by (method, index), strict JSON, resumed trials that give
the uninterrupted run's records, and a crafted pickle that is refused without running its payload."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lightning_idlg import report
from lightning_idlg.report.markdown import notes

from lightning_idlg.run import experiment
from lightning_idlg.records.store import dumps, read_records, unique
from lightning_idlg.records.rundir import EXCLUDE, settings
from tests.conftest import compose_config, run_app

TINY = ["dataset=digits", "dataset.image_size=8", "steps=2", "threads=1", "progress_bar=false", "pictures=false",
        "progress_trials=0"]
ENV = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def app(*args: str, cwd: Path, wait: bool = True):
    return run_app(*args, cwd=cwd, wait=wait, WANDB_MODE="disabled")


def cfg_of(*overrides: str):
    return compose_config(*TINY, *overrides)


def error_line(result) -> str:
    """The one `error:` line of a refused run (exit 2), and nothing that looks like a traceback."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def strict(text: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


# -- lock ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_second_run_into_a_busy_dir_stops_at_once_and_the_first_completes(tmp_path):
    out = tmp_path / "run"
    first = app(*TINY, "trials=8", "steps=30", "trials_per_group=1", f"hydra.run.dir={out}", cwd=tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".lock").exists() and (out / ".lock").stat().st_size) and first.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        second = app(*TINY, "trials=8", "steps=30", "trials_per_group=1", f"hydra.run.dir={out}", cwd=tmp_path)
        elapsed = time.monotonic() - started
        assert first.poll() is None, "the first run ended before the second started: make it longer"
        line = error_line(second)
        assert f"pid {first.pid}" in line and "in use by another run" in line and "hydra.run.dir" in line
        # refused while the first still runs (above), and well before a run of its own could end: the app locks
        # before importing torch (~0.4 s quiet, interpreter start included); a bound, not a speed claim
        assert elapsed < 30
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert Counter((r["method"], r["index"]) for r in read_records(out / "trials.jsonl")) == Counter(
        {(m, i): 1 for m in ("dlg", "idlg") for i in range(8)})
    assert all(s["trials"] == 8 for s in json.loads((out / "summary.json").read_text()).values())


def test_the_lock_dies_with_its_process(tmp_path):
    """A holder killed by SIGKILL leaves .lock behind, but not the lock: the next run takes it."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from lightning_idlg.records.rundir import RunDirLock\n"
                               f"with RunDirLock({str(tmp_path)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              env={**ENV, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    from lightning_idlg.errors import ConfigError
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        experiment.run(cfg_of("trials=1"), tmp_path)
    holder.kill()
    holder.wait()
    experiment.run(cfg_of("trials=1", "method=idlg"), tmp_path)
    assert len(read_records(tmp_path / "trials.jsonl")) == 1


# -- unique records -----------------------------------------------------------------------------------------
def test_duplicate_lines_are_counted_once_by_the_summary_and_the_report(tmp_path):
    experiment.run(cfg_of("trials=3", "method=idlg"), tmp_path)
    lines = (tmp_path / "trials.jsonl").read_text().splitlines()
    # what two concurrent runs wrote before there was a lock: every trial twice
    (tmp_path / "trials.jsonl").write_text("\n".join(lines + lines) + "\n")
    summary = experiment.run(cfg_of("trials=3", "method=idlg"), tmp_path)
    assert summary["idlg"]["trials"] == 3 and summary["idlg"]["duplicate_lines_ignored"] == 3
    assert strict((tmp_path / "summary.json").read_text())["idlg"]["duplicate_lines_ignored"] == 3
    run, = report.find_runs([tmp_path])
    assert len(run.records) == 3 and run.duplicates == 3
    groups = report.group_records([run])
    (key,) = groups  # one data set and variant (the quick default's)
    assert key[0] == "digits" and groups[key]["idlg"].summary["trials"] == 3
    assert any("repeat a (method, trial index) of the same run" in n for n in notes([run], groups))


# -- fingerprint --------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("change,key", [("steps=3", "steps: 2 -> 3"),
                                         ("dataset=faces", "dataset._target_: 'lightning_idlg.case.dataset.digits' -> "
                                                           "'lightning_idlg.case.dataset.faces'")])
def test_a_rerun_with_other_settings_is_refused_and_leaves_the_dir_as_it_was(tmp_path, change, key):
    out = tmp_path / "run"
    assert app(*TINY, "trials=2", "method=idlg", f"hydra.run.dir={out}", cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in [*out.iterdir(), *(out / ".hydra").iterdir()] if p.is_file()
              and p.name not in ("lightning-idlg.log", ".lock")}
    overrides = [o for o in TINY if not o.startswith("dataset") or change.startswith("steps")]
    line = error_line(app(*overrides, change, "trials=2", "method=idlg", f"hydra.run.dir={out}", cwd=tmp_path))
    assert key in line and "resume=force" in line and "hydra.run.dir" in line, line
    after = {p.name: p.read_bytes() for p in [*out.iterdir(), *(out / ".hydra").iterdir()] if p.is_file()
             and p.name not in ("lightning-idlg.log", ".lock")}
    assert after == before  # config.yaml, .hydra/, fingerprint.json, trials.jsonl: untouched


def test_resume_force_appends_and_says_so(tmp_path):
    experiment.run(cfg_of("trials=2", "method=idlg"), tmp_path)
    config = (tmp_path / "config.yaml").read_text()
    experiment.run(cfg_of("trials=3", "method=idlg", "steps=3", "resume=force"), tmp_path)
    records = read_records(tmp_path / "trials.jsonl")
    book = strict((tmp_path / "fingerprint.json").read_text())
    assert [r["fingerprint"] for r in records] == [book["methods"]["idlg"]["fingerprint"]] * 2 + [
        book["forced"][0]["fingerprint"]]
    assert book["forced"][0]["differs"] == ["attack.idlg.stopping.steps: 2 -> 3", "steps: 2 -> 3"]
    assert (tmp_path / "config.yaml").read_text() == config  # the config of the first records, not steps=3


@pytest.mark.slow
def test_what_may_change_between_reruns(tmp_path):
    """More trials, another method, other threads/progress/K: resumed; the fingerprint ignores them."""
    experiment.run(cfg_of("trials=2", "method=idlg"), tmp_path)
    experiment.run(cfg_of("trials=3", "method=both", "threads=2", "pictures=true"), tmp_path)
    assert Counter((r["method"], r["index"]) for r in read_records(tmp_path / "trials.jsonl")) == Counter(
        {(m, i): 1 for m in ("dlg", "idlg") for i in range(3)})
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["trials"] == 3  # now it describes all records
    flat = settings(cfg_of(), "idlg", 1797)
    assert not any(k == e or k.startswith(e + ".") for k in flat for e in EXCLUDE)
    assert {"steps", "seed", "tolerance", "optimizer.lr", "model.factory.activation", "attack.idlg.label_strategy.rule",
            "dataset._target_", "dataset.size"} <= set(flat) and not any(k.startswith("attack.dlg") for k in flat)


def test_keep_last_leaves_the_settings_of_run_dirs_from_before_the_keep_shortcut():
    """`keep` (and the attacks' stopping.keep it feeds) came after run dirs with records existed: at `last`, the
    iterate they all kept, it is left out of the settings, so those dirs still resume; `best` is a setting."""
    before = settings(cfg_of("method=both"), "dlg", 1797)
    assert not any(k == "keep" or k.endswith("stopping.keep") for k in before)
    best = settings(cfg_of("method=both", "keep=best"), "dlg", 1797)
    assert (best["keep"], best["attack.dlg.stopping.keep"]) == ("best", "best")
    assert {k: v for k, v in best.items() if "keep" not in k} == before
    assert not any(k.startswith("regularizers") for k in before)  # the run-wide priors' shortcut: none, as before


# -- strict JSON --------------------------------------------------------------------------------------------
def test_every_output_file_is_strict_json(tmp_path):
    out = tmp_path / "run"
    result = app(*TINY, "trials=2", "method=both", "pictures=true", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = strict((out / "summary.json").read_text())
    assert summary["dlg"]["steps_to_converge"] is None  # nothing converged in 2 steps: null, not NaN
    files = [*out.glob("*.json"), *out.glob("*.jsonl")]
    assert {p.name for p in files} >= {"summary.json", "trials.jsonl", "fingerprint.json"}
    for path in files:
        for line in ([path.read_text()] if path.suffix == ".json" else path.read_text().splitlines()):
            strict(line)
    # a non-finite value in a record is spelled out and read back as the float it was
    line = dumps({"method": "idlg", "index": 0, "mse": float("nan"), "psnr": float("inf"), "x": -float("inf")})
    assert strict(line) == {"method": "idlg", "index": 0, "mse": "NaN", "psnr": "Infinity", "x": "-Infinity"}
    (tmp_path / "t.jsonl").write_text(line + "\n")
    record, = read_records(tmp_path / "t.jsonl")
    assert record["psnr"] == float("inf") and record["mse"] != record["mse"]


# -- resume gives the uninterrupted run's records -----------------------------------------------------------
def comparable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}  # wall time is the one thing that may differ


@pytest.mark.slow
@pytest.mark.parametrize("k", ["auto", "2"])
def test_a_resumed_trial_gets_the_record_of_the_uninterrupted_run(tmp_path, k):
    args = ["trials=5", "steps=8", f"trials_per_group={k}"]
    whole = tmp_path / "whole"
    experiment.run(cfg_of(*args), whole)
    reference = read_records(whole / "trials.jsonl")
    # killed mid-way: the last two records lost (the last one torn), the others on disk
    resumed = tmp_path / "resumed"
    experiment.run(cfg_of(*args), resumed)
    text = (resumed / "trials.jsonl").read_text().splitlines()
    (resumed / "trials.jsonl").write_text("\n".join(text[:-2]) + "\n" + text[-2][:30])
    experiment.run(cfg_of(*args), resumed)
    after = unique(read_records(resumed / "trials.jsonl"))[0]
    key = lambda r: (r["method"], r["index"])  # noqa: E731
    assert sorted(map(key, after)) == sorted(map(key, reference))
    assert sorted(map(comparable, after), key=key) == sorted(map(comparable, reference), key=key)


# -- a crafted pickle ---------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_pickle_is_refused_without_running_its_payload(tmp_path):
    root = tmp_path / "data"
    (root / "cifar-100-python").mkdir(parents=True)
    marker = tmp_path / "pwned"
    for name in ("test", "meta"):
        with open(root / "cifar-100-python" / name, "wb") as f:
            pickle.dump({"data": _Payload(marker), "fine_labels": [0]}, f, protocol=2)
    line = error_line(app(*TINY[2:], "dataset=cifar100", f"dataset.root={root}", "trials=1",
                          f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path))
    assert "posix.system" in line and "refused" in line and str(root / "cifar-100-python") in line, line
    assert not marker.exists()


def test_a_run_dir_from_before_fingerprints_is_checked_against_its_config_yaml(tmp_path):
    experiment.run(cfg_of("trials=2", "method=idlg"), tmp_path)
    (tmp_path / "fingerprint.json").unlink()  # as a run of an earlier version left it: config.yaml alone
    from lightning_idlg.errors import ConfigError
    with pytest.raises(ConfigError, match=r"steps: 2 -> 3"):
        experiment.run(cfg_of("trials=2", "method=idlg", "steps=3"), tmp_path)
    experiment.run(cfg_of("trials=3", "method=idlg"), tmp_path)  # the same settings: resumed
    assert len(read_records(tmp_path / "trials.jsonl")) == 3
    assert strict((tmp_path / "fingerprint.json").read_text())["methods"]["idlg"]["settings"]["dataset.size"] == 1797
