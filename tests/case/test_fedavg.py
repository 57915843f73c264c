"""FedAvg: the client's local training against a plain PyTorch loop, its one-step case against the gradient
client, the attacker's simulating objective against a per-trial autograd loop, and one run of the app."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch.func import functional_call

from lightning_idlg.case.client import Client, PrivateBatch, stack_victims
from lightning_idlg.case.defense import DPSGD, GaussianNoise
from lightning_idlg.errors import ConfigError
from lightning_idlg.run.experiment import run
from lightning_idlg.attacks.local_updates import LocalUpdates
from lightning_idlg.case.fedavg import FedAvgClient
from lightning_idlg.attacks.objective import CosineSimilarity
from lightning_idlg.case.model import LeNet, make_victim
from tests.toys import bn_victims

pytestmark = pytest.mark.usefixtures("one_thread")
K, B, SIDE, CLASSES = 2, 4, 8, 10


def lenets(k: int = K) -> list[torch.nn.Module]:
    """k LeNets of different seeds (one victim per trial), float64."""
    return [make_victim(LeNet, in_channels=1, image_size=SIDE, num_classes=CLASSES, seed=s).double() for s in range(k)]


def private_batch(seed: int = 0, b: int = B) -> PrivateBatch:
    g = torch.Generator().manual_seed(seed)
    return PrivateBatch(torch.rand(K, b, 1, SIDE, SIDE, generator=g, dtype=torch.float64),
                        torch.randint(CLASSES, (K, b), generator=g))


def sgd_loop(net: torch.nn.Module, images, labels, lr: float, epochs: int, local_batch_size: int, mode: str):
    """(w_0 - w_E) / (lr T) of torch.optim.SGD over local batches in the samples' order: what FedAvg shares."""
    net = copy.deepcopy(net)
    getattr(net, mode)()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    steps = 0
    for _ in range(epochs):
        for start in range(0, len(images), local_batch_size):
            optimizer.zero_grad()
            part = slice(start, start + local_batch_size)
            F.cross_entropy(net(images[part]), labels[part]).backward()
            optimizer.step()
            steps += 1
    return {n: (before[n] - p.detach()) / (lr * steps) for n, p in net.named_parameters()}


@pytest.mark.parametrize("victim", ["lenet", "batchnorm"])
def test_the_fedavg_update_equals_a_plain_pytorch_sgd_loop(victim):
    """E = 2 epochs over B = 4 samples in local batches of 2 (4 steps), K = 2 trials with their own victims."""
    victims = lenets() if victim == "lenet" else bn_victims(K, SIDE, CLASSES)
    weights, buffers = stack_victims(victims)
    private = private_batch()
    client = FedAvgClient(batch_size=B, epochs=2, local_batch_size=2, lr=0.5)
    shared, _ = client.share(victims[0], weights, buffers, private, CLASSES)
    assert shared.local == {"lr": 0.5, "epochs": 2, "local_batch_size": 2, "steps": 4}
    gradient = Client(batch_size=B).share(victims[0], weights, buffers, private, CLASSES)[0].gradients
    for i, net in enumerate(victims):
        expected = sgd_loop(net, private.images[i], private.labels[i], 0.5, 2, 2, "train")
        for name, update in expected.items():
            torch.testing.assert_close(shared.gradients[name][i], update, rtol=1e-10, atol=1e-12)
        # four steps of lr 0.5 move far from the first gradient: the test tells them apart
        moved = sum((expected[n] - gradient[n][i]).norm() ** 2 for n in expected).sqrt()
        assert float(moved / sum(gradient[n][i].norm() ** 2 for n in expected).sqrt()) > 0.3


