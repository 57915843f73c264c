"""The realistic victims (lightning_idlg/architectures.py): breaching's parameter layout, and BatchNorm
networks through the attack core (per-trial weights in torch.func, train and eval mode, shared buffers)."""

from __future__ import annotations

import copy
import functools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from lightning_idlg.case.architectures import ConvNet, ResNet, ResNet18, copy_by_order
from lightning_idlg.case.client import Client, PrivateBatch, stack_victims
from lightning_idlg.errors import ConfigError
from lightning_idlg.attacks.objective import BatchedDistance
from lightning_idlg.case.model import DefaultInit, make_victim
from tests.toys import TinyBN
from tests import cli

ROOT = Path(__file__).resolve().parents[2]
# breaching 0.1.2's state dicts of resnet20, ResNet18 and convnet for CIFAR-100 (the file says how it was made)
BREACHING = json.loads((ROOT / "tests" / "data" / "breaching_state_dicts.json").read_text())
pytestmark = pytest.mark.usefixtures("one_thread")

# victim -> (class, keys, image side): narrow and small, so that double backprop takes a second or two
SMALL = {
    "resnet20": (ResNet, {"depth": 8, "width": 0.25}, 8),  # stages of 4/8/16 channels, one block each
    "resnet18": (ResNet18, {"width": 1 / 16}, 16),  # 4/8/16/32 channels; 16x16 keeps a 2x2 map in stage 4
    "convnet": (ConvNet, {"width": 2}, 12),  # 12 -> 4 -> 1 through the two 3x3 max pools
}
CLASSES = 5


def small_victims(name: str, trials: int) -> tuple[list[torch.nn.Module], int]:
    """`trials` float64 victims of one architecture (a network per trial, as the app draws them) whose
    BatchNorm layers hold statistics and affine parameters unlike a fresh layer's, so that eval mode reads
    the buffers and every parameter matters."""
    cls, keys, side = SMALL[name]
    victims = []
    for seed in range(trials):
        net = make_victim(functools.partial(cls, **keys), DefaultInit(), in_channels=3, image_size=side,
                          num_classes=CLASSES, seed=seed).double()
        g = torch.Generator().manual_seed(100 + seed)  # its own draws: the same whatever ran before
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    for tensor, low, high in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0),
                                              (m.weight, 0.5, 1.5), (m.bias, 0.0, 0.3)):  # most ReLUs alive
                        tensor.copy_(torch.rand(tensor.shape, generator=g, dtype=tensor.dtype) * (high - low) + low)
        victims.append(net)
    return victims, side


def private_batch(trials: int, batch: int, side: int, seed: int = 0) -> PrivateBatch:
    g = torch.Generator().manual_seed(seed)
    return PrivateBatch(torch.rand(trials, batch, 3, side, side, generator=g, dtype=torch.float64),
                        torch.randint(CLASSES, (trials, batch), generator=g))


# --- breaching's layout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,build", [
    ("resnet20", lambda: ResNet(3, 32, 100)),
    ("ResNet18", lambda: ResNet18(3, 32, 100)),
    ("convnet", lambda: ConvNet(3, 32, 100)),
])
def test_each_victim_has_breachings_state_dict_for_cifar100(name, build):
    ours = [(key, list(value.shape)) for key, value in build().state_dict().items()]
    theirs = BREACHING[name]
    assert [shape for _, shape in ours] == [shape for _, shape in theirs]  # what copy_by_order needs
    prefix = "model.model." if name == "convnet" else "model."  # breaching's containers
    assert [prefix + key for key, _ in ours] == [key for key, _ in theirs]
    assert len(ours) == {"resnet20": 128, "ResNet18": 122, "convnet": 58}[name]


def test_parameter_counts_are_the_published_ones():
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(ResNet(3, 32, 10)) == 272_474  # He et al.: 0.27M (breaching's projection shortcuts)
    assert count(ResNet(3, 32, 100, depth=56)) == 861_620
    assert count(ResNet18(3, 32, 100)) == 11_220_132
    assert count(ConvNet(3, 32, 100)) == 3_112_420


