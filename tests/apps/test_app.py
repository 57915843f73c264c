"""The Hydra app and the experiment loop, end to end, on the built-in data sets (no files, no network)."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import lightning_idlg.attacks.inversion as attack_module
from lightning_idlg.records import paper as paper_protocol
from lightning_idlg.attacks.inversion import GradientInversion
from lightning_idlg.attacks.labels import LearnedLabel
from lightning_idlg.attacks.optimizer import BatchedLBFGS
from lightning_idlg.case.client import PrivateBatch, SharedGradient
from lightning_idlg.case.share import prepare_batch
from lightning_idlg.errors import ConfigError
from lightning_idlg.run.experiment import run
from tests.conftest import compose_config, run_app

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GROUPS = ("dataset", "model", "model/init", "client", "defense", "attack", "method", "optimizer", "trainer", "logger",
          "experiment")


def cfg_of(*overrides: str):
    return compose_config("progress_bar=false", *overrides)


def attack_of(shared: SharedGradient, name: str = "idlg", *overrides: str) -> GradientInversion:
    """The attack `name` as configs/attack/<name>.yaml assembles it, on `shared`."""
    cfg = cfg_of(*overrides)
    return instantiate(cfg.attack[name])(shared=shared, name=name, optimizer=instantiate(cfg.optimizer))


def _tiny_shared() -> SharedGradient:
    cfg = cfg_of("trials=2", "dataset.image_size=8")
    from lightning_idlg.case.plan import plan_trials
    dataset = instantiate(cfg.dataset)
    return prepare_batch(cfg, dataset, plan_trials(cfg, len(dataset)))[1]


def app(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_app(*args, cwd=cwd)


SHARED = None


@pytest.fixture(autouse=True, scope="module")
def _shared_record():
    global SHARED
    SHARED = _tiny_shared()


@pytest.mark.parametrize("group,option", [
    (group, path.stem) for group in GROUPS for path in sorted((CONFIGS / group).glob("*.yaml"))
])
def test_every_config_group_option_composes(group, option):
    extra = ["model.init.path=x.pt"] if (group, option) == ("model/init", "checkpoint") else []
    cfg = cfg_of(f"{group}={option}", *extra)
    assert cfg.trials >= 1 and cfg.steps >= 1
    assert "factory" in cfg.model and cfg.optimizer._target_.startswith("lightning_idlg.attacks.optimizer.")
    assert set(cfg.attack) <= {"dlg", "idlg", "ig"} and cfg.attack
    if group in ("attack", "method"):
        assert set(cfg.attack) == ({"dlg", "idlg"} if option == "both" else {option})
    # every part is instantiated, not only composed
    from lightning_idlg.case.share import make_defense
    assert instantiate(cfg.client).batch_size == cfg.client.batch_size
    chain = make_defense(cfg)
    assert chain.describe()["name"] == ("+".join(cfg.defense) or "none")
    if group == "defense":
        assert list(cfg.defense) == ([] if option == "none" else [option])
    init = instantiate(cfg.model.init)
    assert init.one_network == (cfg.model.init._target_.endswith("CheckpointInit"))
    for name, node in cfg.attack.items():
        assert instantiate(node)(shared=SHARED, name=name, optimizer=instantiate(cfg.optimizer)).method == name


def test_paper_presets_are_the_reference_protocol():
    for name, classes_dataset in (("paper_mnist", "mnist"), ("paper_cifar100", "cifar100"), ("paper_lfw", "lfw")):
        cfg = cfg_of(f"experiment={name}")
        assert cfg.dataset._target_ == f"lightning_idlg.case.dataset.{classes_dataset}"
        assert (cfg.trials, cfg.steps, cfg.tolerance) == (1000, 300, 1e-6)
        assert cfg.model.factory.activation == "sigmoid" and cfg.model.init.scale == 0.5
        assert cfg.model.init._target_ == "lightning_idlg.case.model.UniformInit"
        assert set(cfg.attack) == {"dlg", "idlg"} and cfg.attack.idlg.label_strategy.rule == "weight_sum"
        assert cfg.attack.dlg.label_strategy._target_ == "lightning_idlg.attacks.labels.LearnedLabel"
        assert (cfg.client.batch_size, cfg.client.reduction, dict(cfg.defense)) == (1, "mean", {})
        assert set(cfg_of(f"experiment={name}", "method=dlg").attack) == {"dlg"}  # a preset with one method
        opt = cfg.optimizer
        assert (opt.lr, opt.max_iter, opt.history_size, opt.line_search_fn) == (1.0, 20, 100, None)


def test_improved_presets_are_the_paper_protocol_plus_line_search_restarts_patience():
    for name in ("paper_mnist", "paper_cifar100", "paper_lfw"):
        paper, improved = cfg_of(f"experiment={name}"), cfg_of(f"experiment={name}_improved")
        assert improved.optimizer.line_search_fn == "strong_wolfe" and paper.optimizer.line_search_fn is None
        assert (improved.patience, improved.restarts) == (20, 2) and (paper.patience, paper.restarts) == (None, 0)
        for key in ("dataset", "model", "client", "defense", "trials", "steps", "tolerance", "seed"):
            assert improved[key] == paper[key], key
        # the attacks' parts are the same; only the shortcuts their stopping reads differ
        assert OmegaConf.to_container(improved.attack) == OmegaConf.to_container(paper.attack)


def test_reliable_presets_are_the_improved_ones_with_more_patience_late_restarts_and_the_best_iterate():
    for name in ("paper_mnist", "paper_cifar100", "paper_lfw"):
        improved, reliable = cfg_of(f"experiment={name}_improved"), cfg_of(f"experiment={name}_reliable")
        assert (reliable.patience, reliable.restarts, reliable.restart_distance, reliable.keep) == (50, 2, 1e-4, "best")
        assert {a.stopping.keep for a in reliable.attack.values()} == {"best"}
        for key in ("dataset", "model", "client", "defense", "optimizer", "trials", "seed"):
            assert reliable[key] == improved[key], key
        # MNIST's misses are speckled backgrounds that match the gradient as closely as right answers, LFW's
        # slowest trials need more steps and its one stalled face a prior: a faint total variation on both
        weight = {"paper_mnist": 3e-8, "paper_cifar100": None, "paper_lfw": 1e-8}[name]
        prior = {"tv": {"_target_": "lightning_idlg.attacks.regularizers.TotalVariation", "weight": weight}} if weight else {}
        assert OmegaConf.to_container(reliable.regularizers) == prior
        assert all(OmegaConf.to_container(a.regularizers) == prior for a in reliable.attack.values())
        assert reliable.tolerance == (None if name == "paper_mnist" else 1e-6)
        assert (improved.steps, reliable.steps) == (300, 600 if name == "paper_lfw" else 300)
        # the report tells these runs apart by paper.RELIABLE (and RELIABLE_DATA): the same values as the files
        resolved = OmegaConf.to_container(reliable, resolve=True)
        assert paper_protocol.protocol_of(resolved) == ("reliable", {})


def test_keep_selects_the_iterate_every_attack_of_the_run_returns():
    assert {n: a.stopping.keep for n, a in cfg_of("method=both").attack.items()} == {"dlg": "last", "idlg": "last"}
    assert {n: a.stopping.keep for n, a in cfg_of("method=both", "keep=best").attack.items()} == {
        "dlg": "best", "idlg": "best"}
    assert cfg_of("method=ig").attack.ig.stopping.keep == "best"  # Inverting Gradients keeps its best always


def test_restarts_redraw_a_diverged_trial_and_are_recorded(tmp_path):
    """divergence_bound 0.5: every N(0, 1) dummy 'diverges' at once, so each trial uses all its restarts,
    each from the next draw of its own seed, and ends diverged."""
    from lightning_idlg.attacks.dummy import GaussianDummy

    run(cfg_of("method=idlg", "trials=2", "steps=5", "restarts=2", "attack.idlg.stopping.divergence_bound=0.5",
               "dataset.image_size=16", "pictures=false", "progress_trials=0"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r["restarts"] for r in records] == [2, 2]
    assert [r["status"] for r in records] == ["diverged", "diverged"]
    assert [r["steps"] for r in records] == [3, 3]  # one step per attempt
    draw = GaussianDummy().draw
    first, second = draw([7], (1, 4, 4), 1, 10), draw([7], (1, 4, 4), 1, 10, attempt=1)
    assert not torch.equal(first[0], second[0])
    assert torch.equal(second[0], draw([7], (1, 4, 4), 1, 10, attempt=1)[0])  # deterministic


@pytest.mark.slow
def test_patience_stops_a_trial_whose_distance_stops_halving(tmp_path):
    """patience=1: a trial stops at the first step that does not halve D; without it (patience=null, the
    paper; the quick default has 20), all 40 steps run."""
    def records(*extra):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        run(cfg_of("dataset=digits", "method=idlg", "trials=4", "steps=40", "seed=3", "tolerance=1e-12",
                   "optimizer=lbfgs",
                   "pictures=false", "progress_trials=0", *extra), out)
        return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]

    plain, patient = records("patience=null"), records("patience=1")
    assert all(r["steps"] == 40 or r["status"] == "diverged" for r in plain)
    stopped = [r for r in patient if r["status"] == "not_converged"]
    assert stopped and all(r["steps"] < 40 for r in stopped)
    assert sum(r["evaluations"] for r in patient) < sum(r["evaluations"] for r in plain)


@pytest.mark.slow
def test_entry_point_writes_the_documented_outputs(tmp_path):
    out = tmp_path / "run"
    result = app("trials=2", "steps=3", "dataset.image_size=16", f"hydra.run.dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lightning_idlg summary" in result.stdout
    assert (out / "config.yaml").exists() and (out / ".hydra" / "overrides.yaml").exists()
    records = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["index"]) for r in records) == [("dlg", 0), ("dlg", 1), ("idlg", 0), ("idlg", 1)]
    for r in records:
        assert {"method", "index", "label", "predicted_label", "mse", "psnr", "ssim", "status", "steps",
                "seconds", "evaluations", "distance"} <= set(r)
        assert r["status"] in ("converged", "not_converged", "diverged") and 1 <= r["steps"] <= 3
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"dlg", "idlg"}
    for s in summary.values():
        assert s["trials"] == 2 and set(s["fidelity"]) == {"0.01", "0.005", "0.001", "0.0005", "0.0001"}
        assert {"label_accuracy", "status", "psnr", "ssim"} <= set(s)
    assert summary["idlg"]["label_accuracy"] == 1.0
    for name in ("trial_00000.png", "trial_00001.png", "progress_00000.png", "progress_00001.png"):
        assert Image.open(out / "pictures" / name).size[0] > 0
    # ground truth | DLG | iDLG: three 16-pixel tiles upscaled at least 4x, labelled (pictures.py)
    with Image.open(out / "pictures" / "trial_00000.png") as picture:
        assert picture.width >= 3 * 4 * 16 and picture.height >= 4 * 16 and picture.text == {"lightning_idlg": "labelled"}


def test_the_installed_console_scripts_are_the_apps():
    """What the installed scripts call (their entry points, as pip wrote them): a script whose target moved
    would fail here, not on a user's machine."""
    from importlib.metadata import entry_points

    from lightning_idlg import app, label_restoration, report, train

    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("lightning-idlg")}
    expected = {"lightning-idlg": app.main, "lightning-idlg-report": report.main, "lightning-idlg-train": train.main,
                "lightning-idlg-labels": label_restoration.main}
    assert {name: ep.load() for name, ep in scripts.items()} == expected
    assert Path(sys.executable).with_name("lightning-idlg").exists()


