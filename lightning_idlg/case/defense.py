"""Client-side defenses: what the client does to its gradient before sharing it.

A defense maps the gradients of K independent trials, name -> (K, *shape), to the defended gradients
of the same shapes, dtypes and devices. Trials stay independent: every transform acts on each trial
alone, and trial k's random draws come only from seeds[k] (a CPU `torch.Generator` seeded with it, drawing
for the parameters in dict order), so a trial's defended gradient does not depend on which other trials
share the call. The global RNG is never used. Inputs are never modified in place (where a defense
leaves a tensor as it is, e.g. none or ratio 0, the result may be that tensor itself or a view of it).

The defenses of the DLG paper (Sec. 5): additive Gaussian or Laplacian noise of variance 1e-4 .. 1e-1,
half precision, int8 quantization and pruning of the smallest-magnitude entries; besides those, norm
clipping, top-k sparsification and DP-SGD (Abadi et al.: per-sample clipping plus Gaussian noise, with
the privacy spent from Opacus's RDP accountant). `compose` chains several in order (Hydra group
`defense`: `defense=[clip,gaussian]`), `utility` says how much of the true gradient survives.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

import torch
from torch import Tensor

from lightning_idlg.errors import ConfigError, positive_int

Gradients = dict[str, Tensor]
SCOPES = ("tensor", "global")
REDUCTIONS = ("mean", "sum")


class Defense:
    """Base class: `defense(gradients, seeds)` -> defended gradients; `describe()` -> its parameters.

    per_sample: False: gradients are name -> (K, *shape), the gradient each trial's client would share.
    True: name -> (K, B, *shape), the B per-sample gradients of each trial's batch; the defense returns
    the aggregate name -> (K, *shape) (DP-SGD must see the samples apart to clip each one).
    """

    name = "defense"
    per_sample: bool = False
    parameters: tuple[str, ...] = ()  # the attributes describe() and repr() show

    def __call__(self, gradients: Mapping[str, Tensor], seeds: Sequence[int]) -> Gradients:
        if not gradients:
            return {}
        _check_trials(gradients, seeds, self.per_sample)
        return self._apply(dict(gradients), [int(seed) for seed in seeds])

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        raise NotImplementedError

    def describe(self) -> dict:
        """Name and parameters as plain JSON values, e.g. {"name": "gaussian", "variance": 0.001}."""
        return {"name": self.name, **{key: getattr(self, key) for key in self.parameters}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{key}={getattr(self, key)!r}' for key in self.parameters)})"


class NoDefense(Defense):
    """The paper's setting: the gradient is shared as computed. Returns the same tensors (no copies)."""

    name = "none"

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        return gradients


