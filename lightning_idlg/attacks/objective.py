"""The gradient-matching objective D (DLG eq. 4): the plain sum, over every parameter tensor, of squared
differences between the dummy's gradient and the shared gradient. No normalization (the paper's).

`BatchedDistance` (built by the `SquaredL2` part) computes D for K trials at once, each with its own victim weights, differentiable
w.r.t. the dummies (double backprop). Two routes to the same D:

- plain: torch.func.grad of the sample loss, vmapped over the trials; any model.
- head split (used when the victim ends in a Linear layer applied to its features, as LeNet and the MLP
  do: logits = W h + b): that layer's gradient is the outer product g h^T with g = dL/dlogits =
  softmax(logits) - p, a (classes x features) matrix per trial (100 x 768 for CIFAR-100, 5,749 x 768 for
  LFW). Built and backpropagated op by op it costs some 30 elementwise passes over a tensor of that size,
  most of D's time. Here torch.func computes the gradient of the body (everything before the head) only,
  and the head's term ||g h^T - T||^2 is computed apart, in one of two ways:
  - exact: E = g h^T - T a block of rows at a time (blocks that stay in cache), D and both gradients
    (dD/dg = 2 E h, dD/dh = 2 E^T g) in one pass over T;
  - rank one: a shared gradient of one sample is itself an outer product, T = a b^T up to float32
    rounding. `BatchedDistance.prepare` finds a and b once per batch (in float64) and checks that
    the remainder R = T - a b^T is at rounding level. Then
    ||g h^T - T||^2 = |g|^2 |h|^2 - 2 (g.a)(h.b) + |a|^2 |b|^2 + ||R||^2 - 2 g^T R h,
    which costs O(classes + features) instead of O(classes x features). The last term is dropped:
    it is at most 2 ||g h^T - a b^T|| ||R|| and vanishes at the optimum. It is computed in float64,
    so the cancellation near D = 0 costs nothing at float32 precision.
    An LFW evaluation (K = 16, one thread) costs 4.1 ms per trial this way, 10.0 ms the exact way, and
    23.8 ms with E built whole (the previous code, whose float32 dot product for D was also off by up to
    0.7% at LFW's 4.4M elements; the block sums are within 3e-7 of float64).
    T is the victim's float32 outer product, so ||R|| <= ~1e-7 ||T||. A T that is not rank one (a batch of
    several samples, a noised gradient), or float64 (where nothing wider absorbs the cancellation),
    keeps the exact way.
  tests/attacks/test_objective.py checks every route against a per-trial autograd loop (float64 1e-10, float32
  1e-5).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad

from lightning_idlg.case.client import batch_loss, over_trials, soft_cross_entropy
from lightning_idlg.errors import ConfigError
from lightning_idlg.case.model import output_layer


def gradient_distance(dummy_grads: dict[str, torch.Tensor], shared_grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """D = sum_l ||dummy_grad_l - shared_grad_l||^2 over all parameter tensors (one trial)."""
    return sum(((dummy_grads[name] - shared_grads[name]) ** 2).sum() for name in shared_grads)


# elements of E per block in the exact head term: ~1 MB of float32 stays in a CPU core's cache (2^18 was
# fastest for LFW at K = 4..32); on a GPU only memory limits it
BLOCK_ELEMENTS = {"cpu": 2 ** 18, "cuda": 2 ** 26}
RANK_ONE_RTOL = 1e-5  # ||T - a b^T|| / ||T|| below which the head's shared gradient counts as rank one


class BatchedDistance:
    """D for K trials at once: distance(weights, targets, x', label probs, buffers) -> (K,), with x'
    (K, B, C, H, W) and label probs (K, B, classes) for a client batch of B samples.

    `targets` are the shared gradients as they were shared, or as `prepare` returns them (once per
    batch: the head's gradient factored where it is rank one). With `input_shape` (one input's
    (C, H, W)) and B = 1 the head-split route is used where the model allows it (see the module
    docstring); otherwise the plain route. `buffers` (name -> (K, *shape), may be empty) are passed to
    the model with the weights (BatchNorm statistics in eval mode)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | None = None, batch_size: int = 1,
                 reduction: str = "mean"):
        # the head split writes out the gradient of one sample's loss (g h^T); a batch's is a sum of those
        split = split_head(model, input_shape) if input_shape is not None and batch_size == 1 else None
        self.head = split[1] if split is not None else None
        self._distance = _plain_distance(model, reduction) if split is None else _head_split_distance(*split)

    def prepare(self, shared_grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The targets D compares against: the shared gradients, with the head's weight gradient T
        replaced by its float64 factors (`<head>.weight:left`, `:right`, `:residual`) where every trial's T
        is rank one to float32 rounding; unchanged otherwise (a defended gradient is not rank one)."""
        name = f"{self.head}.weight"
        factorable = self.head is not None and shared_grads[name].dtype != torch.float64
        factors = rank_one_factors(shared_grads[name]) if factorable else None
        if factors is None:
            return dict(shared_grads)
        targets = {n: g for n, g in shared_grads.items() if n != name}
        targets.update({f"{name}:left": factors[0], f"{name}:right": factors[1], f"{name}:residual": factors[2]})
        return targets

    def __call__(self, weights, targets, x, label_probs, buffers=None) -> torch.Tensor:
        return self._distance(weights, targets, x, label_probs, buffers or {})


class SquaredL2:
    """The matching objective of DLG and iDLG (DLG eq. 4): D = sum over every parameter tensor of the
    squared differences between the dummy's gradient and the shared one, unnormalized. One part of an
    attack (configs/attack/*.yaml `objective`); `build` gives the batched D for a victim and client."""

    name = "squared_l2"

    def build(self, model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
              reduction: str = "mean") -> BatchedDistance:
        return BatchedDistance(model, input_shape, batch_size, reduction)


def rank_one_factors(target: torch.Tensor, rtol: float = RANK_ONE_RTOL):
    """(a (K, m), b (K, n), ||R||^2 (K,)), float64, with T_k = a_k b_k^T + R_k and |b_k| = 1 (or 0), for T
    (K, m, n); None when some trial has ||R_k|| > rtol ||T_k||. One trial at a time (a float64 copy of
    LFW's T is 35 MB); two power iterations from T's largest row, which for a rank-one T is already b."""
    lefts, rights, residuals = [], [], []
    for t in target:
        t = t.double()
        v = t[t.norm(dim=1).argmax()]
        for _ in range(2):
            v = t.T @ (t @ v)
            v = v / v.norm() if v.norm() > 0 else v
        u = t @ v
        residual = torch.addr(t, u, v, alpha=-1).square().sum()
        if residual > rtol ** 2 * t.square().sum():
            return None
        lefts.append(u), rights.append(v), residuals.append(residual)
    return torch.stack(lefts), torch.stack(rights), torch.stack(residuals)


def _plain_distance(model: nn.Module, reduction: str = "mean"):
    dummy_gradient = grad(batch_loss(model, reduction))

    def one_trial(weights, shared_grads, x, label_probs, buffers):
        return gradient_distance(dummy_gradient(weights, buffers, x, label_probs), shared_grads)

    return over_trials(one_trial)


def split_head(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, str] | None:
    """(body, head name) when model(x) == head(body(x)) for its last Linear layer `head`, with body the
    model with that layer replaced by an identity (same parameter names otherwise); None when the model
    does something else with the head's output (or has no Linear layer)."""
    try:
        name, head = output_layer(model)
    except ConfigError:  # no Linear layer
        return None
    body = copy.deepcopy(model)
    body.set_submodule(name, nn.Identity())
    x = torch.randn((2, *input_shape), generator=torch.Generator().manual_seed(0))
    param = next(model.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    with torch.no_grad():
        features = body(x)
        if features.dim() != 2 or features.shape[1] != head.in_features:
            return None
        if not torch.allclose(head(features), model(x), rtol=1e-5, atol=1e-6):
            return None
    return body, name


class _HeadDistance(torch.autograd.Function):
    """||g h^T - T||^2 per trial (g: (K, classes), h: (K, features), T: (K, classes, features)), exact.
    E = g h^T - T is formed a block of rows at a time, small enough to stay in cache, and D,
    E h and E^T g are all taken from the block while it is there: one pass over T instead of five, and
    no K x classes x features temporary (LFW: 565 MB at K = 32). The backward only scales the saved
    dD/dg = 2 E h and dD/dh = 2 E^T g (T is a constant)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k, classes, features = target.shape
        budget = BLOCK_ELEMENTS["cuda" if target.is_cuda else "cpu"]
        rows = max(1, budget // max(1, k * features))
        distance = torch.zeros(k, dtype=target.dtype, device=target.device)
        e_h, e_t_g = torch.empty_like(g), torch.zeros_like(h)
        for start in range(0, classes, rows):
            block = slice(start, start + rows)
            error = torch.baddbmm(target[:, block], g[:, block, None], h[:, None, :], beta=-1)
            distance += error.square().sum((1, 2))
            e_h[:, block] = torch.bmm(error, h[:, :, None]).squeeze(2)
            e_t_g += torch.bmm(g[:, None, block], error).squeeze(1)
        ctx.save_for_backward(e_h, e_t_g)
        return distance

    @staticmethod
    def backward(ctx, grad_distance: torch.Tensor):
        e_h, e_t_g = ctx.saved_tensors
        scale = 2 * grad_distance[:, None]
        return e_h * scale, e_t_g * scale, None


def _rank_one_head_distance(g, h, left, right, residual) -> torch.Tensor:
    """||g h^T - T||^2 with T = left right^T + R (|right| = 1 or 0), in float64 (see the module docstring):
    |g|^2 |h|^2 - 2 (g.a)(h.b) + |a|^2 + ||R||^2, dropping -2 g^T R h (rounding level)."""
    g64, h64 = g.double(), h.double()
    d = (g64.square().sum(1) * h64.square().sum(1) - 2 * (g64 * left).sum(1) * (h64 * right).sum(1)
         + left.square().sum(1) + residual)
    return d.to(g.dtype)


def _head_split_gradients(body: nn.Module, head: str):
    """gradients(weights, x', label probs, buffers) -> (body's gradients, g (K, classes), h (K, features)) for
    one sample per trial: the head's weight gradient is g h^T and its bias gradient g, left to the caller."""
    prefix = head + "."

    def body_loss(body_weights, head_weights, x, label_probs, buffers):
        h = functional_call(body, {**body_weights, **buffers}, (x.unsqueeze(0),))
        logits = nn.functional.linear(h, head_weights["weight"], head_weights.get("bias"))
        return soft_cross_entropy(logits, label_probs.unsqueeze(0)), (h[0], logits[0])

    body_gradient = over_trials(grad(body_loss, has_aux=True))

    def gradients(weights, x, label_probs, buffers):
        x, label_probs = x[:, 0], label_probs[:, 0]  # B = 1: the route is for one sample's gradient
        body_weights = {n: w for n, w in weights.items() if not n.startswith(prefix)}
        head_weights = {n[len(prefix):]: w for n, w in weights.items() if n.startswith(prefix)}
        body_grads, (h, logits) = body_gradient(body_weights, head_weights, x, label_probs, buffers)
        # dL/dlogits of the soft cross-entropy (one sample): softmax * sum(p) - p (sum(p) = 1, kept so
        # that DLG's gradient through p is exact)
        g = torch.softmax(logits, -1) * label_probs.sum(-1, keepdim=True) - label_probs
        return body_grads, g, h

    return gradients


def _head_split_distance(body: nn.Module, head: str):
    prefix = head + "."
    gradients = _head_split_gradients(body, head)

    def distance(weights, shared_grads, x, label_probs, buffers):
        body_grads, g, h = gradients(weights, x, label_probs, buffers)
        if prefix + "weight:left" in shared_grads:  # factored by BatchedDistance.prepare
            d = _rank_one_head_distance(g, h, *(shared_grads[f"{prefix}weight:{part}"]
                                                for part in ("left", "right", "residual")))
        else:
            d = _HeadDistance.apply(g, h, shared_grads[prefix + "weight"])
        if prefix + "bias" in shared_grads:  # the bias gradient is g itself
            d = d + ((g - shared_grads[prefix + "bias"]) ** 2).sum(1)
        for name, dummy_grad in body_grads.items():
            d = d + ((dummy_grad - shared_grads[name]) ** 2).flatten(1).sum(1)
        return d

    return distance


# --- Inverting Gradients (Geiping et al. 2020): 1 - cosine similarity --------------------------------------

LAYER_WEIGHTS = ("equal", "linear", "exp")


def layer_weights(names: list[str], scheme: str) -> dict[str, float]:
    """A weight per parameter tensor, in the model's parameter order (first to last), as Inverting Gradients'
    code offers them: equal; linear, (n - i) / n; exp, softmax over (n - i) divided by its first entry.
    Both later schemes weigh the first layers most."""
    if scheme not in LAYER_WEIGHTS:
        raise ConfigError(f"objective.layer_weights={scheme!r} is not known; valid: {', '.join(LAYER_WEIGHTS)}")
    n = len(names)
    ranks = torch.arange(n, 0, -1, dtype=torch.float64)
    if scheme == "equal":
        weights = torch.ones(n, dtype=torch.float64)
    elif scheme == "linear":
        weights = ranks / n
    else:
        weights = ranks.softmax(0)
        weights = weights / weights[0]
    return dict(zip(names, weights.tolist()))


class CosineSimilarity:
    """The matching objective of Inverting Gradients: D = 1 - <g', g> / (|g'| |g|) over all parameter
    tensors at once (one vector), each tensor weighted by `layer_weights` (equal in the paper and in
    breaching's `invertinggradients`). Scale-free, so a gradient shrunk by clipping or a small learning
    rate matches as well as the raw one."""

    name = "cosine"

    def __init__(self, layer_weights: str = "equal"):
        if layer_weights not in LAYER_WEIGHTS:
            raise ConfigError(f"objective.layer_weights={layer_weights!r} is not known; valid: "
                              f"{', '.join(LAYER_WEIGHTS)}")
        self.layer_weights = layer_weights

    def build(self, model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1,
              reduction: str = "mean") -> "BatchedCosine":
        return BatchedCosine(model, input_shape, batch_size, reduction, self.layer_weights)


class BatchedCosine(BatchedDistance):
    """1 - cos(g', g) for K trials at once (see BatchedDistance for the arguments and routes). On the head-split
    route the head's terms come from g and h: <g h^T, T> = g^T T h, or (g.a)(h.b) where T = a b^T (rank one,
    the remainder's g^T R h dropped as in the squared distance), and |g h^T|^2 = |g|^2 |h|^2, so the
    classes x features outer product is never formed."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...] | None = None, batch_size: int = 1,
                 reduction: str = "mean", scheme: str = "equal"):
        split = split_head(model, input_shape) if input_shape is not None and batch_size == 1 else None
        self.head = split[1] if split is not None else None
        self.weights = layer_weights([n for n, _ in model.named_parameters()], scheme)
        if split is None:
            self._distance = _plain_cosine(model, reduction, self.weights)
        else:
            self._distance = _head_split_cosine(*split, self.weights)


def _cosine(dot: torch.Tensor, dummy_norm2: torch.Tensor, shared_norm2: torch.Tensor) -> torch.Tensor:
    return 1 - dot / (dummy_norm2.sqrt() * shared_norm2.sqrt())


def _plain_cosine(model: nn.Module, reduction: str, weights: dict[str, float]):
    dummy_gradient = grad(batch_loss(model, reduction))

    def one_trial(trial_weights, shared_grads, x, label_probs, buffers):
        dummy_grads = dummy_gradient(trial_weights, buffers, x, label_probs)
        dot = sum(weights[n] * (dummy_grads[n] * shared_grads[n]).sum() for n in shared_grads)
        dummy_norm2 = sum(weights[n] * dummy_grads[n].square().sum() for n in shared_grads)
        shared_norm2 = sum(weights[n] * shared_grads[n].square().sum() for n in shared_grads)
        return _cosine(dot, dummy_norm2, shared_norm2)

    return over_trials(one_trial)


def _head_split_cosine(body: nn.Module, head: str, weights: dict[str, float]):
    prefix = head + "."
    gradients = _head_split_gradients(body, head)
    w_head = weights[prefix + "weight"]

    def distance(trial_weights, shared_grads, x, label_probs, buffers):
        body_grads, g, h = gradients(trial_weights, x, label_probs, buffers)
        if prefix + "weight:left" in shared_grads:  # T = a b^T (+ R), |b| = 1
            a, b, residual = (shared_grads[f"{prefix}weight:{part}"] for part in ("left", "right", "residual"))
            g64, h64 = g.double(), h.double()
            dot = w_head * ((g64 * a).sum(1) * (h64 * b).sum(1)).to(g.dtype)
            shared_norm2 = w_head * (a.square().sum(1) + residual).to(g.dtype)
        else:
            t = shared_grads[prefix + "weight"]
            dot = w_head * torch.einsum("kc,kcf,kf->k", g, t, h)
            shared_norm2 = w_head * t.square().flatten(1).sum(1)
        dummy_norm2 = w_head * g.square().sum(1) * h.square().sum(1)
        if prefix + "bias" in shared_grads:  # the bias gradient is g itself
            w, t = weights[prefix + "bias"], shared_grads[prefix + "bias"]
            dot, dummy_norm2 = dot + w * (g * t).sum(1), dummy_norm2 + w * g.square().sum(1)
            shared_norm2 = shared_norm2 + w * t.square().sum(1)
        for name, dummy_grad in body_grads.items():
            w, t = weights[name], shared_grads[name]
            dot = dot + w * (dummy_grad * t).flatten(1).sum(1)
            dummy_norm2 = dummy_norm2 + w * dummy_grad.square().flatten(1).sum(1)
            shared_norm2 = shared_norm2 + w * t.square().flatten(1).sum(1)
        return _cosine(dot, dummy_norm2, shared_norm2)

    return distance
