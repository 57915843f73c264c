"""The gradient-matching objective D and the soft cross-entropy, against hand numbers and a plain
per-trial nn.Module + torch.autograd.grad(create_graph=True) + F.cross_entropy reference."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from lightning_idlg.case.client import soft_cross_entropy, stack_victims
from lightning_idlg.attacks import objective
from lightning_idlg.attacks.objective import BatchedDistance, gradient_distance, rank_one_factors, split_head
from lightning_idlg.case.model import MLP, LeNet, make_victim

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# --- D by hand -------------------------------------------------------------------------------------


def test_gradient_distance_by_hand():
    dummy = {"conv.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "conv.bias": torch.tensor([0.5]),
             "fc.weight": torch.tensor([[[-1.0]]])}
    shared = {"conv.weight": torch.tensor([[1.0, 0.0], [0.0, 4.0]]), "conv.bias": torch.tensor([-0.5]),
              "fc.weight": torch.tensor([[[2.0]]])}
    # (0 + 2^2 + 3^2 + 0) + 1^2 + (-3)^2 = 23: a plain sum over every tensor, no normalization
    d = gradient_distance(dummy, shared)
    assert d.shape == () and d.item() == 23.0
    assert gradient_distance(shared, shared).item() == 0.0
    doubled = {n: 2 * g for n, g in dummy.items()}
    assert gradient_distance(doubled, {n: 2 * g for n, g in shared.items()}).item() == 92.0  # 4 x 23
    # every tensor counts: dropping one from both sides removes exactly its term
    assert gradient_distance({n: dummy[n] for n in ("conv.weight", "conv.bias")},
                             {n: shared[n] for n in ("conv.weight", "conv.bias")}).item() == 14.0


# --- batched D against a per-trial autograd loop ------------------------------------------------------

K, CLASSES, SIDE = 3, 10, 16


def _setup(dtype, model="lenet"):
    factory = LeNet if model == "lenet" else partial(MLP, hidden=(32, 16))
    victims = [make_victim(factory, in_channels=3, image_size=SIDE, num_classes=CLASSES, seed=40 + s).to(dtype)
               for s in range(K)]
    weights, _ = stack_victims(victims)
    g = torch.Generator().manual_seed(3)
    images = torch.rand(K, 3, SIDE, SIDE, generator=g).to(dtype)
    labels = torch.randint(CLASSES, (K,), generator=g)
    dummy = torch.randn(K, 3, SIDE, SIDE, generator=g).to(dtype)
    dummy_logits = torch.randn(K, CLASSES, generator=g).to(dtype)
    # the shared gradients, by the plain route: module, F.cross_entropy, autograd
    shared = {n: torch.empty_like(w) for n, w in weights.items()}
    for k, net in enumerate(victims):
        loss = F.cross_entropy(net(images[k:k + 1]), labels[k:k + 1])
        for (n, _), gr in zip(net.named_parameters(), torch.autograd.grad(loss, list(net.parameters()))):
            shared[n][k] = gr
    return victims, weights, shared, images, labels, dummy, dummy_logits


def _reference(net, shared_k, x, target):
    """D for one trial and its gradient w.r.t. x (and the label logits), the ordinary way. target: a
    class index (iDLG) or label logits l' (DLG: soft target softmax(l'))."""
    x = x.clone().requires_grad_()
    inputs = [x]
    if target.is_floating_point():
        logits = target.clone().requires_grad_()
        inputs.append(logits)
        loss = F.cross_entropy(net(x[None]), torch.softmax(logits, -1)[None])  # probabilities as target
    else:
        loss = F.cross_entropy(net(x[None]), target[None])
    names = [n for n, _ in net.named_parameters()]
    grads = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
    d = sum(((gr - shared_k[n]) ** 2).sum() for n, gr in zip(names, grads))
    return d.detach(), [t.detach() for t in torch.autograd.grad(d, inputs)]


def _close(a, b, rtol):
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


# BatchedDistance's input_shape picks the route; "rank_one" also factors the head's target (prepare),
# which float64 declines (the exact head term then)
ROUTES = {"plain": None, "head_split": (3, SIDE, SIDE), "rank_one": (3, SIDE, SIDE),
          "head_split_blocks": (3, SIDE, SIDE)}


def _one_sample(distance):
    """D over clients of one sample: x' (K, C, H, W) and probabilities (K, classes) as batches of B = 1."""
    def call(weights, targets, x, probs):
        return distance(weights, targets, x[:, None], probs[:, None])
    call.prepare = distance.prepare
    return call


