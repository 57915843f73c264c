"""Inverting Gradients' parts: the cosine objective, total variation, signed Adam with step decay, the box, the
best iterate, restarts that always run, and the BatchNorm prior; each against a hand computation or the
plain PyTorch way (per-trial autograd, torch.optim.Adam, forward hooks)."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import total_variation

from lightning_idlg.case.client import Client, PrivateBatch, stack_victims
from lightning_idlg.errors import ConfigError
from lightning_idlg.attacks.inversion import GradientInversion
from lightning_idlg.attacks.labels import AnalyticLabel
from lightning_idlg.attacks.objective import CosineSimilarity, layer_weights
from lightning_idlg.attacks.optimizer import BatchedAdam
from lightning_idlg.attacks.regularizers import BatchNormPrior, TotalVariation
from lightning_idlg.attacks.stopping import Stopping
from lightning_idlg.case.model import LeNet, make_victim
from tests.records.test_core import app, cfg_of
from tests.attacks.test_objective import CLASSES, K, SIDE, _setup
from tests.toys import bn_victims

pytestmark = pytest.mark.usefixtures("one_thread")



# --- the cosine objective -------------------------------------------------------------------------------

def test_cosine_objective_of_a_linear_layer_by_hand():
    """One Linear layer, one sample: dL/dW = g x^T, dL/db = g with g = softmax(Wx + b) - onehot(y); the
    objective is 1 - <(g'x'^T, g'), (T_W, T_b)> / (|(g'x'^T, g')| |(T_W, T_b)|), written out here by hand."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[0.5, -1.0, 0.2, 0.0], [1.0, 0.3, -0.4, 0.7], [-0.2, 0.1, 0.9, -0.5]]))
        net[1].bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x_true = torch.tensor([0.2, 0.9, 0.4, 0.6], dtype=torch.float64)
    x_dummy = torch.tensor([0.7, 0.1, 0.5, 0.3], dtype=torch.float64)
    w, b = net[1].weight.detach(), net[1].bias.detach()

    def g_of(x, y):
        p = torch.exp(w @ x + b)
        return p / p.sum() - F.one_hot(torch.tensor(y), 3).double()

    g_true, g_dummy = g_of(x_true, 1), g_of(x_dummy, 1)
    t_w, t_b = torch.outer(g_true, x_true), g_true
    d_w, d_b = torch.outer(g_dummy, x_dummy), g_dummy
    dot = (d_w * t_w).sum() + (d_b * t_b).sum()
    expected = 1 - dot / (torch.cat([d_w.flatten(), d_b]).norm() * torch.cat([t_w.flatten(), t_b]).norm())

    weights = {n: p.detach()[None] for n, p in net.named_parameters()}
    shared = {"1.weight": t_w[None], "1.bias": t_b[None]}
    probs = F.one_hot(torch.tensor([[1]]), 3).double()
    for shape in (None, (1, 2, 2)):  # the plain route and the head-split route
        objective = CosineSimilarity().build(net, shape)
        got = objective(weights, objective.prepare(shared), x_dummy.view(1, 1, 1, 2, 2), probs)
        assert abs(float(got[0]) - float(expected)) < 1e-12
        at_truth = objective(weights, objective.prepare(shared), x_true.view(1, 1, 1, 2, 2), probs)
        assert abs(float(at_truth[0])) < 1e-12


def _lenets(dtype):
    """K LeNets, their shared gradients and dummies, as tests/attacks/test_objective.py makes them."""
    victims, weights, shared, _, labels, dummy, _ = _setup(dtype)
    return victims, weights, shared, labels, dummy


def _reference_cosine(net, shared_k, x, label, scheme="equal"):
    """1 - cos and its gradient w.r.t. x for one trial: module, F.cross_entropy, autograd."""
    x = x.clone().requires_grad_()
    names = [n for n, _ in net.named_parameters()]
    w = layer_weights(names, scheme)
    grads = torch.autograd.grad(F.cross_entropy(net(x[None]), label[None]), list(net.parameters()), create_graph=True)
    dot = sum(w[n] * (gr * shared_k[n]).sum() for n, gr in zip(names, grads))
    norm_d = sum(w[n] * gr.square().sum() for n, gr in zip(names, grads))
    norm_t = sum(w[n] * shared_k[n].square().sum() for n in names)
    d = 1 - dot / (norm_d.sqrt() * norm_t.sqrt())
    return d.detach(), torch.autograd.grad(d, x)[0]