def test_the_module_entry_point_is_the_app(tmp_path):
    result = app("trials=0", cwd=tmp_path)  # python -m lightning_idlg: the same one-line refusal
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == \
        "error: trials must be a positive integer, got 0"


@pytest.mark.parametrize("override,message", [
    ("trials=0", "error: trials must be a positive integer, got 0"),
    ("keep=first", "error: keep='first' is not known; valid: last, best"),
    ("steps=-3", "error: steps must be a positive integer, got -3"),
    ("trials_per_group=many", "error: trials_per_group must be 'auto' or a positive integer, got 'many'"),
    ("dataset=mnist", "MNIST test files not found in"),
    ("dataset=digits", "dataset=digits ships with scikit-learn and reads no files"),  # the default has no root
])
def test_bad_overrides_fail_with_one_clear_line(tmp_path, override, message):
    result = app(override, "dataset.root=/nonexistent" if override.startswith("dataset") else "seed=0",
                 f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr[-1500:]


def test_unknown_group_option_lists_the_valid_ones(tmp_path):
    result = app("method=foo", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'method/foo'" in result.stderr and "idlg" in result.stderr


def test_validation_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="seed must be an integer"):
        run(cfg_of("seed=abc"), tmp_path)


@pytest.mark.slow
def test_label_extraction_alone_is_exact(tmp_path):
    """`method=idlg steps=1`: the label comes from the gradient before any optimization."""
    summary = run(cfg_of("method=idlg", "trials=200", "steps=1", "pictures=false", "progress_trials=0",
                         "dataset.image_size=16"), tmp_path)
    assert summary["idlg"]["trials"] == 200 and summary["idlg"]["label_accuracy"] == 1.0


@pytest.mark.slow
def test_idlg_recovers_the_image_on_the_paper_lenet(tmp_path):
    """Paper LeNet for 1x28x28 inputs (sigmoid, U(-0.5, 0.5), hidden 588, 10 classes), L-BFGS lr 1, seed
    fixed: both trials converge below MSE 1e-3 (measured: 6.6e-7 and 1.6e-7 within 60 steps)."""
    summary = run(cfg_of("dataset=digits", "method=idlg", "trials=2", "steps=60", "seed=1", "pictures=false",
                         "progress_trials=0"), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["converged", "converged"]
    assert all(r["mse"] < 1e-3 and r["label_correct"] for r in records)
    assert summary["idlg"]["fidelity"]["0.001"] == 1.0


@pytest.mark.slow
def test_same_seed_same_results_and_batching_does_not_matter(tmp_path):
    def records(run_dir, *extra):
        run(cfg_of("trials=3", "steps=4", "dataset.image_size=16", "pictures=false", "progress_trials=0",
                   *extra), run_dir)
        return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "group_size")}
                for line in (run_dir / "trials.jsonl").read_text().splitlines()]

    first, again = records(tmp_path / "a"), records(tmp_path / "b")
    assert first == again
    one_at_a_time = records(tmp_path / "c", "trials_per_group=1")
    for a, b in zip(sorted(first, key=lambda r: (r["method"], r["index"])),
                    sorted(one_at_a_time, key=lambda r: (r["method"], r["index"]))):
        assert (a["method"], a["index"], a["image_index"], a["label"], a["predicted_label"]) == \
               (b["method"], b["index"], b["image_index"], b["label"], b["predicted_label"])
        # distances are not compared: float32 L-BFGS amplifies reduction-order differences chaotically
        # (2-11% after 4 steps); batched == solo per trial is asserted exactly in float64 in test_optim.py
    other_seed = records(tmp_path / "d", "seed=1")
    assert [r["image_index"] for r in other_seed] != [r["image_index"] for r in first]


