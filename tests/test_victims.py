"""The realistic victims (lightning_idlg/architectures.py): breaching's parameter layout, and BatchNorm
networks through the attack core (per-trial weights in torch.func, train and eval mode, shared buffers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_idlg.client import Client, PrivateBatch, stack_victims
from lightning_idlg.objective import BatchedDistance
from lightning_idlg.victim import DefaultInit, make_victim
from tests.toys import TinyBN

pytestmark = pytest.mark.usefixtures("one_thread")


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
