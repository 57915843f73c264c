"""iDLG label extraction from the shared gradient of the last Linear layer (batch size 1).

With cross-entropy and one-hot label c, the gradient w.r.t. logit i is g_i = softmax_i - [i == c]: only
g_c is negative. For y = W a + b: grad_b = g and row i of grad_W is g_i * a. Three rules follow:
- `bias`: argmin grad_b (exact whenever the layer has a bias);
- `weight_sum`: argmin_i sum_k grad_W[i, k] (the reference script's rule; needs a >= 0, e.g. sigmoid or
  ReLU features);
- `inner_product`: grad_W[i] . grad_W[j] = g_i g_j |a|^2 is negative exactly when one of i, j is c, so c
  is the row whose inner product with every other row is <= 0 (the paper's Algorithm 1; no sign
  assumption on a; needs at least 3 classes to be unambiguous).
"""

from __future__ import annotations

import torch

from lightning_idlg.errors import ConfigError
from lightning_idlg.victim import output_layer

LABEL_RULES = ("bias", "weight_sum", "inner_product")


def extract_label(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, rule: str) -> torch.Tensor:
    """Labels (K,) from the last layer's shared gradients: weight (K, C, F), bias (K, C) or None."""
    if rule == "bias":
        if bias_grad is None:
            raise ConfigError("label_rule=bias needs a last Linear layer with a bias; use weight_sum or "
                             "inner_product")
        return bias_grad.argmin(dim=-1)
    if rule == "weight_sum":
        return weight_grad.sum(dim=-1).argmin(dim=-1)
    if rule == "inner_product":
        return _inner_product_rule(weight_grad)
    raise ConfigError(f"label_rule={rule!r} is not known; valid: {', '.join(LABEL_RULES)}")


def _inner_product_rule(weight_grad: torch.Tensor) -> torch.Tensor:
    """O(C F) form of Algorithm 1. Take a pivot row r (the largest, so never a zero row). Rows with a
    negative inner product with r have the opposite sign of g_r. If r is c, every other row is negative;
    if r is not c, only row c is. So: exactly one negative row -> it is c; otherwise c = r (or, with no
    negative row, the one zero row: g_c rounded to 0, see below)."""
    num_classes = weight_grad.shape[-2]
    if num_classes < 3:
        raise ConfigError("label_rule=inner_product needs at least 3 classes (with 2 both rows qualify); "
                         "use bias or weight_sum")
    trials = torch.arange(weight_grad.shape[0], device=weight_grad.device)
    pivot = weight_grad.norm(dim=-1).argmax(dim=-1)                       # (K,)
    products = torch.einsum("kcf,kf->kc", weight_grad, weight_grad[trials, pivot])
    negative = products < 0
    single = negative.sum(dim=-1) == 1
    label = torch.where(single, negative.float().argmax(dim=-1), pivot)
    # A confident network can round g_c = softmax_c - 1 to exactly 0 in float32 while the other g_i are
    # not 0: then no product is negative, and the zero row c is the only row whose product with every
    # other row is <= 0 (the pivot qualifies only when it is the sole positive row).
    zero = products == 0
    lone_zero = ~negative.any(dim=-1) & (zero.sum(dim=-1) == 1) & ((products > 0).sum(dim=-1) >= 2)
    return torch.where(lone_zero, zero.float().argmax(dim=-1), label)


# ---------------------------------------------------------------------------------------------- strategies
# A label strategy is one part of an attack (configs/attack/*.yaml `labels`). It says whether the labels
# are learned with the dummy (DLG) or restored from the shared gradient before the optimization (iDLG), and
# which client batch sizes B it supports.

class LabelStrategy:
    """learned: labels are optimized jointly with x' (the attack holds logits); else `restore` gives them.
    max_batch: the largest client batch B the strategy is defined for (None: any)."""

    name = "labels"
    learned = False
    max_batch: int | None = None

    def check(self, batch_size: int) -> None:
        if self.max_batch is not None and batch_size > self.max_batch:
            raise ConfigError(f"the {self.name} label strategy supports client.batch_size <= {self.max_batch}, "
                              f"got {batch_size}; use a learned label (attack=dlg) for larger client batches")

    def restore(self, shared) -> torch.Tensor:
        """(K, B) labels from a SharedGradient (analytic strategies)."""
        raise NotImplementedError(f"{type(self).__name__} learns its labels; it restores none")


class LearnedLabel(LabelStrategy):
    """DLG: dummy label logits l' (K, B, classes) optimized jointly with x'; label = argmax l', label
    probabilities softmax(l'). Any B."""

    name = "learned"
    learned = True


class AnalyticLabel(LabelStrategy):
    """iDLG: the label read from the shared gradient of the last Linear layer by `rule` (see the module
    docstring), exact for one sample: B = 1 only (batch label restoration is another strategy)."""

    name = "iDLG"
    max_batch = 1

    def __init__(self, rule: str = "weight_sum"):
        if rule not in LABEL_RULES:
            raise ConfigError(f"labels.rule={rule!r} is not known; valid: {', '.join(LABEL_RULES)}")
        self.rule = rule

    def restore(self, shared) -> torch.Tensor:
        name, layer = output_layer(shared.model)
        weight = shared.gradients[f"{name}.weight"]
        bias = shared.gradients.get(f"{name}.bias") if layer.bias is not None else None
        return extract_label(weight, bias, self.rule)[:, None]