def test_the_attack_sees_only_the_shared_gradient():
    """The wall between client and attacker: by the API, by the record's fields, by the imports."""
    assert {f.name for f in fields(SharedGradient)} == {"model", "weights", "gradients", "input_shape",
                                                        "num_classes", "batch_size", "reduction", "buffers",
                                                        "defense", "local"}
    params = set(inspect.signature(GradientInversion.__init__).parameters)
    assert not params & {"images", "labels", "private", "target", "x", "y"}
    assert "PrivateBatch" not in vars(attack_module)
    cfg = cfg_of("trials=2", "dataset.image_size=16")
    from hydra.utils import instantiate
    from lightning_idlg.case.plan import plan_trials
    dataset = instantiate(cfg.dataset)
    private, shared, _ = prepare_batch(cfg, dataset, plan_trials(cfg, len(dataset)))
    with pytest.raises(TypeError, match="SharedGradient"):
        GradientInversion(private, LearnedLabel(), optimizer=BatchedLBFGS)  # a PrivateBatch is refused
    attack = attack_of(shared)
    held = [t for t in list(attack.buffers()) + list(attack.parameters())]
    for tensor in held:  # nothing the attack holds is the private image
        assert not (tensor.shape == private.images.shape and torch.equal(tensor, private.images))
    assert isinstance(private, PrivateBatch)