def _route(route, victim, shared, monkeypatch):
    """(distance, targets) for a route; head_split_blocks forms E two rows at a time."""
    if route == "head_split_blocks":
        features = victim.classifier.in_features if hasattr(victim, "classifier") else 16
        monkeypatch.setitem(objective.BLOCK_ELEMENTS, "cpu", 2 * K * features)
    distance = _one_sample(BatchedDistance(victim, ROUTES[route]))
    targets = distance.prepare(shared) if route == "rank_one" else shared
    factored = any(name.endswith(":left") for name in targets)
    assert factored == (route == "rank_one" and next(iter(shared.values())).dtype != torch.float64)
    return distance, targets


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("method", ["idlg", "dlg"])
@pytest.mark.parametrize("model", ["lenet", "mlp"])
def test_batched_distance_equals_per_trial_loop(model, method, dtype, rtol, route, monkeypatch):
    victims, weights, shared, images, labels, dummy, dummy_logits = _setup(dtype, model)
    distance, targets = _route(route, victims[0], shared, monkeypatch)
    x = dummy.clone().requires_grad_()
    if method == "idlg":
        probs = F.one_hot(labels, CLASSES).to(dtype)
        inputs = [x]
    else:
        logits = dummy_logits.clone().requires_grad_()
        probs = torch.softmax(logits, -1)
        inputs = [x, logits]
    d = distance(weights, targets, x, probs)
    assert d.shape == (K,)
    grads = torch.autograd.grad(d.sum(), inputs, retain_graph=True)
    for k in range(K):
        target = labels[k] if method == "idlg" else dummy_logits[k]
        ref_d, ref_grads = _reference(victims[k], {n: g[k] for n, g in shared.items()}, dummy[k], target)
        assert abs(float(d[k].detach()) - float(ref_d)) <= rtol * float(ref_d), (k, float(d[k].detach()), float(ref_d))
        for got, ref in zip(grads, ref_grads):
            assert _close(got[k], ref, rtol), (k, float((got[k] - ref).abs().max()), float(ref.abs().max()))
    assert float(d.detach().min()) > 1e-3  # a random dummy is far from matching
    # no coupling: trial 0's D does not depend on the other trials' dummies
    g0 = torch.autograd.grad(d[0], x)[0]
    assert float(g0[0].abs().max()) > 0 and torch.equal(g0[1:], torch.zeros_like(g0[1:]))


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("dtype,zero", [(torch.float64, 1e-20), (torch.float32, 1e-9)])
def test_batched_distance_is_zero_at_the_private_sample(route, dtype, zero, monkeypatch):
    victims, weights, shared, images, labels, dummy, _ = _setup(dtype)
    distance, targets = _route(route, victims[0], shared, monkeypatch)
    one_hot = F.one_hot(labels, CLASSES).to(dtype)
    at_truth = distance(weights, targets, images, one_hot)
    far = distance(weights, targets, dummy, one_hot)
    assert float(at_truth.abs().max()) < zero * float(far.min()) + zero * 1e-5
    wrong_label = distance(weights, targets, images, F.one_hot((labels + 1) % CLASSES, CLASSES).to(dtype))
    assert float(wrong_label.min()) > 1e-3