class _AdditiveNoise(Defense):
    """g + n with n i.i.d. per entry of zero mean and the given VARIANCE (`_draw` says of which law)."""

    parameters = ("variance",)

    def __init__(self, variance: float):
        self.variance = _number(f"defense.{self.name}.variance", variance, "a number >= 0 (a variance; the "
                                "DLG paper's grid is 1e-4 .. 1e-1)", lambda v: v >= 0)

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        if self.variance == 0:
            return gradients
        return _add_noise(gradients, seeds, self._draw)

    def _draw(self, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
        raise NotImplementedError


class GaussianNoise(_AdditiveNoise):
    """g + n, n ~ N(0, variance) i.i.d. per entry (std = sqrt(variance)).

    `variance` is a VARIANCE, as in the DLG paper, whose grid is 1e-4 .. 1e-1 (1e-4 does not stop the
    leak, 1e-2 and above does).
    """

    name = "gaussian"

    def _draw(self, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
        return torch.randn(shape, generator=gen, dtype=dtype) * math.sqrt(self.variance)


class LaplaceNoise(_AdditiveNoise):
    """g + n, n ~ Laplace(0, b) i.i.d. per entry with b = sqrt(variance / 2): Laplace(b) has variance
    2 b^2, so `variance` is the VARIANCE, comparable with GaussianNoise's (DLG paper's grid 1e-4 .. 1e-1).
    Drawn as b (E1 - E2) with E1, E2 ~ Exp(1) independent (exact, and the generator takes no scale)."""

    name = "laplace"

    def _draw(self, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> Tensor:
        pair = torch.empty((2, *shape), dtype=dtype).exponential_(generator=gen)
        return (pair[0] - pair[1]) * math.sqrt(self.variance / 2)


class NormClip(Defense):
    """Per trial, g * min(1, max_norm / ||g||) with ||g|| the L2 norm of all tensors together: the
    direction is kept, the norm becomes min(||g||, max_norm)."""

    name = "clip"
    parameters = ("max_norm",)

    def __init__(self, max_norm: float):
        self.max_norm = _number(f"defense.{self.name}.max_norm", max_norm, "a number > 0", lambda v: v > 0)

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        norms = _norms(gradients, sample_dims=1)                          # (K,)
        factor = (self.max_norm / norms).clamp(max=1.0)                   # a zero gradient: inf -> 1
        return {name: g * _per_row(factor, g) for name, g in gradients.items()}


class DPSGD(Defense):
    """DP-SGD's gradient (Abadi et al. 2016, as Opacus computes it) from per-sample gradients (K, B, ...).

    Per trial: clip each sample's whole gradient (all tensors together) to L2 norm <= C = max_grad_norm,
    g_i * min(1, C / ||g_i||), sum over the B samples, add N(0, (noise_multiplier * C)^2) per entry, and
    divide by B when reduction == "mean" (Opacus's default; the noise std is then noise_multiplier * C / B).
    Opacus divides by ||g_i|| + 1e-6; here the factor is exact, so a sample exactly at the bound is kept.

    sample_rate, rounds and delta do not change the gradient: they are what `epsilon()` accounts for
    (Poisson sampling at sample_rate, `rounds` steps, epsilon at delta).
    """

    name = "dpsgd"
    parameters = ("max_grad_norm", "noise_multiplier", "reduction", "sample_rate", "rounds", "delta")
    per_sample = True

    def __init__(self, max_grad_norm: float, noise_multiplier: float, reduction: str = "mean",
                 sample_rate: float = 0.01, rounds: int = 1, delta: float = 1e-5):
        key = f"defense.{self.name}"
        self.max_grad_norm = _number(f"{key}.max_grad_norm", max_grad_norm, "a number > 0", lambda v: v > 0)
        self.noise_multiplier = _number(f"{key}.noise_multiplier", noise_multiplier, "a number >= 0",
                                        lambda v: v >= 0)
        if reduction not in REDUCTIONS:
            raise ConfigError(f"{key}.reduction={reduction!r} is not known; valid: {', '.join(REDUCTIONS)}")
        self.reduction = reduction
        self.sample_rate = _number(f"{key}.sample_rate", sample_rate, "a number in (0, 1]",
                                   lambda v: 0 < v <= 1)
        positive_int(f"{key}.rounds", rounds)
        self.rounds = rounds
        self.delta = _number(f"{key}.delta", delta, "a number in (0, 1)", lambda v: 0 < v < 1)
        self._epsilon: float | None = None

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        norms = _norms(gradients, sample_dims=2)                          # (K, B)
        factor = (self.max_grad_norm / norms).clamp(max=1.0)              # a zero sample: inf -> 1
        summed = {name: (g * _per_row(factor, g)).sum(dim=1) for name, g in gradients.items()}
        if self.noise_multiplier > 0:
            std = self.noise_multiplier * self.max_grad_norm
            summed = _add_noise(summed, seeds, lambda shape, dtype, gen: torch.randn(shape, generator=gen,
                                                                                     dtype=dtype) * std)
        if self.reduction == "sum":
            return summed
        batch = next(iter(gradients.values())).shape[1]
        return {name: g / batch for name, g in summed.items()}

    def epsilon(self) -> float:
        """Privacy spent: epsilon at `delta` after `rounds` steps at `sample_rate` (Opacus's RDP accountant);
        inf without noise."""
        if self._epsilon is None:
            from opacus.accountants import RDPAccountant  # slow to import: only when asked

            accountant = RDPAccountant()
            accountant.history = [(self.noise_multiplier, self.sample_rate, self.rounds)]
            self._epsilon = float(accountant.get_epsilon(delta=self.delta))
        return self._epsilon

    def describe(self) -> dict:
        epsilon = self.epsilon()
        # JSON has no inf: null is no privacy (noise_multiplier 0)
        return {**super().describe(), "epsilon": epsilon if math.isfinite(epsilon) else None}


class Prune(Defense):
    """Magnitude pruning (DLG paper: above ~20% pruned the attack fails): zero the round(ratio * n)
    smallest-|g| entries of each trial, n counted per tensor (scope "tensor") or over all tensors of the
    trial ("global"). Exactly that many: entries are ranked by (|g|, index), so of equal magnitudes the
    lower index goes first (a threshold would prune every tie). round() is Python's: halves to even."""

    name = "prune"
    parameters = ("ratio", "scope")

    def __init__(self, ratio: float, scope: str = "tensor"):
        self.ratio = _number(f"defense.{self.name}.ratio", ratio, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        self.scope = _scope(f"defense.{self.name}.scope", scope)

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        return _zero_lowest(gradients, self.scope, lambda n: round(_decimal(self.ratio) * n))


class TopK(Defense):
    """Top-k sparsification: keep the ceil(keep * n) largest-|g| entries of each trial, zero the rest; n
    per tensor ("tensor") or over all tensors of the trial ("global"). Same ranking as Prune, so
    TopK(keep) zeroes exactly what Prune zeroes for the same count."""

    name = "topk"
    parameters = ("keep", "scope")

    def __init__(self, keep: float, scope: str = "global"):
        self.keep = _number(f"defense.{self.name}.keep", keep, "a number in [0, 1]", lambda v: 0 <= v <= 1)
        self.scope = _scope(f"defense.{self.name}.scope", scope)

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        return _zero_lowest(gradients, self.scope, lambda n: n - math.ceil(_decimal(self.keep) * n))


class Half(Defense):
    """Half precision (DLG paper: does not protect): round every entry to float16 and back to its dtype.
    |g| above 65504 becomes inf, below ~6e-8 becomes 0, as a float16 client would send it."""

    name = "fp16"

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        return {name: g.to(torch.float16).to(g.dtype) for name, g in gradients.items()}


class Int8(Defense):
    """Symmetric int8 quantization per tensor per trial: scale = max|g| / 127, q = round(g / scale)
    clamped to [-127, 127], shared as q * scale (error <= scale / 2 per entry; an all-zero tensor, scale
    0, stays zero)."""

    name = "int8"

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        return {name: _int8(g) for name, g in gradients.items()}


class Chain(Defense):
    """Defenses applied in order (e.g. clip then gaussian); no parts: the identity.

    Only the first part may take per-sample gradients (it aggregates them); the chain does iff it does.
    Part 0 draws from the trial's own seed (a chain of one is that defense); part i > 0 from a hash of
    (seed, i), so two noisy parts never reuse one stream.
    """

    def __init__(self, parts: Sequence[Defense] = ()):
        self.parts = list(parts)
        for i, part in enumerate(self.parts):
            if not isinstance(part, Defense):
                raise ConfigError(f"defense: {part!r} is not a defense; valid: the options of configs/defense "
                                  "(none, gaussian, laplace, clip, dpsgd, prune, topk, fp16, int8)")
            if i > 0 and part.per_sample:
                raise ConfigError(f"defense: {part.name} takes per-sample gradients, so it must come first; "
                                  f"got {'+'.join(p.name for p in self.parts)}")
        self.per_sample = bool(self.parts) and self.parts[0].per_sample

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts) or "none"

    def _apply(self, gradients: Gradients, seeds: list[int]) -> Gradients:
        for i, part in enumerate(self.parts):
            gradients = part(gradients, seeds if i == 0 else [_part_seed(seed, i) for seed in seeds])
        return gradients

    def describe(self) -> dict:
        return {"name": self.name, "parts": [part.describe() for part in self.parts]}

    def __repr__(self) -> str:
        return f"Chain({self.parts!r})"


def compose(defenses: Mapping[str, Defense] | Sequence[Defense] | Defense | None) -> Chain:
    """One Chain from the instantiated `defense` config (name -> Defense, applied in its order), a list,
    one defense, or None / empty (the identity)."""
    if defenses is None:
        return Chain()
    if isinstance(defenses, Chain):
        return defenses
    if isinstance(defenses, Defense):
        return Chain([defenses])
    if isinstance(defenses, Mapping):
        return Chain(list(defenses.values()))
    if isinstance(defenses, Sequence) and not isinstance(defenses, str):
        return Chain(list(defenses))
    raise ConfigError(f"defense must be a mapping or list of defenses, got {defenses!r}")


def utility(true: Mapping[str, Tensor], defended: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """How much of the true gradient the defended one keeps, per trial (K,), in float64, over the
    flattened concatenation of all tensors t (true) and d (defended):
    cosine = <t, d> / (||t|| ||d||) (1 when both are zero, 0 when one is);
    relative_error = ||d - t|| / ||t|| (0 when both are zero, inf when only t is)."""
    if list(true) != list(defended):
        raise ValueError(f"utility needs the same parameters in the same order, got {list(true)} and "
                         f"{list(defended)}")
    t = torch.cat([g.flatten(1).double() for g in true.values()], dim=1)
    d = torch.cat([g.flatten(1).double() for g in defended.values()], dim=1)
    norm_t, norm_d = t.norm(dim=1), d.norm(dim=1)
    error = (d - t).norm(dim=1)
    zero_t, zero_d = norm_t == 0, norm_d == 0
    cosine = (t * d).sum(dim=1) / torch.where(zero_t | zero_d, 1.0, norm_t * norm_d)
    cosine = torch.where(zero_t & zero_d, 1.0, cosine)
    relative = error / torch.where(zero_t, 1.0, norm_t)
    relative = torch.where(zero_t & (error > 0), math.inf, relative)
    return {"cosine": cosine, "relative_error": relative}


# ---- helpers ----

def _check_trials(gradients: Mapping[str, Tensor], seeds: Sequence[int], per_sample: bool) -> None:
    """Every tensor has the same K = len(seeds) leading trials (and, per sample, the same B)."""
    lead = 2 if per_sample else 1
    shapes = {tuple(g.shape[:lead]) for g in gradients.values() if g.dim() >= lead}
    if len(shapes) != 1 or any(g.dim() < lead for g in gradients.values()):
        axes = "(K, B, *shape)" if per_sample else "(K, *shape)"
        raise ValueError(f"gradients must all be {axes} with the same leading axes, got "
                         f"{ {name: tuple(g.shape) for name, g in gradients.items()} }")
    trials = next(iter(shapes))[0]
    if len(seeds) != trials:
        raise ValueError(f"one seed per trial: {trials} trials, {len(seeds)} seeds")


def _number(key: str, value, valid: str, ok: Callable[[float], bool]) -> float:
    """`value` as a float if it is a real number with ok(value) (NaN never is), else a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(float(value)):
        raise ConfigError(f"{key} must be {valid}, got {value!r}")
    return float(value)


def _scope(key: str, scope: str) -> str:
    if scope not in SCOPES:
        raise ConfigError(f"{key}={scope!r} is not known; valid: {', '.join(SCOPES)}")
    return scope


def _decimal(share: float) -> Fraction:
    """The share as the decimal it was written as: in binary 0.1 * 30 is 3.0000000000000004, whose ceil
    would keep 4 entries instead of 3."""
    return Fraction(repr(share))


def _part_seed(seed: int, part: int) -> int:
    """A 63-bit seed for part `part` of a chain from the trial's seed: independent of the other parts."""
    digest = hashlib.blake2b(f"{seed}/{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _draw_dtype(dtype: torch.dtype) -> torch.dtype:
    """Noise is drawn in float64 for float64 gradients, else in float32 (then cast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _add_noise(gradients: Gradients, seeds: list[int],
               draw: Callable[[torch.Size, torch.dtype, torch.Generator], Tensor]) -> Gradients:
    """g + noise, trial k's noise drawn on the CPU from Generator(seeds[k]), parameters in dict order.
    One trial's noise at a time, so the CPU holds at most one trial's worth."""
    noisy = {name: g.clone() for name, g in gradients.items()}
    for k, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        for name, g in gradients.items():
            noise = draw(g.shape[1:], _draw_dtype(g.dtype), generator)
            noisy[name][k] += noise.to(g.device, g.dtype)
    return noisy


def _norms(gradients: Gradients, sample_dims: int) -> Tensor:
    """L2 norm over all tensors together of each (K,) trial or (K, B) sample, in float32 or wider."""
    squares = [torch.linalg.vector_norm(g.flatten(sample_dims), dim=-1,
                                        dtype=torch.promote_types(g.dtype, torch.float32)) ** 2
               for g in gradients.values()]
    return torch.stack(squares).sum(dim=0).sqrt()


def _per_row(factor: Tensor, g: Tensor) -> Tensor:
    """factor (K,) or (K, B) shaped to broadcast over g's remaining axes, in g's dtype."""
    return factor.to(g.dtype).reshape(*factor.shape, *([1] * (g.dim() - factor.dim())))


def _zero_lowest(gradients: Gradients, scope: str, count: Callable[[int], int]) -> Gradients:
    """Zero the count(n) lowest-ranked entries of each trial, ranked by (|g|, index) ascending, over each
    tensor (n = its size) or over all tensors of the trial together ("global")."""
    if scope == "tensor":
        return {name: _zero_lowest_flat(g.flatten(1), count(g[0].numel())).reshape(g.shape)
                for name, g in gradients.items()}
    flat = torch.cat([g.flatten(1) for g in gradients.values()], dim=1)
    flat = _zero_lowest_flat(flat, count(flat.shape[1]))
    sizes = [g[0].numel() for g in gradients.values()]
    return {name: part.reshape(g.shape).to(g.dtype)
            for (name, g), part in zip(gradients.items(), flat.split(sizes, dim=1))}


def _zero_lowest_flat(flat: Tensor, count: int) -> Tensor:
    """(K, n) with the `count` lowest (|g|, index) entries of each row set to 0. A stable sort, not topk
    (whose order of ties is unspecified) and not a threshold (which would take every tie)."""
    if count <= 0:
        return flat
    lowest = flat.abs().argsort(dim=1, stable=True)[:, :count]
    return flat.scatter(1, lowest, 0.0)


def _int8(g: Tensor) -> Tensor:
    if g.numel() == 0:
        return g
    scale = g.abs().flatten(1).amax(dim=1) / 127                                # (K,)
    scale = _per_row(torch.where(scale > 0, scale, torch.ones_like(scale)), g)  # all zero: q = 0 anyway
    return torch.round(g / scale).clamp(-127, 127) * scale