def test_copy_by_order_moves_every_tensor_and_refuses_another_layout():
    a, b = (make_victim(functools.partial(ResNet, depth=8, width=0.25), DefaultInit(), in_channels=3, image_size=8,
                        num_classes=10, seed=s) for s in (1, 2))
    a.stem[1].running_mean.fill_(0.25)
    assert copy_by_order(a, b) is b
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(b.eval()(x), a.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"entry 0 stem.0.weight \(4, 3, 3, 3\) against stem.0.weight \(8, 3, 3, 3\)"):
        copy_by_order(a, ResNet(3, 8, 10, depth=8, width=0.5))
    with pytest.raises(ValueError, match="by order: 56 state-dict entries against 58"):
        copy_by_order(a, ConvNet(3, 12, 10, width=2))


@pytest.mark.parametrize("build,message", [
    (lambda: ResNet(3, 32, 10, depth=18), r"model.factory.depth=18 is not a CIFAR ResNet depth; valid: 6n\+2"),
    (lambda: ResNet18(3, 32, 10, width=0), "model.factory.width must be a number > 0"),
    (lambda: ConvNet(1, 8, 10), "model=convnet needs images of at least 9x9"),
])
def test_bad_keys_fail_in_one_line(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


# --- through the attack core ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(SMALL))
def test_shared_gradient_and_distance_equal_plain_autograd(name, mode):
    """Per-trial weights through torch.func (stack_victims, functional_victim, the plain route of D) against
    module + F.cross_entropy + autograd, one trial at a time, in float64."""
    k, b = 2, 2
    victims, side = small_victims(name, k)
    weights, buffers = stack_victims(victims)
    private = private_batch(k, b, side)
    shared, _ = Client(batch_size=b, mode=mode, share_buffers=True).share(victims[0], weights, buffers, private,
                                                                          CLASSES)
    assert set(shared.buffers) == set(dict(victims[0].named_buffers()))
    probs = F.one_hot(private.labels, CLASSES).double()
    dummy = torch.rand(k, b, 3, side, side, generator=torch.Generator().manual_seed(3), dtype=torch.float64,
                       requires_grad=True)
    distance = BatchedDistance(shared.model, None, batch_size=b)
    d = distance(weights, shared.gradients, dummy, probs, shared.buffers)
    d_dummy = torch.autograd.grad(d.sum(), dummy)[0]
    for i, victim in enumerate(victims):
        net = getattr(copy.deepcopy(victim), mode)()  # a copy: train mode would update the running statistics
        params = [p for _, p in net.named_parameters()]
        true = torch.autograd.grad(F.cross_entropy(net(private.images[i]), private.labels[i]), params)
        for (param_name, _), grad in zip(net.named_parameters(), true):
            torch.testing.assert_close(shared.gradients[param_name][i], grad, rtol=1e-9, atol=1e-12)
        x = dummy[i].detach().clone().requires_grad_()
        mine = torch.autograd.grad(F.cross_entropy(net(x), private.labels[i]), params, create_graph=True)
        ref = sum(((m - t) ** 2).sum() for m, t in zip(mine, true))
        assert float(d[i].detach()) == pytest.approx(float(ref.detach()), rel=1e-9)
        torch.testing.assert_close(d_dummy[i], torch.autograd.grad(ref, x)[0], rtol=1e-8, atol=1e-12)
    at_truth = distance(weights, shared.gradients, private.images, probs, shared.buffers)
    assert float(at_truth.max()) < 1e-20


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(SMALL))
def test_one_sample_takes_the_head_split_route_to_the_same_distance(name, mode):
    """B = 1 (DLG/iDLG): the pooled features feed the last Linear layer, so D takes the head-split route;
    it equals the plain route's D and is zero at the private image."""
    k = 2
    victims, side = small_victims(name, k)
    weights, buffers = stack_victims(victims)
    private = private_batch(k, 1, side, seed=4)
    shared, _ = Client(mode=mode, share_buffers=True).share(victims[0], weights, buffers, private, CLASSES)
    split = BatchedDistance(shared.model, (3, side, side))
    assert split.head == "linear"
    probs = F.one_hot(private.labels, CLASSES).double()
    dummy = torch.rand(k, 1, 3, side, side, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plain = BatchedDistance(shared.model, None)(weights, shared.gradients, dummy, probs, shared.buffers)
    torch.testing.assert_close(split(weights, split.prepare(shared.gradients), dummy, probs, shared.buffers), plain,
                               rtol=1e-9, atol=1e-15)
    assert float(plain.min()) > 1e-6
    at_truth = split(weights, split.prepare(shared.gradients), private.images, probs, shared.buffers)
    assert float(at_truth.max()) < 1e-20


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_distance_gradient_through_batchnorm_equals_finite_differences(mode):
    """dD/dx' for a BatchNorm victim, the derivative the attack follows: torch.func's batch_norm backward
    under vmap got it wrong in train mode (pytorch/functorch#534; client.BatchStatisticsNorm)."""
    net = make_victim(TinyBN, DefaultInit(), in_channels=1, image_size=4, num_classes=3, seed=0).double()
    weights, buffers = stack_victims([net])
    g = torch.Generator().manual_seed(1)
    private = PrivateBatch(torch.rand(1, 2, 1, 4, 4, generator=g, dtype=torch.float64), torch.tensor([[0, 2]]))
    shared, _ = Client(batch_size=2, mode=mode).share(net, weights, buffers, private, 3)
    distance = BatchedDistance(shared.model, None, batch_size=2)
    probs = F.one_hot(private.labels, 3).double()
    dummy = torch.rand(1, 2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    direction = torch.randn(dummy.shape, generator=g, dtype=torch.float64)
    slope = float((torch.autograd.grad(distance(weights, shared.gradients, dummy, probs).sum(), dummy)[0]
                   * direction).sum())
    with torch.no_grad():
        ahead, behind = (distance(weights, shared.gradients, dummy + s * 1e-6 * direction, probs) for s in (1, -1))
    assert slope == pytest.approx(float(ahead - behind) / 2e-6, rel=1e-7)


@pytest.mark.slow
def test_an_attack_on_a_resnet_runs_end_to_end_and_writes_records(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    result = cli.run(
 [sys.executable, "-m", "lightning_idlg", "model=resnet20", "model.factory.depth=8", "model.factory.width=0.25",
  "dataset=digits", "dataset.image_size=8", "steps=2", "trials=2", "client.mode=eval",
  "client.share_buffers=true", "progress_bar=false", "pictures=false", f"hydra.run.dir={tmp_path / 'run'}"],
 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["index"]) for r in rows) == [("dlg", 0), ("dlg", 1), ("idlg", 0), ("idlg", 1)]
    assert all(1 <= r["steps"] <= 2 and r["mse"] >= 0 for r in rows)
    axes = rows[0]["axes"]
    assert (axes["model"], axes["model.factory.depth"], axes["model.factory.width"]) == ("ResNet", 8, 0.25)
    assert (axes["model.init"], axes["client.mode"]) == ("DefaultInit", "eval")
    # iDLG's label rule holds: the features after ReLU and average pooling are non-negative
    assert all(r["label_correct"] for r in rows if r["method"] == "idlg")


def test_each_new_model_option_builds_its_victim_for_the_data_set():
    from hydra import compose, initialize_config_module

    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        for option, cls, size in (("resnet20", ResNet, 272_474), ("resnet18", ResNet18, 11_173_962),
                                  ("convnet", ConvNet, 2_904_970)):
            cfg = compose("config", overrides=[f"model={option}"])
            net = instantiate(cfg.model.factory)(in_channels=3, image_size=32, num_classes=10)
            assert type(net) is cls and instantiate(cfg.model.init).describe() == {"name": "default"}
            assert sum(p.numel() for p in net.parameters()) == size  # the published networks at width 1
