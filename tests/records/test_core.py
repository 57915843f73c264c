"""The composable core: client batches, victims with state, defenses at the client, records that know
their axes, and parts added from outside the package (tests/toys.py, tests/configs/)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from lightning_idlg.records import metrics
from lightning_idlg.case.client import Client, PrivateBatch, stack_victims
from lightning_idlg.case.defense import DPSGD, compose as chain
from lightning_idlg.errors import ConfigError
from lightning_idlg.case.plan import plan_trials
from lightning_idlg.case.share import prepare_batch
from lightning_idlg.run.experiment import run
from lightning_idlg.attacks.objective import BatchedDistance
from lightning_idlg.case.model import LeNet, make_victim
from tests.toys import bn_victims
from tests.conftest import compose_config, run_app

ROOT = Path(__file__).resolve().parents[2]
TOY_CONFIGS = ROOT / "tests" / "configs"
pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_of(*overrides: str):
    return compose_config("progress_bar=false", "pictures=false", "progress_trials=0", *overrides)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def app(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_app(*args, cwd=cwd)


# --- client batches -------------------------------------------------------------------------------------

def test_psnr_is_computed_in_float64_whatever_the_default_dtype():
    """10 log10(1 / MSE) by hand, in float64, the same bits under a float64 default dtype (inside a 64-true
    fit) as outside it; clamped to [0, 1] first; torchmetrics' value to its float32 log(10)."""
    target = torch.full((2, 1, 4, 4), 0.5)
    reconstruction = target.double() + torch.tensor([1e-4, 3e-3], dtype=torch.float64).view(2, 1, 1, 1)
    reconstruction[1, 0, 0, 0] = 2.0  # clamped to 1: error 0.5 at one pixel
    mse = torch.tensor([1e-8, ((0.5 ** 2) + 15 * 3e-3 ** 2) / 16], dtype=torch.float64)
    outside = metrics.psnr(reconstruction, target)
    assert outside.dtype == torch.float64
    assert torch.allclose(outside, 10 * torch.log10(1 / mse), rtol=1e-10, atol=0)  # float32: 1e-7
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        inside = metrics.psnr(reconstruction, target)
    finally:
        torch.set_default_dtype(before)
    assert torch.equal(inside, outside)
    from torchmetrics.functional.image import peak_signal_noise_ratio
    theirs = [peak_signal_noise_ratio(r[None].clamp(0, 1), t[None], data_range=1.0) for r, t in zip(reconstruction, target)]
    assert torch.allclose(outside, torch.stack(theirs).double(), rtol=1e-7, atol=0)


def test_matching_undoes_a_permutation_and_metrics_compare_matched_pairs():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 4, 1, 5, 5, generator=g)
    perm = torch.tensor([[2, 0, 3, 1], [0, 1, 2, 3]])
    shuffled = torch.stack([t[p] for t, p in zip(truth, perm)])
    order = metrics.match(shuffled + 1e-3, truth)
    # order[k, j]: the reconstruction matched to private image j; shuffled[k, i] = truth[k, perm[k, i]]
    assert torch.equal(torch.stack([p.argsort() for p in perm]), order)
    assert torch.equal(metrics.match(truth[:, :1], truth[:, :1]), torch.zeros(2, 1, dtype=torch.long))
    nan = shuffled.clone()
    nan[0, 0] = float("nan")  # a diverged reconstruction still gets matched (last), never an error
    assert sorted(metrics.match(nan, truth)[0].tolist()) == [0, 1, 2, 3]


def test_a_client_batch_of_four_runs_end_to_end_with_matched_metrics(tmp_path):
    summary = run(cfg_of("method=dlg", "client.batch_size=4", "trials=2", "steps=3", "dataset.image_size=12"),
                  tmp_path)
    rows = records(tmp_path)
    assert [r["index"] for r in rows] == [0, 1] and summary["dlg"]["trials"] == 2
    for r in rows:
        assert r["client_batch_size"] == 4 and len(r["images"]) == 4 and len(set(r["image_index"])) == 4
        assert sorted(i["matched_reconstruction"] for i in r["images"]) == [0, 1, 2, 3]
        assert r["mse"] == pytest.approx(sum(i["mse"] for i in r["images"]) / 4)
        assert r["label_accuracy"] == sum(i["label"] == i["predicted_label"] for i in r["images"]) / 4
        assert r["label_correct"] == (r["label_accuracy"] == 1.0)
    # trial 0 of B = 4 holds the first 4 images of the seed's draw; B = 1's trial 0 holds the first alone
    one = plan_trials(cfg_of("trials=4"), 1797)
    assert rows[0]["image_index"] == [t.images[0] for t in one]


