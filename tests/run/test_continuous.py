"""Continuous batching (continuous_batching=true, lightning_idlg.run.continuous): K slots refilled as trials end.

A trial's record must be the one it gets alone (float64, where batched kernels round alike), every trial is
recorded once, resume completes a run, slots are actually refilled, and memory is per slot, not per trial."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_idlg.run import experiment
from lightning_idlg.attacks.inversion import GradientInversion
from lightning_idlg.records.store import read_records
from tests.conftest import compose_config

TINY = ["dataset=digits", "dataset.image_size=8", "progress_bar=false", "pictures=false", "threads=1"]
FLOAT64 = ["trainer.precision=64-true"]
SAME = ("label", "predicted_label", "status", "steps", "evaluations", "restarts")
CLOSE = ("mse", "distance", "psnr")


def cfg_of(*overrides: str):
    return compose_config(*TINY, *overrides)


def records(run_dir: Path) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["index"]): r for r in read_records(run_dir / "trials.jsonl")}


@pytest.mark.slow
@pytest.mark.parametrize("setting", [
    # L-BFGS, both attacks (a learned label and a restored one), trials of very different lengths
    ["method=both", "steps=25", "tolerance=1e-9", "patience=null"],
    # the improved rules: patience and restarts (a restarted trial keeps its slot), strong-Wolfe
    ["method=idlg", "steps=12", "patience=3", "restarts=1", "restart_distance=1e-6",
     "optimizer.line_search_fn=strong_wolfe"],
])
def test_records_equal_the_solo_runs(tmp_path, one_thread, setting):
    """7 trials through 3 slots against each trial alone (trials_per_group=1): labels, statuses, steps,
    evaluations and restarts equal; MSE and D to float64 rounding."""
    experiment.run(cfg_of(*FLOAT64, *setting, "trials=7", "trials_per_group=1"), tmp_path / "solo")
    experiment.run(cfg_of(*FLOAT64, *setting, "trials=7", "trials_per_group=3", "continuous_batching=true"),
                   tmp_path / "slots")
    solo, slots = records(tmp_path / "solo"), records(tmp_path / "slots")
    assert sorted(solo) == sorted(slots) and len(solo) == 7 * (2 if "method=both" in setting else 1)
    lengths = {r["steps"] for r in solo.values()}
    assert len(lengths) > 1  # trials of different lengths: slots were refilled at different steps
    for key, alone in solo.items():
        mine = slots[key]
        assert {f: mine[f] for f in SAME} == {f: alone[f] for f in SAME}, key
        for f in CLOSE:
            # PSNR of images clamped to [0, 1]: above 80 dB the clamp keeps a few pixels' tiny errors only, so it
            # moves 1e-7 where the unclamped MSE moves 1e-8 (93.877611 against 93.877621 dB)
            assert mine[f] == pytest.approx(alone[f], rel=1e-6 if f == "psnr" else 1e-7, abs=1e-12), (key, f)
        assert (mine["group_size"], alone["group_size"]) == (3, 1)  # slots: the trials optimized together


@pytest.mark.slow
def test_slots_are_refilled_and_every_trial_is_handed_over_once(monkeypatch, tmp_path, one_thread):
    entered = []
    real = GradientInversion._enter

    def counting(self, row, arrival, raw):
        entered.append((row, arrival.token, int(self.global_step)))
        return real(self, row, arrival, raw)

    monkeypatch.setattr(GradientInversion, "_enter", counting)
    summary = experiment.run(cfg_of("method=idlg", "trials=9", "steps=15", "trials_per_group=2",
                                    "continuous_batching=true"), tmp_path)
    assert sorted(token for _, token, _ in entered) == list(range(2, 9))  # trials 2..8 entered freed slots
    assert {row for row, _, _ in entered} <= {0, 1}
    assert summary["idlg"]["trials"] == 9
    assert sorted(i for _, i in records(tmp_path)) == list(range(9))


@pytest.mark.slow
def test_resume_completes_a_continuous_run(tmp_path, one_thread):
    experiment.run(cfg_of("method=idlg", "trials=4", "steps=10", "trials_per_group=2", "continuous_batching=true"),
                   tmp_path)
    first = read_records(tmp_path / "trials.jsonl")
    experiment.run(cfg_of("method=idlg", "trials=7", "steps=10", "trials_per_group=2", "continuous_batching=true"),
                   tmp_path)
    after = read_records(tmp_path / "trials.jsonl")
    assert after[:4] == first  # what was there stays as it was
    assert sorted(r["index"] for r in after) == list(range(7))  # each trial once


@pytest.mark.slow
def test_pictures_wait_for_every_attack_of_a_trial(tmp_path, one_thread):
    experiment.run(cfg_of("method=both", "trials=3", "steps=6", "trials_per_group=2", "continuous_batching=true",
                          "pictures=true", "progress_trials=1", "snapshot_every=2"), tmp_path)
    names = sorted(p.name for p in (tmp_path / "pictures").iterdir())
    assert names == ["progress_00000.png", "trial_00000.png", "trial_00001.png", "trial_00002.png"]


def test_continuous_batching_must_be_a_boolean(tmp_path):
    from lightning_idlg.errors import ConfigError

    with pytest.raises(ConfigError, match="continuous_batching must be true or false"):
        experiment.run(cfg_of("continuous_batching=3"), tmp_path)


@pytest.mark.slow
def test_a_checkpoint_stays_one_network_through_refills(tmp_path, monkeypatch, one_thread):
    import torch

    from lightning_idlg.case.model import LeNet, make_victim

    net = make_victim(LeNet, in_channels=1, image_size=8, num_classes=10, seed=5)
    torch.save(net.state_dict(), tmp_path / "victim.pt")
    held = []
    real = GradientInversion._enter

    def watching(self, row, arrival, raw):
        real(self, row, arrival, raw)
        held.append([getattr(self, f"weight_{i}").shape[0] for i in range(len(self._names["weight"]))])

    monkeypatch.setattr(GradientInversion, "_enter", watching)
    checkpoint = [*FLOAT64, "model/init=checkpoint", f"model.init.path={tmp_path / 'victim.pt'}", "method=idlg",
                  "trials=5", "steps=6"]
    experiment.run(cfg_of(*checkpoint, "trials_per_group=2", "continuous_batching=true"), tmp_path / "slots")
    experiment.run(cfg_of(*checkpoint, "trials_per_group=1"), tmp_path / "solo")
    assert len(held) == 3 and all(n == 1 for shapes in held for n in shapes)  # one copy, refill after refill
    solo, slots = records(tmp_path / "solo"), records(tmp_path / "slots")
    assert [slots[k]["predicted_label"] for k in sorted(solo)] == [solo[k]["predicted_label"] for k in sorted(solo)]
    assert [slots[k]["evaluations"] for k in sorted(solo)] == [solo[k]["evaluations"] for k in sorted(solo)]