def test_rank_one_factors_by_hand():
    a = torch.tensor([[3.0, 0.0, -4.0], [1.0, 2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 2.0], [1.0, 0.0]], dtype=torch.float64)
    left, right, residual = rank_one_factors(a[:, :, None] * b[:, None, :])
    # T = a b^T = (|b| a)(b / |b|)^T: up to the sign the power iteration picks
    sign = torch.sign((right * b).sum(1, keepdim=True))
    torch.testing.assert_close(right * sign, torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(left * sign, torch.tensor([[6.0, 0.0, -8.0], [1.0, 2.0, 2.0]], dtype=torch.float64))
    assert residual.tolist() == [0.0, 0.0]
    # a zero gradient factors as zeros
    left, right, residual = rank_one_factors(torch.zeros(1, 3, 2))
    assert left.abs().sum() == right.abs().sum() == residual.sum() == 0
    # a sum of two outer products (two samples, or noise) is not rank one: None, the exact term then
    two = a[:, :, None] * b[:, None, :] + 1e-3 * torch.ones(2, 3, 2, dtype=torch.float64)
    assert rank_one_factors(two) is None
    # the residual of a rank-one T plus a small perturbation is ||perturbation||^2 when it is orthogonal
    bump = torch.zeros(2, 3, 2, dtype=torch.float64)
    bump[0, 1, 0] = 1e-7  # row 1 of a is 0 and column 0 of b is 0 for trial 0
    left, right, residual = rank_one_factors(a[:, :, None] * b[:, None, :] + bump)
    assert abs(float(residual[0]) - 1e-14) < 1e-20 and float(residual[1]) == 0.0


class _ScaledLogits(torch.nn.Module):
    """Ends in a Linear layer but does something with its output: not head(body(x))."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(12, 4)

    def forward(self, x):
        return 2 * self.fc(x.flatten(1))


def test_split_head_only_where_logits_are_the_last_linear_layer():
    lenet = LeNet(in_channels=3, image_size=SIDE, num_classes=CLASSES)
    body, head = split_head(lenet, (3, SIDE, SIDE))
    assert head == "classifier"
    assert [n for n, _ in body.named_parameters()] == [n for n, _ in lenet.named_parameters()
                                                       if not n.startswith("classifier.")]
    x = torch.rand(2, 3, SIDE, SIDE)
    torch.testing.assert_close(lenet.classifier(body(x)), lenet(x), rtol=0, atol=0)
    assert split_head(MLP(in_channels=1, image_size=4, num_classes=3), (1, 4, 4))[1] == "net.3"
    assert split_head(_ScaledLogits(), (3, 2, 2)) is None  # the plain route then
    assert split_head(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Sigmoid()), (1, 2, 2)) is None


# --- soft cross-entropy ------------------------------------------------------------------------------------


def test_soft_cross_entropy_one_hot_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, 100, generator=g)
    labels = torch.randint(100, (6,), generator=g)
    torch.testing.assert_close(soft_cross_entropy(logits, F.one_hot(labels, 100).float()),
                               F.cross_entropy(logits, labels), rtol=1e-6, atol=0)
    # batch of one, as in the attack
    torch.testing.assert_close(soft_cross_entropy(logits[:1], F.one_hot(labels[:1], 100).float()),
                               F.cross_entropy(logits[:1], labels[:1]), rtol=1e-6, atol=0)


def test_soft_cross_entropy_with_soft_labels():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 10, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(5, 10, generator=g, dtype=torch.float64), -1)
    by_hand = -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert abs(float(soft_cross_entropy(logits, p)) - float(by_hand)) < 1e-12
    # a case by hand: logits (0, log 3) -> softmax (1/4, 3/4); p = (1/2, 1/2)
    # -> loss = -(1/2 log 1/4 + 1/2 log 3/4) = (log 4 + log 4/3) / 2
    value = soft_cross_entropy(torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64),
                               torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert abs(float(value) - 0.5 * (math.log(4.0) + math.log(4.0 / 3.0))) < 1e-15


def test_soft_cross_entropy_stays_finite_for_spread_logits():
    """log_softmax, not log(softmax): spread logits give a finite loss and gradient, not -inf/NaN."""
    logits = torch.tensor([[0.0, 200.0, -200.0]], requires_grad=True)
    p = torch.tensor([[0.2, 0.3, 0.5]])
    loss = soft_cross_entropy(logits, p)
    loss.backward()
    assert abs(float(loss.detach()) - (0.2 * 200 + 0.5 * 400)) < 1e-3
    assert torch.isfinite(logits.grad).all()
    torch.testing.assert_close(logits.grad, torch.tensor([[-0.2, 0.7, -0.5]]))
