"""`lightning-idlg-train` (lightning_idlg/train.py): checkpoints the attack loads, and their accuracy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lightning_idlg.case.architectures import ResNet
from lightning_idlg.errors import ConfigError
from lightning_idlg.train import check_settings
from lightning_idlg.case.model import CheckpointInit
from tests.conftest import run_app

ROOT = Path(__file__).resolve().parents[2]
# a narrow ResNet-8 on 8x8 digits: one epoch over 64 images in a second or two
TINY = ["model=resnet20", "model.factory.depth=8", "model.factory.width=0.25", "dataset.image_size=8"]


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_app(*args, cwd=cwd, module=module)


def train_cfg(*overrides: str):
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One epoch on 64 digit images (and 64 held out), saved before and after it."""
    out = tmp_path_factory.mktemp("train") / "run"
    result = run("lightning_idlg.train", *TINY, "epochs=1", "save_epochs=[0,1,final]", "limit=64", "batch_size=16",
                 "progress_bar=false", "threads=1", f"hydra.run.dir={out}", cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def test_training_saves_state_dicts_at_the_chosen_epochs_with_their_accuracy(trained):
    assert sorted(p.name for p in trained.glob("*.pt")) == ["epoch_0.pt", "epoch_1.pt", "final.pt"]
    saved = json.loads((trained / "accuracy.json").read_text())
    assert [(s["epoch"], s["files"]) for s in saved] == [(0, ["epoch_0.pt"]), (1, ["epoch_1.pt", "final.pt"])]
    for s in saved:
        assert 0.0 <= s["train_accuracy"] <= 1.0 and 0.0 <= s["val_accuracy"] <= 1.0
        # accuracy over 64 images: a multiple of 1/64
        assert s["train_accuracy"] * 64 == pytest.approx(round(s["train_accuracy"] * 64), abs=1e-4)
    before, after = (torch.load(trained / name, weights_only=True) for name in ("epoch_0.pt", "epoch_1.pt"))
    assert not torch.equal(before["linear.weight"], after["linear.weight"])  # SGD moved the weights
    assert int(after["stem.1.num_batches_tracked"]) == 4  # 64 images in batches of 16: BatchNorm saw 4 batches
    assert all(torch.equal(after[k], v) for k, v in torch.load(trained / "final.pt", weights_only=True).items())


@pytest.mark.slow
def test_the_checkpoint_loads_into_an_identical_network_and_is_the_attacked_victim(trained, tmp_path):
    state = torch.load(trained / "final.pt", weights_only=True)
    fresh = ResNet(1, 8, 10, depth=8, width=0.25)  # another init: every tensor must come from the file
    loaded = CheckpointInit(str(trained / "final.pt"))(fresh).state_dict()
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    # the app attacks that network
    from lightning_idlg.case.plan import plan_trials
    from lightning_idlg.case.share import prepare_batch
    from lightning_idlg.run.experiment import run as run_attack

    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, "model/init=checkpoint", f"model.init.path={trained / 'epoch_1.pt'}",
                                           "trials=2", "steps=2", "client.mode=eval", "progress_bar=false",
                                           "pictures=false", "progress_trials=0"])
    state = torch.load(trained / "epoch_1.pt", weights_only=True)
    dataset = instantiate(cfg.dataset)
    _, shared, _ = prepare_batch(cfg, dataset, plan_trials(cfg, len(dataset)))
    for name, weight in shared.weights.items():
        assert torch.equal(weight[0], state[name]) and torch.equal(weight[1], state[name])
    summary = run_attack(cfg, tmp_path / "attack")
    assert summary["dlg"]["trials"] == 2 and summary["idlg"]["trials"] == 2
    rows = [json.loads(line) for line in (tmp_path / "attack" / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and {r["axes"]["model.init"] for r in rows} == {"CheckpointInit"}
    assert all(1 <= r["steps"] <= 2 for r in rows)


def test_the_training_config_composes_with_every_victim():
    for model in ("lenet", "mlp", "resnet20", "resnet18", "convnet"):
        cfg = train_cfg(f"model={model}")
        check_settings(cfg)
        assert cfg.save_epochs == [0, 1, 2, "final"] and cfg.epochs >= 2 and "factory" in cfg.model


@pytest.mark.parametrize("override,message", [
    ("save_epochs=[0,9]", r"save_epochs entry 9 is not valid; valid: epochs 0..5 \(0: before training\) or 'final'"),
    ("save_epochs=[]", "save_epochs must be a non-empty list"),
    ("epochs=-1", "epochs must be an integer >= 0, got -1"),
    ("lr=0", "lr must be a number > 0, got 0"),
    ("momentum=1", r"momentum must be a number in \[0, 1\), got 1"),
    ("val_fraction=1.5", r"val_fraction must be a number in \(0, 1\), got 1.5"),
])
def test_bad_training_settings_fail_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        check_settings(train_cfg(override))


def test_the_entry_point_reports_a_bad_setting_in_one_line(tmp_path):
    result = run("lightning_idlg.train", "save_epochs=[7]", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "save_epochs entry 7 is not valid" in errors[0]