@pytest.mark.parametrize("dtype,route,scheme", [
    (torch.float64, "plain", "equal"), (torch.float64, "head", "equal"), (torch.float64, "head", "exp"),
    (torch.float64, "plain", "linear"), (torch.float32, "head", "equal"),
])
def test_batched_cosine_equals_per_trial_autograd(dtype, route, scheme):
    victims, weights, shared, labels, dummy = _lenets(dtype)
    objective = CosineSimilarity(scheme).build(victims[0], None if route == "plain" else (3, SIDE, SIDE))
    targets = objective.prepare(shared)
    if route == "head" and dtype == torch.float32:
        assert "classifier.weight:left" in targets  # the rank-one factors (g.a)(h.b) are used
    x = dummy[:, None].clone().requires_grad_()
    probs = F.one_hot(labels, CLASSES).to(dtype)[:, None]
    d = objective(weights, targets, x, probs)
    (grad,) = torch.autograd.grad(d.sum(), x)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-6)
    for k, net in enumerate(victims):
        ref_d, ref_grad = _reference_cosine(net, {n: t[k] for n, t in shared.items()}, dummy[k], labels[k], scheme)
        torch.testing.assert_close(d[k], ref_d, **tol)
        torch.testing.assert_close(grad[k, 0], ref_grad, **tol)


def test_layer_weights_are_inverting_gradients_schemes():
    names = ["a", "b", "c", "d"]
    assert layer_weights(names, "equal") == dict.fromkeys(names, 1.0)
    assert layer_weights(names, "linear") == {"a": 1.0, "b": 0.75, "c": 0.5, "d": 0.25}
    exp = layer_weights(names, "exp")  # softmax over (4, 3, 2, 1), divided by its first entry: e^-(i)
    assert all(abs(exp[n] - math.exp(-i)) < 1e-15 for i, n in enumerate(names))
    with pytest.raises(ConfigError, match="valid: equal, linear, exp"):
        CosineSimilarity("cubic")


# --- total variation ------------------------------------------------------------------------------------

