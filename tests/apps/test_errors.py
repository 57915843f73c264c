"""Every user-facing failure ends in one `error:` line on stderr and exit code 2, through the real entry
point: the cause, the file or key, what is valid. Bad data files fail before the first attack."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from lightning_idlg.errors import ConfigError
from lightning_idlg.run.experiment import validate

BASE = ["steps=2", "threads=1", "progress_bar=false", "pictures=false", "progress_trials=0"]
from tests import cli
from tests.case.test_data import write_cifar100_pickle, write_mnist_test


def error_line(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    result = cli.run([sys.executable, "-m", "lightning_idlg", *BASE, *args, f"hydra.run.dir={tmp_path / 'run'}"],
                     cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr and "Error executing job" not in result.stderr, \
        result.stderr[-2000:]
    assert not (tmp_path / "run" / "trials.jsonl").exists()  # refused before any attack
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_request_without_a_gpu_is_refused_before_the_data_is_loaded(tmp_path):
    # the data root does not exist: loading it first would have said so instead
    line = error_line(tmp_path, "trainer=gpu", "dataset=mnist", "dataset.root=/nonexistent")
    assert "trainer.accelerator=gpu" in line and "no usable CUDA GPU" in line and "trainer=cpu" in line


@pytest.mark.parametrize("override,message", [
    ("dataset.image_size=0", "dataset.image_size=0 is not a valid image size"),
    ("model.factory.activation=nope", "model.factory.activation='nope' is not known; valid: sigmoid, relu"),
    ("tolerance=-1", "tolerance must be a number > 0"),
])
def test_impossible_settings_name_their_key(tmp_path, override, message):
    assert message in error_line(tmp_path, "trials=1", override)


@pytest.mark.parametrize("override,message", [
    ("restarts=-1", "restarts must be an integer >= 0"),
    ("restart_distance=0", "restart_distance must be a number > 0"),
    ("patience=0", "patience must be an integer > 0 or null"),
    ("optimizer.lr=0", "optimizer.lr must be a number > 0"),
    ("optimizer.history_size=0", "optimizer.history_size must be an integer > 0"),
    ("optimizer.line_search_fn=armijo", "optimizer.line_search_fn='armijo' is not known"),
    ("optimizer=adam optimizer.betas=[0.9,1.5]", "optimizer.betas must be two numbers in [0, 1)"),
    ("attack.idlg.label_strategy.rule=guess", "attack.idlg.label_strategy.rule='guess' is not known"),
    ("attack.dlg.stopping.divergence_bound=-5", "attack.dlg.stopping.divergence_bound must be a number > 0"),
    ("model.init.scale=0", "model.init.scale must be a number > 0"),
    ("client.batch_size=0", "client.batch_size must be a positive integer"),
    ("defense=gaussian defense.gaussian.variance=-1", "defense.gaussian.variance must be a number >= 0"),
    ("defense=prune defense.prune.ratio=1.5", "defense.prune.ratio"),
    ("client.batch_size=2 method=idlg", "supports client.batch_size <= 1, got 2"),
    ("model/init=checkpoint", "model/init=checkpoint needs model.init.path="),
    ("model=mlp model.factory.hidden=[0]", "model.factory.hidden must be a list of positive integers"),
    ("dataset=image_folder dataset.channels=2", "dataset.channels=2 is not known; valid: 1, 3"),
    ("resume=maybe", "resume='maybe' is not known; valid: auto, force"),
    ("+defense.drop_prob=1.5", "defense.drop_prob is a probability: it must be a number in [0, 1]"),
])
def test_validate_covers_every_numeric_setting(override, message):
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("config", overrides=override.split(" "))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_truncated_or_garbage_cifar_pickle(tmp_path):
    write_cifar100_pickle(tmp_path / "data")
    split = tmp_path / "data" / "cifar-100-python" / "test"
    split.write_bytes(split.read_bytes()[:500])
    line = error_line(tmp_path, "dataset=cifar100", f"dataset.root={tmp_path / 'data'}", "trials=1")
    assert f"{split} is not a readable CIFAR-100 pickle" in line and "dataset.download=true" in line
    split.write_bytes(b"this is not a pickle at all")
    line = error_line(tmp_path, "dataset=cifar100", f"dataset.root={tmp_path / 'data'}", "trials=1")
    assert f"{split} is not a readable CIFAR-100 pickle" in line


def test_a_truncated_mnist_idx_file_is_named(tmp_path):
    write_mnist_test(tmp_path / "data")
    images = tmp_path / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    line = error_line(tmp_path, "dataset=mnist", f"dataset.root={tmp_path / 'data'}", "trials=1")
    assert f"{images} is truncated" in line and "5x28x28 images" in line


def test_an_unreadable_image_fails_before_the_first_attack(tmp_path):
    root = tmp_path / "images"
    for i in range(4):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(root / f"class{i % 2}" / f"{i}.png")
    bad = root / "class1" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    # 5 trials of 5 images: every image is picked; the bad one fails the check before any attack
    line = error_line(tmp_path, "dataset=image_folder", f"dataset.root={root}", "dataset.image_size=8", "trials=5")
    assert f"{bad} cannot be used" in line and "replace or remove the file" in line
