"""Label strategies: iDLG's label extraction from the shared gradient of the last Linear layer (batch size 1)
and, further down, batch label restoration for clients of B samples (Yin, LLG, LLG+, bias-corrected).

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

import copy

import torch
from torch import nn
from torch.func import functional_call, vmap

from lightning_idlg.errors import ConfigError, positive_int
from lightning_idlg.case.model import output_layer

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
    max_batch: the largest client batch B the strategy is defined for (None: any). distinct: whether it
    assumes the B labels of a client are distinct (it still runs on repeated ones, less accurately)."""

    name = "labels"
    learned = False
    max_batch: int | None = None
    distinct = False  # assumes the client's B labels are distinct

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
    distinct = True

    def __init__(self, rule: str = "weight_sum"):
        if rule not in LABEL_RULES:
            raise ConfigError(f"labels.rule={rule!r} is not known; valid: {', '.join(LABEL_RULES)}")
        self.rule = rule

    def restore(self, shared) -> torch.Tensor:
        name, layer = output_layer(shared.model)
        weight = shared.gradients[f"{name}.weight"]
        bias = shared.gradients.get(f"{name}.bias") if layer.bias is not None else None
        return extract_label(weight, bias, self.rule)[:, None]


# --------------------------------------------------------------------------------- batch label restoration
# For a client batch of B samples (loss reduction mean or sum), row i of the head's weight gradient is
#     grad_W[i] = r * sum_n (p_ni - [y_n == i]) a_n        (r = 1/B for mean, 1 for sum),
# with p_n the victim's softmax and a_n >= 0 the head's input for ReLU or sigmoid features. A class present
# in the batch pulls its row negative by about |a_n| per occurrence ("impact"); every sample pushes every row
# positive by p_ni a_n ("offset"). The strategies below read the multiset of labels from that picture. They
# return (K, B) labels sorted ascending per client: the gradient of a batch does not depend on its order,
# so a restored label belongs to no particular sample (an attack matches them to its dummies).


def head_gradient(shared) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (K, C, F), bias (K, C) or None): the shared gradient of the victim's last Linear layer."""
    name, layer = output_layer(shared.model)
    bias = shared.gradients.get(f"{name}.bias") if layer.bias is not None else None
    return shared.gradients[f"{name}.weight"], bias


def counts_to_labels(counts: torch.Tensor) -> torch.Tensor:
    """(K, C) label counts, each row summing to B -> (K, B) labels sorted ascending."""
    classes = torch.arange(counts.shape[-1], device=counts.device)
    return torch.stack([classes.repeat_interleave(row) for row in counts])


def count_by_impact(evidence: torch.Tensor, impact: torch.Tensor, batch_size: int,
                    offset: torch.Tensor | None = None) -> torch.Tensor:
    """(K, C) label counts from per-class evidence (K, C) (row sums of grad_W, or grad_b), the impact of one
    label occurrence (K,) (< 0) and an optional offset (K, C): Wainakh et al.'s two stages.
    Stage 1: each class with negative evidence occurs at least once; its impact is taken off. Stage 2: the
    remaining labels go, one at a time, to the class with the most negative (evidence - offset), whose
    impact is then taken off. More than B negative classes (possible when the features have both signs):
    the B most negative keep a label (breaching then returns more than B labels)."""
    k, c = evidence.shape
    negative = evidence < 0
    excess = negative.sum(-1) > batch_size
    if excess.any():  # keep the B most negative classes of those clients
        rank = evidence.argsort(-1).argsort(-1)
        negative = torch.where(excess[:, None], negative & (rank < batch_size), negative)
    counts = negative.long()
    residual = evidence - impact[:, None] * negative
    if offset is not None:
        residual = residual - offset
    rows = torch.arange(k, device=evidence.device)
    for _ in range(batch_size - int(counts.sum(-1).min())):
        open_ = counts.sum(-1) < batch_size
        pick = residual.argmin(-1)
        counts[rows[open_], pick[open_]] += 1
        residual[rows[open_], pick[open_]] -= impact[open_]
    return counts


class Yin(LabelStrategy):
    """GradInversion (Yin et al. 2021, "See through gradients"): the B classes whose rows of the head's
    weight gradient have the most negative minimum. With a >= 0 (ReLU, sigmoid) the row of a class absent
    from the batch is a sum of p_ni a_n >= 0, so its minimum is >= 0; the row of a present class is negative
    where its own sample's (p - 1) a_n outweighs the others' p_ni a_n. Assumes B distinct labels (a repeated
    label still takes one row: at most the distinct ones come out right), so B <= classes. Computes what
    breaching's `yin` computes (argsort of the row minima, first B), returned sorted by class."""

    name = "Yin"
    distinct = True

    def restore(self, shared) -> torch.Tensor:
        weight, _ = head_gradient(shared)
        b, c = shared.batch_size, weight.shape[-2]
        if b > c:
            raise ConfigError(f"the Yin label strategy assumes distinct labels: client.batch_size <= {c} classes, "
                              f"got {b}; use LLG or BiasCorrected for larger batches")
        return weight.amin(-1).argsort(-1)[:, :b].sort(-1).values


