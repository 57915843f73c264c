"""LPIPS as an option (`metrics.lpips=alex|vgg|squeeze`): one `error:` line when the backbone's ImageNet
weights are not on disk, before any attack; with them, records and summaries carry `lpips`.

No network here, so "with weights" is a stand-in: a seeded, randomly initialized torchvision AlexNet saved
under the file name torchvision looks for in a tmp $TORCH_HOME. The numbers it gives are not LPIPS as
published (that needs the ImageNet weights) but the code path is the real one. Its classifier layers, which
LPIPS never runs, are saved as zero-stride views of one zero (a 10 MB file instead of 244 MB):
`load_state_dict` copies them all the same. LPIPS' linear layers ship inside torchmetrics.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from lightning_idlg.records import metrics
from lightning_idlg.case.client import PrivateBatch
from lightning_idlg.errors import ConfigError
from lightning_idlg.case.plan import Trial
from lightning_idlg.records.evaluate import evaluate
from lightning_idlg.attacks.result import AttackResult
from lightning_idlg.records.store import summarize
from tests.conftest import run_app

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"


def lpips_app(cwd: Path, torch_home: Path, *args: str) -> subprocess.CompletedProcess:
    return run_app("threads=1", "progress_bar=false", "pictures=false", "progress_trials=0", *args,
                   f"hydra.run.dir={cwd / 'run'}", cwd=cwd, TORCH_HOME=str(torch_home), WANDB_MODE="disabled")


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory) -> Path:
    """A $TORCH_HOME holding a seeded random AlexNet where torchvision looks for its ImageNet weights."""
    import torchvision

    home = tmp_path_factory.mktemp("torch_home")
    torch.manual_seed(0)
    state = {k: v if k.startswith("features.") else torch.zeros(1, dtype=v.dtype).expand(v.shape)
             for k, v in torchvision.models.alexnet().state_dict().items()}
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, home / "hub" / "checkpoints" / ALEXNET_FILE)
    return home


@pytest.fixture
def weights_in(torch_home, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    return torch_home


def test_missing_weights_fail_in_one_line_naming_the_file_and_how_to_get_it(tmp_path):
    (tmp_path / "empty").mkdir()
    result = lpips_app(tmp_path, tmp_path / "empty", "metrics.lpips=alex", "steps=2", "trials=2")
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    expected = tmp_path / "empty" / "hub" / "checkpoints" / ALEXNET_FILE
    assert f"{expected} (missing)" in lines[0]
    assert "torchvision.models.alexnet(weights='DEFAULT')" in lines[0]
    assert f"https://download.pytorch.org/models/{ALEXNET_FILE}" in lines[0] and "metrics.lpips=false" in lines[0]
    assert not (tmp_path / "run" / "trials.jsonl").exists()  # refused before any attack


def test_bad_backbone_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"metrics.lpips='resnet' is not known; valid: false, alex, vgg, squeeze"):
        metrics.check_lpips("resnet")
    metrics.check_lpips(False)  # off: nothing to check


def test_grayscale_is_repeated_to_rgb_and_small_images_upsampled():
    gray = torch.rand(2, 1, 28, 28)
    rgb = metrics.lpips_input(gray)
    assert rgb.shape == (2, 3, 32, 32)
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    big = torch.rand(1, 3, 40, 48)
    assert torch.equal(metrics.lpips_input(big), big)  # large enough RGB: as it is


def _batch(k: int, b: int):
    """K trials of B private 1x28x28 images and reconstructions: trial 0's reconstructions are its private
    images in reverse order (matching must undo it), the others are noisy copies."""
    g = torch.Generator().manual_seed(1)
    private = torch.rand(k, b, 1, 28, 28, generator=g)
    dummy = (private + 0.2 * torch.randn(private.shape, generator=g)).clone()
    dummy[0] = private[0].flip(0)
    result = AttackResult("dlg", dummy, torch.zeros(k, b, dtype=torch.long), torch.zeros(k), ["converged"] * k,
                          torch.ones(k, dtype=torch.long), torch.ones(k, dtype=torch.long), 1.0,
                          torch.zeros(k, dtype=torch.long))
    trials = [Trial(i, tuple(range(i * b, (i + 1) * b)), 0, 0) for i in range(k)]
    return result, PrivateBatch(private, torch.zeros(k, b, dtype=torch.long), list(range(k))), trials


def _cfg(*overrides: str):
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_records_hold_lpips_of_the_matched_reconstruction(weights_in):
    result, private, trials = _batch(k=2, b=2)
    records = evaluate(_cfg("metrics.lpips=alex", "client.batch_size=2"), result, private, trials, trials)
    metric = metrics.lpips_metric("alex")
    # the same metric object, directly, on the matched pairs prepared by hand
    order = metrics.match(result.dummy, private.images)
    matched = torch.stack([d[o] for d, o in zip(result.dummy, order)]).flatten(0, 1)
    prepared = lambda x: torch.nn.functional.interpolate(x.clamp(0, 1).repeat(1, 3, 1, 1), size=[32, 32],
                                                         mode="bilinear", align_corners=False)
    metric.reset()
    metric.update(prepared(matched), prepared(private.images.flatten(0, 1)))
    direct = metric.compute().view(2, 2)
    metric.reset()
    for row, record in enumerate(records):
        per_image = [image["lpips"] for image in record["images"]]
        assert per_image == pytest.approx(direct[row].tolist(), abs=1e-6)
        assert record["lpips"] == pytest.approx(sum(per_image) / 2, abs=1e-7)
    assert records[0]["lpips"] == 0.0 and all(image["lpips"] == 0.0 for image in records[0]["images"])
    assert records[1]["lpips"] > 0.01   # noisy copies are not the same picture
    assert list(records[1])[:10][-4:] == ["mse", "psnr", "ssim", "lpips"]


def test_lpips_of_identical_images_is_zero(weights_in):
    images = torch.rand(3, 3, 32, 32)
    assert metrics.lpips(images, images, metrics.lpips_metric("alex")).tolist() == [0.0, 0.0, 0.0]


def test_records_without_the_option_have_no_lpips():
    result, private, trials = _batch(k=1, b=1)
    (record,) = evaluate(_cfg(), result, private, trials, trials)
    assert "lpips" not in record and "lpips" not in summarize([record])["dlg"]


def test_summary_median_lpips_over_the_records_that_have_it():
    base = {"method": "idlg", "label_correct": True, "mse": 1.0, "psnr": 1.0, "ssim": 0.5, "status": "converged",
            "steps": 1, "evaluations": 1, "seconds": 1.0}
    records = [{**base, "lpips": v} for v in (0.4, 0.1, 0.3)] + [dict(base)]
    assert summarize(records)["idlg"]["lpips"] == pytest.approx(0.3)


@pytest.mark.slow
def test_a_tiny_run_records_lpips_and_its_median(tmp_path, torch_home):
    result = lpips_app(tmp_path, torch_home, "metrics.lpips=alex", "steps=2", "trials=2", "dataset=digits")
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["index"]) for r in records) == [("dlg", 0), ("dlg", 1), ("idlg", 0), ("idlg", 1)]
    assert all(isinstance(r["lpips"], float) and r["lpips"] >= 0 for r in records)
    summary = json.loads((out / "summary.json").read_text())
    for method in ("dlg", "idlg"):
        mine = sorted(r["lpips"] for r in records if r["method"] == method)
        assert summary[method]["lpips"] == pytest.approx(sum(mine) / 2)
    assert "LPIPS" in result.stdout
    assert json.loads((out / "fingerprint.json").read_text())["methods"]["dlg"]["settings"]["metrics.lpips"] == "alex"


def test_the_option_off_leaves_the_fingerprint_of_older_run_dirs_unchanged():
    """Run dirs recorded before `metrics` existed still resume with metrics.lpips=false (the default)."""
    from lightning_idlg.records.rundir import settings

    off, on = settings(_cfg(), "idlg", 10), settings(_cfg("metrics.lpips=vgg"), "idlg", 10)
    assert "metrics.lpips" not in off and on.pop("metrics.lpips") == "vgg" and on == off


def test_median_lpips_is_a_metric_name_only_where_the_run_records_it():
    from lightning_idlg.run.tracking import metric_names

    assert "idlg/median_lpips" in metric_names(["idlg"], lpips=True)
    assert "idlg/median_lpips" not in metric_names(["idlg"]) and "idlg/median_ssim" in metric_names(["idlg"])


def test_the_python_api_evaluates_lpips_too(weights_in):
    from lightning_idlg.api import Reconstruction

    g = torch.Generator().manual_seed(2)
    private = torch.rand(2, 1, 28, 28, generator=g)
    images = torch.stack([private.flip(0), (private + 0.3 * torch.randn(private.shape, generator=g))])  # K=2, B=2
    result = Reconstruction("dlg", images, torch.zeros(2, 2, dtype=torch.long), torch.zeros(2), ["converged"] * 2,
                            torch.ones(2), torch.ones(2), 0.0)
    scores = result.evaluate(private, lpips="alex")
    direct = metrics.lpips(images[1], private, metrics.lpips_metric("alex"))   # B=2 noisy: order kept by matching
    assert scores["lpips"].tolist() == pytest.approx([0.0, float(direct.mean())], abs=1e-7)
    assert "lpips" not in result.evaluate(private)
