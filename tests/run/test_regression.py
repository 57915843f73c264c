"""The engine against an independent reference on the same trials (tests/reference.py: DLG and iDLG per
trial with torch.optim.LBFGS and plain double backprop, as the papers' scripts write them).

Why not stored records: the paper protocol (L-BFGS, lr 1, no line search) is chaotic. In float64, a
change of one part in 1e13 of the private image moved a trial's MSE by 3e-8 after one step (20 L-BFGS
iterations) and by 5-90% after two (2026-12-08), so records stored on one CPU are that CPU's kernels'
(they failed on an AVX512 Xeon and on an AVX2-only CPU). The reference and the engine already round
differently on any one CPU (vmap over K trials, the rank-one head, the engine's own L-BFGS), so where they
agree here they agree on every CPU; tolerances are the measured disagreement times 100 or more:
- float64, through the Python API (one victim, K = 3 trials batched, the exact head route): two steps of
  the paper's L-BFGS (40 iterations) and of the strong-Wolfe L-BFGS; measured within 1e-10, checked to 1e-6;
- float32, end to end through the app (data, a victim per trial, client, the rank-one head route): the
  first 8 L-BFGS iterations (steps=2, max_iter=4), before float32 trajectories part; measured within 1e-4,
  checked to 1e-2. Beyond those iterations tests/apps/test_app.py checks outcomes (convergence, labels).
Counts, statuses and labels are exact; integers drawn from the seed (images, labels) are pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from lightning_idlg import attack
from lightning_idlg.case.dataset import digits
from lightning_idlg.case.plan import derive_seed, plan_trials
from lightning_idlg.run.experiment import run
from lightning_idlg.case.model import make_victim
from tests import reference
from tests.regression import COMMON, PAPER, write_folder

EXACT = ("status", "steps", "evaluations", "predicted_label")
SHORT = ("steps=2", "optimizer.max_iter=4")  # 8 iterations: float32 trajectories have not parted yet
APP_CASES = {
    "digits_paper": ("trials=4",),  # LeNet 1x28x28, 10 classes
    "folder_paper": ("dataset=image_folder", "dataset.root={folder}", "trials=4"),  # 3x32x32, 20 classes
}
# seed 0 on the built-in digits: the images and labels of trials 0-3 (integers: the same on every machine)
DIGITS_TRIALS = [(362, 6), (1568, 5), (1440, 5), (1761, 7)]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def app_records(case: str, tmp_path: Path):
    folder = write_folder(tmp_path / "folder")
    overrides = [a.format(folder=folder) for a in (*PAPER, *SHORT, *APP_CASES[case], *COMMON)]
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    run(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    return cfg, sorted(rows, key=lambda r: (r["method"], r["index"]))


@pytest.mark.slow
@pytest.mark.parametrize("case", list(APP_CASES))
def test_app_records_equal_the_reference_float32(case, tmp_path, one_thread):
    cfg, rows = app_records(case, tmp_path)
    dataset = instantiate(cfg.dataset)
    plan = plan_trials(cfg, len(dataset))
    c, side, _ = dataset.shape
    assert [(r["method"], r["index"]) for r in rows] == [(m, i) for m in ("dlg", "idlg") for i in range(4)]
    if case == "digits_paper":
        assert [(r["image_index"], r["label"]) for r in rows[:4]] == DIGITS_TRIALS
    for r in rows:
        trial = plan[r["index"]]
        image, label = dataset[trial.images[0]]
        assert (r["image_index"], r["label"]) == (trial.images[0], label)
        net = reference.paper_victim(trial.victim_seed, c, side, dataset.num_classes)
        ours = make_victim(instantiate(cfg.model.factory), instantiate(cfg.model.init), in_channels=c,
                           image_size=side, num_classes=dataset.num_classes, seed=trial.victim_seed)
        # the paper's victim: the same draws, bit for bit, as the scripts' weights_init
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ours.state_dict().values()))
        ref = reference.attack(r["method"], net, image, label, trial.dummy_seed, cfg.steps,
                               max_iter=cfg.optimizer.max_iter)
        where = (case, r["method"], r["index"])
        assert {k: r[k] for k in EXACT} == {k: getattr(ref, k) for k in EXACT}, where
        assert r["mse"] == pytest.approx(ref.mse, rel=1e-2), where
        assert r["distance"] == pytest.approx(ref.distance, rel=1e-2), where


def own_model_case(image_index: int, victim_seed: int):
    """A float64 paper victim of one digit's gradient, as a user passes them to the Python API."""
    image, label = digits(image_size=28)[image_index]
    net = reference.paper_victim(victim_seed, 1, 28, 10).double()
    loss = F.cross_entropy(net(image[None].double()), torch.tensor([label]))
    return image, label, net, list(torch.autograd.grad(loss, list(net.parameters())))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("optimizer", ["lbfgs", "lbfgs_wolfe"])
@pytest.mark.parametrize("method", ["dlg", "idlg"])
def test_api_float64_equals_the_reference(method, optimizer, device, one_thread):
    image, label, net, gradient = own_model_case(1568, 6)
    result = attack(net.to(device), [g.to(device) for g in gradient], (1, 28, 28), method=method, trials=3,
                    seed=0, device=device,
                    overrides=[f"optimizer={optimizer}", *PAPER[1:], "steps=2", "trainer.precision=64-true"])
    search = "strong_wolfe" if optimizer == "lbfgs_wolfe" else None
    for i in range(3):
        ref = reference.attack(method, reference.paper_victim(6, 1, 28, 10), image, label, derive_seed(0, i, 1), 2,
                               dtype=torch.float64, line_search_fn=search)
        mse = float(((result.images[i, 0].cpu().double() - image.double()) ** 2).mean())
        ours = (result.status[i], int(result.steps[i]), int(result.evaluations[i]), int(result.labels[i, 0]))
        assert ours == tuple(getattr(ref, k) for k in EXACT), i
        assert mse == pytest.approx(ref.mse, rel=1e-6), i
        assert float(result.distance[i]) == pytest.approx(ref.distance, rel=1e-6), i