def test_total_variation_against_torchmetrics_and_by_hand():
    x = torch.tensor([[0.0, 1.0], [0.5, 0.25]]).view(1, 1, 1, 2, 2)
    # |1 - 0| + |0.25 - 0.5| (along rows) + |0.5 - 0| + |0.25 - 1| (along columns) = 2.5
    assert float(TotalVariation(weight=1.0)(x)[0]) == 2.5
    assert float(TotalVariation(weight=0.2, mean=True)(x)[0]) == pytest.approx(0.2 * 2.5 / 4, abs=1e-7)
    y = torch.rand(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    per_image = total_variation(y.flatten(0, 1), reduction="none").view(2, 3)
    torch.testing.assert_close(TotalVariation(weight=0.2, mean=True)(y), 0.2 * per_image.sum(1) / (3 * 64))


# --- signed Adam with step decay -------------------------------------------------------------------------

def test_signed_adam_with_step_decay_equals_torch_adam_on_the_sign_with_multisteplr():
    """Three trials, each its own quadratic, 40 steps with the budget 40: lr x 0.1 after steps 14, 24, 35
    (40 // 2.667, 40 // 1.6, 40 // 1.142), as torch.optim.Adam on sign(g) with MultiStepLR."""
    steps, lr = 40, 0.1
    g = torch.Generator().manual_seed(2)
    centers = torch.randn(3, 5, generator=g, dtype=torch.float64)
    scales = torch.rand(3, 5, generator=g, dtype=torch.float64) + 0.5
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def f(k, x):
        return (scales[k] * (x - centers[k]) ** 2).sum()

    x = x0.clone().requires_grad_()
    opt = BatchedAdam([x], lr=lr, signed=True, step_decay=steps)
    assert opt.milestones == [14.0, 24.0, 35.0]  # 40 // 1.6 is 24.0 in floating point, as in breaching

    def closure():
        x.grad = None
        losses = torch.stack([f(k, x[k]) for k in range(3)])
        losses.sum().backward()
        return losses.detach()

    batched = []
    for _ in range(steps):
        opt.step(closure)
        batched.append(x.detach().clone())
    for k in range(3):
        y = x0[k].clone().requires_grad_()
        ref = torch.optim.Adam([y], lr=lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(ref, milestones=[steps // d for d in (2.667, 1.6, 1.142)],
                                                        gamma=0.1)
        for step in range(steps):
            ref.zero_grad()
            f(k, y).backward()
            y.grad.sign_()
            ref.step()
            schedule.step()
            torch.testing.assert_close(batched[step][k], y.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="step_decay"):
        BatchedAdam([torch.zeros(2, 1, requires_grad=True)], step_decay=0)


# --- the attack loop: box, best iterate, restarts ------------------------------------------------------

def _ig_attack(shared, steps=12, restarts=0, **stopping):
    return GradientInversion(
        shared=shared, label_strategy=AnalyticLabel(), name="ig",
        optimizer=partial(BatchedAdam, lr=0.1, signed=True, step_decay=steps),
        objective=CosineSimilarity(), regularizers={"tv": TotalVariation(weight=0.2, mean=True)},
        stopping=Stopping(steps=steps, tolerance=None, restarts=restarts, restart_when="always", keep="best",
                          **stopping),
        box=(0.0, 1.0))


def _digit_clients(k=2, side=8, classes=4):
    victims = [make_victim(LeNet, in_channels=1, image_size=side, num_classes=classes, seed=s) for s in range(k)]
    weights, buffers = stack_victims(victims)
    g = torch.Generator().manual_seed(9)
    private = PrivateBatch(torch.rand(k, 1, 1, side, side, generator=g), torch.randint(classes, (k, 1), generator=g))
    return Client().share(victims[0], weights, buffers, private, classes)[0]


def _fit(attack):
    import lightning.pytorch as pl
    pl.Trainer(max_steps=attack.max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu").fit(attack)
    return attack.result()


def test_ig_keeps_the_best_iterate_inside_the_box_and_restarts_every_attempt():
    shared = _digit_clients()
    result = _fit(_ig_attack(shared, steps=12, restarts=1))
    assert result.restarts.tolist() == [1, 1]            # restart_when=always: both attempts ran
    assert result.steps.tolist() == [24, 24]
    assert result.status == ["not_converged"] * 2         # tolerance null: never stops early
    assert float(result.dummy.min()) >= 0.0 and float(result.dummy.max()) <= 1.0
    # the kept reconstruction is the one its recorded objective was measured at: evaluate it again
    check = _ig_attack(shared, steps=1)
    with torch.no_grad():
        check.dummy.copy_(result.dummy)
    torch.testing.assert_close(check.objective(torch.arange(2)).detach(), result.distance, rtol=1e-5, atol=1e-7)


def test_the_best_iterate_is_no_worse_than_the_last():
    shared = _digit_clients()
    best = _fit(_ig_attack(shared, steps=15))
    last = _fit(GradientInversion(
        shared=shared, label_strategy=AnalyticLabel(), name="ig",
        optimizer=partial(BatchedAdam, lr=0.1, signed=True, step_decay=15), objective=CosineSimilarity(),
        regularizers={"tv": TotalVariation(weight=0.2, mean=True)},
        stopping=Stopping(steps=15, tolerance=None), box=(0.0, 1.0)))
    assert bool((best.distance <= last.distance + 1e-7).all())
    with pytest.raises(ConfigError, match=r"box must be null or \[lo, hi\]"):
        _ig_attack(shared).__class__(shared=shared, label_strategy=AnalyticLabel(),
                                     optimizer=partial(BatchedAdam), box=(1.0, 0.0))
    with pytest.raises(ConfigError, match="keep"):
        Stopping(keep="first")


# --- the BatchNorm prior -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm_prior_equals_a_hand_computation_with_hooks(mode):
    k, b, side, classes = 2, 3, 5, 4
    victims = bn_victims(k, side, classes)
    weights, buffers = stack_victims(victims)
    g = torch.Generator().manual_seed(4)
    private = PrivateBatch(torch.rand(k, b, 1, side, side, generator=g, dtype=torch.float64),
                           torch.randint(classes, (k, b), generator=g))
    shared = Client(batch_size=b, mode=mode, share_buffers=True).share(victims[0], weights, buffers, private,
                                                                        classes)[0]
    prior = BatchNormPrior(weight=0.1, first_bn_multiplier=10.0)
    prior.bind(shared.model, shared)
    x = torch.rand(k, b, 1, side, side, generator=g, dtype=torch.float64)
    got = prior(x, shared.weights, shared.buffers)
    for i, net in enumerate(victims):
        seen = {}
        bn = net.features[1]
        handle = bn.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
        net.eval()  # the hook sees the BatchNorm's input, which does not depend on the BatchNorm's own mode
        net(x[i])
        handle.remove()
        mean, var = seen["x"].mean((0, 2, 3)), seen["x"].var((0, 2, 3), unbiased=False)
        expected = 0.1 * 10.0 * ((var - bn.running_var).norm() + (mean - bn.running_mean).norm())
        assert abs(float(got[i].detach()) - float(expected.detach())) < 1e-12
    with pytest.raises(ConfigError, match="client.share_buffers=true"):
        BatchNormPrior().bind(shared.model, Client(batch_size=b).share(victims[0], weights, buffers, private,
                                                                       classes)[0])


# --- the app -------------------------------------------------------------------------------------------

def test_method_ig_composes_breachings_defaults():
    cfg = cfg_of("method=ig")
    assert list(cfg.attack) == ["ig"]
    assert (cfg.steps, cfg.tolerance, cfg.patience, cfg.restarts) == (24000, None, None, 0)
    node = cfg.attack.ig
    assert node.optimizer.step_decay == 24000 and node.optimizer.signed and node.optimizer.lr == 0.1
    assert node.objective._target_.endswith("CosineSimilarity") and list(node.box) == [0.0, 1.0]
    assert node.regularizers.tv.weight == 0.2 and node.stopping.keep == "best"
    assert cfg_of("method=ig", "steps=2400").attack.ig.optimizer.step_decay == 2400


@pytest.mark.slow
def test_ig_and_the_batchnorm_prior_run_end_to_end(tmp_path):
    out = app("method=ig", "steps=6", "trials=2", "model=custom", "model.factory.target=tests.toys.TinyBN",
              "client.share_buffers=true", "attack.ig.regularizers.bn.weight=0.1", "dataset.image_size=8",
              f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["ig", "ig"] and all(r["steps"] == 6 for r in rows)
    assert all(r["label_correct"] for r in rows)  # iDLG's rule at B = 1
    refused = app("method=ig", "steps=2", "trials=1", "model=custom", "model.factory.target=tests.toys.TinyBN",
                  "attack.ig.regularizers.bn.weight=0.1", "dataset.image_size=8", f"hydra.run.dir={tmp_path}/x",
                  cwd=tmp_path)
    assert refused.returncode != 0 and "client.share_buffers=true" in refused.stderr


# --- one network for all trials ------------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["squared_l2", "cosine"])
def test_one_network_for_all_trials_enters_unbatched_with_the_same_numbers(objective):
    """A checkpoint's weights are one tensor viewed K times (stride 0); D takes them unbatched (one
    convolution over all trials' inputs) and must equal D over K materialized copies."""
    from lightning_idlg.attacks.objective import SquaredL2
    net = make_victim(LeNet, in_channels=3, image_size=SIDE, num_classes=CLASSES, seed=3).double()
    one = {n: p.detach()[None].expand(K, *p.shape) for n, p in net.named_parameters()}
    copies = {n: t.clone() for n, t in one.items()}
    g = torch.Generator().manual_seed(8)
    shared = {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in copies.items()}
    x = torch.rand(K, 1, 3, SIDE, SIDE, generator=g, dtype=torch.float64, requires_grad=True)
    probs = F.one_hot(torch.tensor([[1], [4], [7]]), CLASSES).double()
    part = SquaredL2() if objective == "squared_l2" else CosineSimilarity()
    for shape in (None, (3, SIDE, SIDE)):
        d = part.build(net, shape)
        a, b = d(one, shared, x, probs), d(copies, shared, x, probs)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(b.sum(), x)[0],
                                   rtol=1e-10, atol=1e-14)


def test_a_single_trial_takes_the_unbatched_route_with_the_plain_gradient():
    """K = 1 never goes through vmap's batched-weight route (a ConvNet's weight gradient came out 2.8% off
    there for one CIFAR-100 image, lightning_idlg.case.client.over_trials): the client's gradient of one trial is
    torch.func.grad's without vmap, to the bit."""
    from torch.func import grad

    from lightning_idlg.case.architectures import ConvNet
    from lightning_idlg.case.client import batch_loss, functional_victim

    net = make_victim(partial(ConvNet, width=4), in_channels=3, image_size=12, num_classes=5, seed=1)
    weights, buffers = stack_victims([net])
    g = torch.Generator().manual_seed(3)
    private = PrivateBatch(torch.rand(1, 1, 3, 12, 12, generator=g), torch.tensor([[2]]))
    shared = Client().share(net, weights, buffers, private, 5)[0]
    plain = grad(batch_loss(functional_victim(net, "train")))(
        {n: w[0] for n, w in weights.items()}, {}, private.images[0], F.one_hot(private.labels[0], 5).float())
    assert all(torch.equal(shared.gradients[n][0], plain[n]) for n in plain)