def test_idlg_label_rule_refuses_a_batch_in_one_line():
    cfg = cfg_of("method=idlg", "client.batch_size=2", "trials=1", "dataset.image_size=8")
    dataset = instantiate(cfg.dataset)
    _, shared, _ = prepare_batch(cfg, dataset, plan_trials(cfg, len(dataset)))
    with pytest.raises(ConfigError, match=r"supports client.batch_size <= 1, got 2"):
        instantiate(cfg.attack.idlg)(shared=shared, name="idlg", optimizer=instantiate(cfg.optimizer))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_distance_of_a_batch_equals_a_per_trial_autograd_loop(reduction):
    """B = 3 samples per client: D and its gradient w.r.t. x' against module + F.cross_entropy + autograd."""
    k, b, side, classes = 2, 3, 8, 10
    victims = [make_victim(LeNet, in_channels=1, image_size=side, num_classes=classes, seed=s).double()
               for s in range(k)]
    weights, _ = stack_victims(victims)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(k, b, 1, side, side, generator=g, dtype=torch.float64), torch.randint(classes, (k, b), generator=g)
    shared, _ = Client(batch_size=b, reduction=reduction).share(victims[0], weights, {}, PrivateBatch(images, labels), classes)
    dummy = torch.randn(k, b, 1, side, side, generator=g, dtype=torch.float64, requires_grad=True)
    probs = F.one_hot(labels, classes).double()
    d = BatchedDistance(victims[0], (1, side, side), batch_size=b, reduction=reduction)(
        weights, shared.gradients, dummy, probs)
    grads = torch.autograd.grad(d.sum(), dummy)[0]
    for i, net in enumerate(victims):
        true = torch.autograd.grad(F.cross_entropy(net(images[i]), labels[i], reduction=reduction), list(net.parameters()))
        x = dummy[i].detach().clone().requires_grad_()
        mine = torch.autograd.grad(F.cross_entropy(net(x), labels[i], reduction=reduction), list(net.parameters()),
                                   create_graph=True)
        ref = sum(((m - t) ** 2).sum() for m, t in zip(mine, true))
        assert float(d[i].detach()) == pytest.approx(float(ref), rel=1e-10)
        torch.testing.assert_close(grads[i], torch.autograd.grad(ref, x)[0], rtol=1e-9, atol=1e-12)
    at_truth = BatchedDistance(victims[0], (1, side, side), batch_size=b, reduction=reduction)(
        weights, shared.gradients, images, probs)
    assert float(at_truth.max()) < 1e-20


# --- victims with state ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_batchnorm_victims_shared_gradient_equals_plain_autograd(mode):
    k, b, side, classes = 2, 3, 6, 5
    victims = bn_victims(k, side, classes)
    weights, buffers = stack_victims(victims)
    g = torch.Generator().manual_seed(2)
    images = torch.rand(k, b, 1, side, side, generator=g, dtype=torch.float64)
    labels = torch.randint(classes, (k, b), generator=g)
    client = Client(batch_size=b, mode=mode, share_buffers=True)
    shared, _ = client.share(victims[0], weights, buffers, PrivateBatch(images, labels), classes)
    assert set(shared.buffers) == {"features.1.running_mean", "features.1.running_var", "features.1.num_batches_tracked"}
    assert Client(batch_size=b, mode=mode).share(victims[0], weights, buffers, PrivateBatch(images, labels),
                                                 classes)[0].buffers is None  # not shared unless the threat model says so
    for i, net in enumerate(victims):
        before = net.features[1].running_mean.clone()
        getattr(net, mode)()
        loss = F.cross_entropy(net(images[i]), labels[i])
        for (name, _), grad in zip(net.named_parameters(), torch.autograd.grad(loss, list(net.parameters()))):
            torch.testing.assert_close(shared.gradients[name][i], grad, rtol=1e-9, atol=1e-12)
        net.features[1].running_mean.copy_(before) if mode == "train" else None
    # the attacker's D is zero at the private batch in the same mode (buffers passed with the weights)
    d = BatchedDistance(shared.model, None, batch_size=b)(weights, shared.gradients, images,
                                                          F.one_hot(labels, classes).double(), shared.buffers)
    assert float(d.max()) < 1e-20