def test_one_full_batch_step_shares_the_gradient_clients_gradient_defense_included():
    victims = lenets()
    weights, _ = stack_victims(victims)
    private = private_batch(1)
    fedavg = FedAvgClient(batch_size=B, epochs=1, local_batch_size=None, lr=0.3, disclose_local=False)
    plain = Client(batch_size=B)
    noise = GaussianNoise(1e-3)
    shared, cost = fedavg.share(victims[0], weights, {}, private, CLASSES, noise, [5, 6])
    reference, reference_cost = plain.share(victims[0], weights, {}, private, CLASSES, noise, [5, 6])
    assert shared.local is None  # the threat model where the server is not told the local settings
    for name, g in reference.gradients.items():
        torch.testing.assert_close(shared.gradients[name], g, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(cost["cosine"], reference_cost["cosine"], rtol=1e-12, atol=0)
    assert float(cost["cosine"].max()) < 1.0  # the noise was applied to the update


def reference_update(net, x, probs, lr: float, epochs: int, local_batch_size: int):
    """The simulated local SGD for one trial with plain autograd (create_graph through every step)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    total, steps = None, 0
    for _ in range(epochs):
        for s in range(0, len(x), local_batch_size):
            logits = functional_call(net, params, (x[s:s + local_batch_size],))
            loss = -(probs[s:s + local_batch_size] * F.log_softmax(logits, -1)).sum(-1).mean()
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            params = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
            total = grads if total is None else [t + g for t, g in zip(total, grads)]
            steps += 1
    return {n: t / steps for n, t in zip(params, total)}


@pytest.mark.parametrize("inner", ["cosine", "squared_l2"])
def test_the_simulating_objective_is_zero_at_the_private_batch_and_matches_autograd(inner):
    victims = lenets()
    weights, _ = stack_victims(victims)
    private = private_batch(2)
    shared, _ = FedAvgClient(batch_size=B, epochs=2, local_batch_size=2, lr=0.5).share(
        victims[0], weights, {}, private, CLASSES)
    distance = LocalUpdates(inner=inner).build(shared.model, shared.input_shape, B, "mean", local=shared.local)
    targets = distance.prepare(shared.gradients)
    at_truth = distance(weights, targets, private.images, F.one_hot(private.labels, CLASSES).double())
    assert float(at_truth.abs().max()) < 1e-12

    g = torch.Generator().manual_seed(3)
    x = torch.randn(K, B, 1, SIDE, SIDE, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(K, B, CLASSES, generator=g, dtype=torch.float64, requires_grad=True)
    d = distance(weights, targets, x, logits.softmax(-1))
    dx, dl = torch.autograd.grad(d.sum(), (x, logits))
    for i, net in enumerate(victims):
        xi, li = x[i].detach().clone().requires_grad_(), logits[i].detach().clone().requires_grad_()
        mine = reference_update(net, xi, li.softmax(-1), 0.5, 2, 2)
        shared_i = {n: t[i] for n, t in shared.gradients.items()}
        if inner == "cosine":
            dot = sum((mine[n] * shared_i[n]).sum() for n in mine)
            norm = sum(m.square().sum() for m in mine.values()).sqrt()
            shared_norm = sum(t.square().sum() for t in shared_i.values()).sqrt()
            ref = 1 - dot / (norm * shared_norm)
        else:
            ref = sum(((mine[n] - shared_i[n]) ** 2).sum() for n in mine)
        assert float(d[i].detach()) == pytest.approx(float(ref.detach()), rel=1e-10)
        ref_dx, ref_dl = torch.autograd.grad(ref, (xi, li))
        torch.testing.assert_close(dx[i], ref_dx, rtol=1e-8, atol=1e-14)
        torch.testing.assert_close(dl[i], ref_dl, rtol=1e-8, atol=1e-14)


def test_without_the_local_settings_the_attacker_matches_the_plain_gradient_by_cosine():
    """local=None: one step over the whole batch, i.e. Inverting Gradients' cosine of the plain gradient."""
    victims = lenets()
    weights, _ = stack_victims(victims)
    private = private_batch(4)
    shared, _ = FedAvgClient(batch_size=B, epochs=2, local_batch_size=1, lr=0.5, disclose_local=False).share(
        victims[0], weights, {}, private, CLASSES)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(K, B, 1, SIDE, SIDE, generator=g, dtype=torch.float64)
    probs = F.one_hot(private.labels, CLASSES).double()
    simulated = LocalUpdates().build(shared.model, shared.input_shape, B, "mean", local=None)
    cosine = CosineSimilarity().build(shared.model, shared.input_shape, B, "mean")
    torch.testing.assert_close(simulated(weights, shared.gradients, x, probs),
                               cosine(weights, cosine.prepare(shared.gradients), x, probs), rtol=1e-10, atol=1e-14)


def test_bad_settings_fail_in_one_line_naming_what_is_valid():
    with pytest.raises(ConfigError, match=r"client.local_batch_size must be an integer in 1..client.batch_size=4"):
        FedAvgClient(batch_size=4, local_batch_size=5)
    with pytest.raises(ConfigError, match=r"client.epochs must be a positive integer"):
        FedAvgClient(epochs=0)
    with pytest.raises(ConfigError, match=r"client.lr must be a number > 0"):
        FedAvgClient(lr=0)
    with pytest.raises(ConfigError, match=r"objective.inner='l1' is not known; valid: cosine, squared_l2"):
        LocalUpdates(inner="l1")
    victims = lenets()
    weights, _ = stack_victims(victims)
    with pytest.raises(ConfigError, match=r"dpsgd defense clips the per-sample gradients"):
        FedAvgClient(batch_size=B).share(victims[0], weights, {}, private_batch(), CLASSES,
                                         DPSGD(max_grad_norm=1.0, noise_multiplier=1.0), [0, 1])


def test_ig_with_the_simulating_objective_attacks_a_fedavg_client_end_to_end(tmp_path: Path):
    overrides = ["client=fedavg", "client.batch_size=2", "client.epochs=1", "client.local_batch_size=1",
                 "method=ig", "steps=3", "trials=2", "dataset=digits", "dataset.image_size=8",
                 "attack.ig.objective._target_=lightning_idlg.attacks.local_updates.LocalUpdates",
                 "attack.ig.label_strategy._target_=lightning_idlg.attacks.labels.BiasCorrected",
                 "~attack.ig.label_strategy.rule"]
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("config", overrides=["progress_bar=false", "pictures=false", "progress_trials=0", *overrides])
    summary = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [(r["method"], r["index"]) for r in rows] == [("ig", 0), ("ig", 1)] and summary["ig"]["trials"] == 2
    for r in rows:
        assert r["client_batch_size"] == 2 and r["steps"] == 3 and len(r["images"]) == 2
        assert r["axes"]["client.local_batch_size"] == 1 and r["axes"]["client.epochs"] == 1
        assert 0.0 <= r["distance"] <= 2.0  # a cosine distance


def test_dlg_takes_the_simulating_objective_with_its_squared_distance(tmp_path: Path):
    """The README's override for DLG: learned labels pass through the simulated local steps too."""
    overrides = ["client=fedavg", "client.batch_size=2", "client.local_batch_size=1", "method=dlg", "steps=2",
                 "trials=2", "dataset.image_size=8", "attack.dlg.objective._target_=lightning_idlg.attacks.local_updates.LocalUpdates",
                 "+attack.dlg.objective.inner=squared_l2"]
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("config", overrides=["progress_bar=false", "pictures=false", "progress_trials=0", *overrides])
    run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["dlg", "dlg"] and all(1 <= r["steps"] <= 2 for r in rows)
    assert all(r["axes"]["client.lr"] == 1e-3 and r["status"] != "diverged" for r in rows)
