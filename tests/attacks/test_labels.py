"""iDLG label extraction (lightning_idlg.attacks.labels.extract_label) is exact where the paper says it is.

Bulk: for a last layer y = W a + b (W, b ~ U(-0.5, 0.5), the paper's init) on features a = act(z),
z ~ N(0, 2^2), and a random label, the true cross-entropy gradient of the batch-size-1 loss (autograd,
vmapped over the draws) must give back the label on every one of 1,000 draws per (classes, activation),
for every rule the paper guarantees: `bias` always, `inner_product` always (C >= 3), `weight_sum` when
a >= 0 (sigmoid, ReLU). Then the same through the real pipeline (LeNet victims, client.share_gradient).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from lightning_idlg.case.client import PrivateBatch, share_gradient, stack_victims
from lightning_idlg.attacks.labels import LABEL_RULES, extract_label
from lightning_idlg.case.model import LeNet, make_victim, output_layer

ACT = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh}
RULES = {"sigmoid": ("bias", "weight_sum", "inner_product"),
         "relu": ("bias", "weight_sum", "inner_product"),
         "tanh": ("bias", "inner_product")}  # weight_sum needs a >= 0
DRAWS, FEATURES, CHUNK = 1000, 32, 250  # 5749 x 32 x 250 floats = 184 MB per tensor at most


def _last_layer_loss(w, b, a, y):
    """Cross-entropy (mean over the batch of one) of y = W a + b, as the client computes it."""
    return F.cross_entropy((w @ a + b).unsqueeze(0), y.unsqueeze(0))


_true_gradient = vmap(grad(_last_layer_loss, argnums=(0, 1)))


def draw(num_classes: int, activation: str, n: int, seed: int, features: int = FEATURES):
    """n draws of (W, b, a, label) and the autograd gradient (grad_W (n, C, F), grad_b (n, C))."""
    g = torch.Generator().manual_seed(seed)
    a = ACT[activation](2.0 * torch.randn(n, features, generator=g))
    w = torch.rand(n, num_classes, features, generator=g) - 0.5
    b = torch.rand(n, num_classes, generator=g) - 0.5
    y = torch.randint(num_classes, (n,), generator=g)
    grad_w, grad_b = _true_gradient(w, b, a, y)
    return w, b, a, y, grad_w, grad_b


def test_closed_form_gradient_matches_autograd():
    """grad_b = softmax - onehot and grad_W = grad_b a^T (the derivation the rules rest on), checked
    against the vmapped autograd gradient and against a plain nn.Linear + backward()."""
    w, b, a, y, grad_w, grad_b = draw(100, "tanh", 64, seed=1)
    g = torch.softmax(torch.einsum("kcf,kf->kc", w, a) + b, dim=-1) - F.one_hot(y, 100)
    torch.testing.assert_close(grad_b, g, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_w, g[:, :, None] * a[:, None, :], rtol=1e-5, atol=1e-7)
    assert ((grad_b < 0).sum(1) == 1).all()  # exactly one negative entry, at the label
    assert torch.equal(grad_b.argmin(1), y)
    for k in (0, 37):
        layer = nn.Linear(FEATURES, 100)
        with torch.no_grad():
            layer.weight.copy_(w[k])
            layer.bias.copy_(b[k])
        F.cross_entropy(layer(a[k:k + 1]), y[k:k + 1]).backward()
        torch.testing.assert_close(layer.weight.grad, grad_w[k], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(layer.bias.grad, grad_b[k], rtol=1e-6, atol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
@pytest.mark.parametrize("num_classes", [10, 100, 5749])
def test_rules_exact_on_1000_random_draws(num_classes, activation):
    correct = {rule: 0 for rule in LABEL_RULES}
    labels, model_is_right, zero_features = [], 0, 0
    for chunk in range(DRAWS // CHUNK):
        w, b, a, y, grad_w, grad_b = draw(num_classes, activation, CHUNK, seed=1000 * num_classes + chunk)
        for rule in LABEL_RULES:
            correct[rule] += int((extract_label(grad_w, grad_b, rule) == y).sum())
        labels.append(y)
        model_is_right += int((torch.einsum("kcf,kf->kc", w, a).add(b).argmax(1) == y).sum())
        zero_features += int((a == 0).sum())
        del w, grad_w
    for rule in RULES[activation]:
        assert correct[rule] == DRAWS, (rule, correct[rule])
    # the draws are not trivial: labels spread over the classes, and the label is mostly not the
    # network's own prediction (so reading the logits would not do)
    labels = torch.cat(labels)
    assert labels.unique().numel() >= min(num_classes, 800)
    assert model_is_right < 0.5 * DRAWS
    if activation == "relu":
        assert zero_features > 0.4 * DRAWS * FEATURES  # about half the features are exactly 0
    if activation == "tanh":
        # a has both signs: the weight_sum rule's assumption fails and so does the rule, often
        assert correct["weight_sum"] < 0.8 * DRAWS, correct["weight_sum"]


def test_relu_features_with_exact_zeros():
    """Features with exact zeros (dead ReLUs), down to a single live feature, leave bias and
    inner_product exact (and weight_sum too, since a >= 0); with all features dead, bias still is."""
    torch.manual_seed(5)
    n, c, f = 300, 100, 16
    a = torch.relu(torch.randn(n, f))
    a[:100, 1:] = 0.0          # one live feature at most
    a[:100, 0] = torch.rand(100) + 0.01
    a[100:200, ::2] = 0.0      # half dead
    w, b = torch.rand(n, c, f) - 0.5, torch.rand(n, c) - 0.5
    y = torch.randint(c, (n,))
    grad_w, grad_b = _true_gradient(w, b, a, y)
    assert (a == 0).float().mean() > 0.5
    for rule in LABEL_RULES:
        assert torch.equal(extract_label(grad_w, grad_b, rule), y), rule
    dead = torch.zeros(20, f)
    grad_w, grad_b = _true_gradient(w[:20], b[:20], dead, y[:20])
    assert torch.equal(grad_w, torch.zeros_like(grad_w))
    assert torch.equal(extract_label(grad_w, grad_b, "bias"), y[:20])


def test_two_classes_bias_and_weight_sum():
    w, b, a, y, grad_w, grad_b = draw(2, "sigmoid", 500, seed=3)
    assert 100 < int(y.sum()) < 400
    for rule in ("bias", "weight_sum"):
        assert torch.equal(extract_label(grad_w, grad_b, rule), y), rule


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
def test_rules_exact_through_lenet_pipeline(activation):
    """64 paper-style LeNet victims (3x32x32 inputs, 100 classes, U(-0.5, 0.5)), each with its own random
    image and label; the attacker reads the label from the shared gradient of `output_layer`.
    With ReLU the logits reach the hundreds; where the victim is then sure of the true class, float32
    rounds softmax_c to 1 and g_c = softmax_c - 1 to exactly 0, like most other g_i: the shared gradient
    holds no trace of the label (several classes tie at 0) and no rule can work. Those trials are counted
    and shown to be ties; every other trial must be exact."""
    k, num_classes = 64, 100
    factory = functools.partial(LeNet, activation=activation)
    victims = [make_victim(factory, in_channels=3, image_size=32, num_classes=num_classes, seed=s)
               for s in range(k)]
    g = torch.Generator().manual_seed(11)
    images = torch.rand(k, 3, 32, 32, generator=g)
    labels = torch.randint(num_classes, (k,), generator=g)
    shared = share_gradient(victims[0], stack_victims(victims)[0], PrivateBatch(images[:, None], labels[:, None]),
                            num_classes)
    name, layer = output_layer(victims[0])
    assert name == "classifier" and layer.weight.shape == (num_classes, 768)
    weight_grad, bias_grad = shared.gradients[f"{name}.weight"], shared.gradients[f"{name}.bias"]
    assert weight_grad.shape == (k, num_classes, 768) and bias_grad.shape == (k, num_classes)
    informative = bias_grad[torch.arange(k), labels] < 0
    if activation == "sigmoid":  # the paper's setting: every trial
        assert informative.all()
    else:
        assert int(informative.sum()) >= k - 4, int(informative.sum())
        for i in (~informative).nonzero().flatten().tolist():
            assert int((bias_grad[i] == 0).sum()) >= 2  # the label hides among tied zeros
    for rule in RULES[activation]:
        predicted = extract_label(weight_grad, bias_grad, rule)
        assert predicted.shape == (k,) and predicted.dtype == torch.long
        assert torch.equal(predicted[informative], labels[informative]), rule
    assert labels.unique().numel() > 40
    if activation == "sigmoid":  # the untrained victims' own predictions are not the labels
        with torch.no_grad():
            predictions = torch.stack([v(images[i:i + 1])[0].argmax() for i, v in enumerate(victims)])
        assert int((predictions == labels).sum()) < k // 4


def _algorithm_1(weight_grad):
    """The paper's Algorithm 1 by brute force (O(C^2 F)): rows whose inner product with every other row
    is <= 0. Returns (qualifying mask (K, C))."""
    gram = weight_grad @ weight_grad.transpose(1, 2)
    eye = torch.eye(weight_grad.shape[1], dtype=torch.bool)
    return ((gram <= 0) | eye).all(dim=-1)


@pytest.mark.parametrize("scale", [0.5, 6.0])
def test_inner_product_is_algorithm_1(scale):
    """The O(C F) pivot form equals Algorithm 1 wherever Algorithm 1 names one row, also for confident
    networks (weights U(-6, 6), label = the network's own top class, as for a trained network). There
    float32 rounds g_c = softmax_c - 1 to exactly 0 on many draws while other g_i stay > 0: row c is
    then zero, no product is negative, and c is the row Algorithm 1 names (the bias and weight_sum rules
    see it too: the only 0 among positives)."""
    g = torch.Generator().manual_seed(21)
    n, c, f = 1000, 100, FEATURES
    a = torch.sigmoid(2.0 * torch.randn(n, f, generator=g))
    w = (torch.rand(n, c, f, generator=g) - 0.5) * 2 * scale
    b = (torch.rand(n, c, generator=g) - 0.5) * 2 * scale
    y = (torch.einsum("kcf,kf->kc", w, a) + b).argmax(1) if scale > 1 else torch.randint(c, (n,), generator=g)
    grad_w, grad_b = _true_gradient(w, b, a, y)
    qualifies = _algorithm_1(grad_w)
    unique = qualifies.sum(1) == 1
    predicted = extract_label(grad_w, grad_b, "inner_product")
    assert torch.equal(predicted[unique], qualifies.float().argmax(1)[unique])
    assert torch.equal(predicted[unique], y[unique])
    g_c = grad_b[torch.arange(n), y]
    rounded_to_zero = (g_c == 0) & ((grad_b > 0).sum(1) == c - 1)
    if scale < 1:
        assert int(unique.sum()) == n and int(rounded_to_zero.sum()) == 0
    else:
        assert int(unique.sum()) > 0.95 * n
        # the case is exercised (elsewhere some g_i are so small that their products underflow to 0 too,
        # and Algorithm 1 names several rows)
        named = rounded_to_zero & unique
        assert int(named.sum()) >= 10, int(named.sum())
        for rule in LABEL_RULES:
            assert torch.equal(extract_label(grad_w, grad_b, rule)[named], y[named]), rule
        assert torch.equal(extract_label(grad_w, grad_b, "bias")[rounded_to_zero], y[rounded_to_zero])


def test_errors():
    grad_w, grad_b = torch.randn(3, 5, 4), torch.randn(3, 5)
    with pytest.raises(ValueError, match="bias"):
        extract_label(grad_w, None, "bias")
    with pytest.raises(ValueError) as info:
        extract_label(grad_w, grad_b, "argmax")
    assert "argmax" in str(info.value)
    for rule in ("bias", "weight_sum", "inner_product"):
        assert rule in str(info.value)
    with pytest.raises(ValueError, match="3 classes"):
        extract_label(torch.randn(3, 2, 4), torch.randn(3, 2), "inner_product")
    # the weight rules do not need the bias
    w, b, a, y, gw, gb = draw(10, "sigmoid", 50, seed=4)
    assert torch.equal(extract_label(gw, None, "weight_sum"), y)
    assert torch.equal(extract_label(gw, None, "inner_product"), y)
