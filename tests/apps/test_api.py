"""The Python API (lightning_idlg.attack / show), the notebook example, and own models through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lightning_idlg import Reconstruction, attack, show
from lightning_idlg.errors import ConfigError
from lightning_idlg.attacks.fit import attack_batch
from lightning_idlg.case.plan import plan_trials
from lightning_idlg.case.share import prepare_batch
from tests.toys import TinyNet
from tests import cli
from tests.conftest import run_app

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_app(*args, cwd=cwd)


@pytest.mark.slow
def test_the_notebook_example_attacks_its_own_model_in_under_20_lines():
    script = ROOT / "examples" / "attack_your_model.py"
    assert len(script.read_text().splitlines()) < 20
    done = cli.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("label 0 (true 0), MSE ") and float(line.split("MSE ")[1].split(",")[0]) < 1e-3, line


def test_the_api_and_the_cli_run_the_same_attack():
    """The same victim, gradient and dummy seed: the API's reconstruction is the experiment's, bitwise."""
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("config", overrides=["method=idlg", "trials=1", "steps=5", "dataset.image_size=8",
                                           "progress_bar=false", "progress_trials=0"])
    dataset = instantiate(cfg.dataset)
    plan = plan_trials(cfg, len(dataset))
    private, shared, _ = prepare_batch(cfg, dataset, plan)
    cli, _ = attack_batch(cfg, "idlg", shared, plan, None, [])
    victim = shared.model
    with torch.no_grad():
        for name, p in victim.named_parameters():
            p.copy_(shared.weights[name][0])
    gradient = {n: g[0] for n, g in shared.gradients.items()}
    api = attack(victim, gradient, (1, 8, 8), method="idlg", overrides=["steps=5"], seed=cfg.seed)
    assert isinstance(api, Reconstruction) and api.images.shape == (1, 1, 1, 8, 8)
    assert torch.equal(api.images, cli.dummy) and torch.equal(api.labels, cli.predicted_label)
    assert api.status == cli.status and torch.equal(api.evaluations, cli.evaluations)
    listed = attack(victim, list(gradient.values()), (1, 8, 8), method="idlg", overrides=["steps=5"], seed=cfg.seed)
    assert torch.equal(listed.images, api.images)
    scores = api.evaluate(private.images[0], private.labels[0])
    assert set(scores) == {"mse", "psnr", "ssim", "label_accuracy"} and float(scores["label_accuracy"][0]) == 1.0


def test_trials_are_independent_draws_and_show_draws_them():
    torch.manual_seed(0)
    model = TinyNet(num_classes=10)
    image, label = torch.rand(1, 1, 8, 8), torch.tensor([3])
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(model(image), label), list(model.parameters()))
    result = attack(model, grads, (1, 8, 8), method="dlg", trials=2, overrides=["steps=3"])
    assert result.images.shape == (2, 1, 1, 8, 8) and result.labels.shape == (2, 1)
    assert not torch.equal(result.images[0], result.images[1])
    matplotlib.use("Agg")
    figure = show(result, image[0])
    assert len(figure.axes) == 3  # the private image and two trials


def test_bad_gradients_get_one_line():
    model = TinyNet(num_classes=10)
    with pytest.raises(ConfigError, match=r"gradient\['net.1.weight'\] has shape \(1, 16, 64\).*no trial axis"):
        attack(model, [p[None] for p in model.parameters()], (1, 8, 8))
    with pytest.raises(ConfigError, match="the gradient has 1 tensors, the model 4 parameters"):
        attack(model, [torch.zeros(3)], (1, 8, 8))
    with pytest.raises(ConfigError, match="attack/nope"):
        attack(model, [torch.zeros_like(p) for p in model.parameters()], (1, 8, 8), method="nope")


@pytest.mark.slow
def test_an_own_model_through_the_cli_gets_only_the_arguments_it_takes(tmp_path):
    done = run_cli("model=custom", "model.factory.target=tests.toys.TinyNet", "+model.factory.hidden=8",
                   "dataset.image_size=8", "trials=1", "steps=2", "progress_bar=false", f"hydra.run.dir={tmp_path / 'r'}",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "r" / "trials.jsonl").read_text().splitlines()[0])
    assert record["axes"]["model"] == "TinyNet" and record["axes"]["model.factory.hidden"] == 8
    bad = run_cli("model=custom", "model.factory.target=nowhere.Net", "trials=1", f"hydra.run.dir={tmp_path / 'b'}",
                  cwd=tmp_path)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "cannot be imported" in errors[0], bad.stderr[-1500:]


def test_importing_the_package_imports_no_torch():
    """The app takes its run dir's lock before torch is imported (a refused run stops in under a second):
    the package's API is imported on first use only."""
    done = cli.run([sys.executable, "-c", "import sys, lightning_idlg, lightning_idlg.app; "
                    "print('torch' in sys.modules, 'lightning' in sys.modules)"],
                   capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "False"], done.stdout + done.stderr[-1000:]


def test_an_own_class_given_as_the_lenet_factory_gets_one_line_pointing_to_model_custom(tmp_path):
    done = run_cli("model.factory._target_=tests.toys.TinyNet", "dataset.image_size=8", "trials=1", "steps=1",
                   "progress_bar=false", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-1500:]
    assert "unexpected keyword argument 'activation'" in errors[0] and "model=custom model.factory.target=" in errors[0]