def test_the_attack_factors_a_rank_one_head_gradient():
    """One sample's output-layer gradient is an outer product: the attack compares against its factors
    (objective.py); a gradient that is not rank one (here: noised) is compared against as shared."""
    from hydra.utils import instantiate
    from lightning_idlg.case.plan import plan_trials
    cfg = cfg_of("trials=2", "dataset.image_size=16")
    dataset = instantiate(cfg.dataset)
    _, shared, _ = prepare_batch(cfg, dataset, plan_trials(cfg, len(dataset)))
    head = "classifier.weight"
    factored = attack_of(shared)._names["target"]
    assert head not in factored and {f"{head}:left", f"{head}:right", f"{head}:residual"} <= set(factored)
    t = shared.gradients[head]
    noise = 1e-3 * t.abs().max() * torch.randn(t.shape, generator=torch.Generator().manual_seed(0))
    noised = replace(shared, gradients={**shared.gradients, head: t + noise})
    assert head in attack_of(noised)._names["target"]


def test_the_attack_gathers_the_evaluated_rows_once_per_set():
    """objective(rows) for a subset copies those trials' weights and targets once and keeps the last two
    sets (attack._held_rows); all rows are views. D is the same as for the whole batch."""
    from hydra.utils import instantiate
    from lightning_idlg.case.plan import plan_trials
    cfg = cfg_of("trials=3", "dataset.image_size=16")
    _, shared, _ = prepare_batch(cfg, instantiate(cfg.dataset), plan_trials(cfg, 3))
    attack = attack_of(shared)
    every = attack.objective(torch.arange(3)).detach()
    assert attack.gathers == 0
    for rows, gathers in (([0], 1), ([0], 1), ([1], 2), ([0], 2), ([2], 3), ([1], 3), ([0], 4)):
        d = attack.objective(torch.tensor(rows)).detach()
        assert attack.gathers == gathers, (rows, attack.gathers)
        torch.testing.assert_close(d, every[rows], rtol=1e-5, atol=0)