class LLG(LabelStrategy):
    """LLG (Wainakh et al. 2022, "User-level label leakage from gradients"), the variant needing nothing but
    the gradient: evidence g_i = row sums of the head's weight gradient, impact of one occurrence
    m = (1 + 1/C) * (sum of the negative g_i) / B, no offset; then `count_by_impact`. Repeated labels allowed,
    any B. Same computation as breaching's `wainakh-simple` except in stage 2, where breaching takes the
    impact off the last class index of stage 1's loop (`g_i[idx]`, not the picked class), so its argmin never
    moves and every remaining label goes to one class; ours takes it off the picked class, as the paper does."""

    name = "LLG"
    distinct = False

    def restore(self, shared) -> torch.Tensor:
        weight, _ = head_gradient(shared)
        evidence = weight.sum(-1)
        c, b = evidence.shape[-1], shared.batch_size
        impact = evidence.clamp(max=0).sum(-1) * (1 + 1 / c) / b
        return counts_to_labels(count_by_impact(evidence, impact, b))


class LLGPlus(LabelStrategy):
    """LLG with the white-box estimates (Wainakh et al. 2022; breaching's `wainakh-whitebox`): the attacker,
    who holds the victim, feeds `dummies` random inputs x ~ U(0, 1) (the data's range) through it and measures
    what one label occurrence and one sample contribute to the row sums g_i: with head input a_n, softmax
    p_n and S_n = sum_f a_nf,
        impact m = mean over classes c and dummies n of (p_nc - 1) S_n * r,   offset s_c = mean_n p_nc S_n,
    (r = 1/B for mean reduction, 1 for sum; the offset is the whole batch's, r * B * E[p_c S]), then
    `count_by_impact` with the offset in stage 2. Read off the head's input directly (one forward pass per
    client) rather than, as breaching does, by 2 C dummy backward passes; breaching's estimates differ from
    these where its code departs from the method: its impact sums all C rows of a dummy gradient, which is
    sum_i (p_i - y_i) S = 0 for cross-entropy, so m ~ 0 (floating-point noise), and it divides the offset by
    T = C - 1 a second time; plus the stage-2 slip of `wainakh-simple` (see LLG)."""

    name = "LLG+"
    distinct = False

    def __init__(self, dummies: int = 64, seed: int = 0):
        positive_int("LLGPlus.dummies", dummies)
        self.dummies, self.seed = dummies, int(seed)

    def restore(self, shared) -> torch.Tensor:
        weight, _ = head_gradient(shared)
        evidence = weight.sum(-1)
        b = shared.batch_size
        scale = 1.0 / b if shared.reduction == "mean" else 1.0
        features, probs = head_inputs(shared, self._dummies(shared, weight))   # (K, N, F), (K, N, C)
        size = features.sum(-1, keepdim=True)                                  # S_n (K, N, 1)
        impact = ((probs - 1) * size).mean(dim=(1, 2)) * scale                 # (K,)
        offset = (probs * size).mean(1) * scale * b                            # (K, C)
        return counts_to_labels(count_by_impact(evidence, impact, b, offset))

    def _dummies(self, shared, like: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.rand(self.dummies, *shared.input_shape, generator=g)
        return x.to(device=like.device, dtype=like.dtype)


def head_inputs(shared, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(head input a (K, N, F), softmax p (K, N, C)) of the N inputs x under each client's victim weights.
    The victim without its head (the last Linear layer replaced by Identity) gives a; a W^T + b gives the
    logits. Assumes the head is applied last, to its input as it comes (LeNet, MLP, ResNet-20's linear)."""
    name, layer = output_layer(shared.model)
    headless = copy.deepcopy(shared.model)
    parent_name, _, child = name.rpartition(".")
    setattr(headless.get_submodule(parent_name) if parent_name else headless, child, nn.Identity())
    body = {n: w for n, w in shared.weights.items() if not n.startswith(f"{name}.")}
    buffers = shared.buffers or {}

    def one(weights, bufs):
        return functional_call(headless, {**weights, **bufs}, (x,))

    with torch.no_grad():
        features = vmap(one)(body, buffers).flatten(2)
        logits = features @ shared.weights[f"{name}.weight"].transpose(1, 2)
        if layer.bias is not None:
            logits = logits + shared.weights[f"{name}.bias"][:, None]
    return features, torch.softmax(logits, -1)


class BiasCorrected(LabelStrategy):
    """Counting with the head's bias gradient (the bias-gradient counting of Geng et al. 2021, "Towards
    general deep leakage in federated learning", in breaching's `bias-corrected` form): grad_b_c =
    r * sum_n (p_nc - [y_n == c]) is negative for every present class whose occurrences outweigh the
    batch's probability mass on it; impact m = (sum of the negative grad_b) / B; then `count_by_impact`.
    The same computation as breaching's `bias-corrected`. Needs a head with a bias; repeated labels, any B."""

    name = "bias-corrected"
    distinct = False

    def restore(self, shared) -> torch.Tensor:
        _, bias = head_gradient(shared)
        if bias is None:
            raise ConfigError("the BiasCorrected label strategy needs a last Linear layer with a bias; use LLG or Yin")
        b = shared.batch_size
        impact = bias.clamp(max=0).sum(-1) / b
        return counts_to_labels(count_by_impact(bias, impact, b))