@pytest.mark.slow
def test_a_checkpoint_victim_is_one_network_for_all_trials(tmp_path):
    net = make_victim(LeNet, in_channels=1, image_size=12, num_classes=10, seed=5)
    torch.save(net.state_dict(), tmp_path / "victim.pt")
    cfg = cfg_of("model/init=checkpoint", f"model.init.path={tmp_path / 'victim.pt'}", "trials=3", "steps=2",
                 "dataset.image_size=12")
    dataset = instantiate(cfg.dataset)
    _, shared, _ = prepare_batch(cfg, dataset, plan_trials(cfg, len(dataset)))
    w = shared.weights["classifier.weight"]
    assert w.shape[0] == 3 and w.stride(0) == 0  # a view, not 3 copies
    assert torch.equal(w[2], net.classifier.weight)
    attack = instantiate(cfg.attack.idlg)(shared=shared, name="idlg", optimizer=instantiate(cfg.optimizer))
    held = [getattr(attack, f"weight_{i}") for i in range(len(attack._names["weight"]))]
    assert all(t.shape[0] == 1 for t in held)  # kept once inside the attack too
    summary = run(cfg, tmp_path / "run")
    assert summary["idlg"]["trials"] == 3 and summary["idlg"]["label_accuracy"] == 1.0
    assert records(tmp_path / "run")[0]["axes"]["model.init"] == "CheckpointInit"
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    result = app("model/init=checkpoint", f"model.init.path={tmp_path / 'other.pt'}", "trials=1", "steps=1",
                 "dataset.image_size=12", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "does not fit LeNet" in errors[0], result.stderr[-800:]


# --- defenses at the client -----------------------------------------------------------------------------

def test_the_client_applies_its_defense_and_the_attacker_sees_only_the_defended_gradient():
    cfg = cfg_of("defense=gaussian", "defense.gaussian.variance=1e-4", "trials=2", "dataset.image_size=8")
    dataset = instantiate(cfg.dataset)
    trials = plan_trials(cfg, len(dataset))
    _, shared, cost = prepare_batch(cfg, dataset, trials)
    _, plain, plain_cost = prepare_batch(cfg_of("trials=2", "dataset.image_size=8"), dataset, trials)
    head = "classifier.weight"
    noise = shared.gradients[head] - plain.gradients[head]
    assert 0.5e-2 < float(noise.std()) < 2e-2  # std = sqrt(1e-4)
    assert shared.defense is None  # not disclosed unless client.disclose_defense
    assert (cost["cosine"] < 1).all() and (cost["relative_error"] > 0).all()
    torch.testing.assert_close(plain_cost["cosine"], torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(plain_cost["relative_error"], torch.zeros(2, dtype=torch.float64))
    # a defended head gradient is not rank one: the attack keeps the exact head route
    attack = instantiate(cfg.attack.idlg)(shared=shared, name="idlg", optimizer=instantiate(cfg.optimizer))
    assert head in attack._names["target"] and f"{head}:left" not in attack._names["target"]
    plain_attack = instantiate(cfg.attack.idlg)(shared=plain, name="idlg", optimizer=instantiate(cfg.optimizer))
    assert f"{head}:left" in plain_attack._names["target"]
    disclosed = prepare_batch(cfg_of("defense=gaussian", "client.disclose_defense=true", "trials=2",
                                     "dataset.image_size=8"), dataset, trials)[1]
    assert disclosed.defense == {"name": "gaussian", "parts": [{"name": "gaussian", "variance": 1e-3}]}


def test_dpsgd_at_the_client_without_noise_or_clipping_is_the_plain_gradient():
    victims = [make_victim(LeNet, in_channels=1, image_size=8, num_classes=10, seed=s) for s in range(2)]
    weights, _ = stack_victims(victims)
    g = torch.Generator().manual_seed(4)
    private = PrivateBatch(torch.rand(2, 3, 1, 8, 8, generator=g), torch.randint(10, (2, 3), generator=g))
    client = Client(batch_size=3)
    plain, _ = client.share(victims[0], weights, {}, private, 10)
    open_dp, cost = client.share(victims[0], weights, {}, private, 10, chain([DPSGD(1e9, 0.0)]), [0, 1])
    for name, grad in plain.gradients.items():
        torch.testing.assert_close(open_dp.gradients[name], grad, rtol=1e-5, atol=1e-7)
    clipped, _ = client.share(victims[0], weights, {}, private, 10, chain([DPSGD(1e-3, 0.0)]), [0, 1])
    norm = torch.cat([t.flatten(1) for t in clipped.gradients.values()], 1).norm(dim=1)
    assert (norm <= 1e-3 * (1 + 1e-5)).all()  # the mean of per-sample gradients each clipped to 1e-3
    with pytest.raises(ConfigError, match="client.reduction='sum'"):
        Client(batch_size=3, reduction="sum").share(victims[0], weights, {}, private, 10,
                                                     chain([DPSGD(1.0, 1.0)]), [0, 1])


def test_noise_is_drawn_per_trial_so_a_trial_never_depends_on_its_group():
    cfg = cfg_of("defense=gaussian", "trials=3", "dataset.image_size=8")
    dataset = instantiate(cfg.dataset)
    trials = plan_trials(cfg, len(dataset))
    plain = cfg_of("trials=3", "dataset.image_size=8")

    def noise(group):
        defended, true = prepare_batch(cfg, dataset, group)[1], prepare_batch(plain, dataset, group)[1]
        return {n: g - true.gradients[n] for n, g in defended.gradients.items()}

    together, alone = noise(trials), noise(trials[2:])
    for name in together:  # the same draw (the gradients themselves differ only at float32 rounding)
        torch.testing.assert_close(together[name][2], alone[name][0], rtol=0, atol=1e-7)
        assert float(together[name][2].abs().max()) > 1e-3


def test_records_carry_the_defense_and_its_parameters(tmp_path):
    run(cfg_of("method=idlg", "defense=[clip,prune]", "defense.prune.ratio=0.3", "trials=1", "steps=2",
               "dataset.image_size=8"), tmp_path)
    (r,) = records(tmp_path)
    assert r["axes"]["defense"] == "clip+prune" and r["axes"]["defense.prune.ratio"] == 0.3
    assert r["axes"]["defense.clip.max_norm"] == 1.0 and r["axes"]["client.batch_size"] == 1
    assert 0 < r["defense_cosine"] < 1 and r["defense_relative_error"] > 0


# --- parts from outside the package, through the real entry point --------------------------------------

@pytest.mark.slow
def test_a_new_defense_label_strategy_and_victim_are_one_module_and_one_yaml_each(tmp_path):
    search = f"hydra.searchpath=[file://{TOY_CONFIGS}]"
    result = app(search, "attack=bias_idlg", "defense=sign", "trials=2", "steps=2", "dataset.image_size=8",
                 "progress_bar=false", f"hydra.run.dir={tmp_path / 'toy'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = records(tmp_path / "toy")
    assert [r["method"] for r in rows] == ["bias_idlg", "bias_idlg"]
    assert all(r["label_correct"] for r in rows)  # the sign of the bias gradient still gives the label
    assert rows[0]["axes"]["defense"] == "sign" and rows[0]["axes"]["defense.sign.scale"] == 1e-3
    result = app(search, "model=tinybn", "method=dlg", "client.mode=eval", "client.share_buffers=true", "trials=1",
                 "steps=2", "dataset.image_size=8", "progress_bar=false", f"hydra.run.dir={tmp_path / 'bn'}",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert records(tmp_path / "bn")[0]["axes"]["model"] == "TinyBN"


@pytest.mark.parametrize("override,new_place", [
    ("method.idlg.label_rule=bias", "attack.idlg.label_strategy.rule"),
    ("model.init_scale=0.3", "model.init.scale"),
    ("method.dlg.divergence_bound=10", "attack.dlg.stopping.divergence_bound"),
    ("trials_per_batch=4", "trials_per_group (trials optimized at once; client.batch_size is the client's samples)"),
])
def test_a_moved_key_fails_with_one_line_naming_its_new_place(tmp_path, override, new_place):
    result = app(override, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {override.split('=')[0]} moved to {new_place}"


def test_the_shortcuts_users_type_still_select_and_set_the_attacks():
    cfg = cfg_of("method=idlg", "steps=7", "tolerance=1e-5", "patience=3", "restarts=1")
    assert list(cfg.attack) == ["idlg"]
    stopping = instantiate(cfg.attack.idlg.stopping)
    assert (stopping.steps, stopping.tolerance, stopping.patience, stopping.restarts) == (7, 1e-5, 3, 1)
    assert list(cfg_of("experiment=paper_mnist", "method=dlg").attack) == ["dlg"]
