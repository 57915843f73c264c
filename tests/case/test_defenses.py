"""Client-side defenses (lightning_idlg.case.defense) do what their docstrings say, in numbers.

Every option of configs/defense instantiates and keeps shapes and dtypes; the noise has the set variance
(and Laplace its kurtosis of 6); trials are independent and reproducible from their seeds; pruning,
top-k, clipping, int8 and fp16 give exactly the entries they should; DP-SGD matches a hand computation
and its epsilon Opacus's accountant; utility() matches hand-computed values; bad settings fail with one
line naming the key.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lightning_idlg.case.defense import (DPSGD, Chain, Defense, GaussianNoise, Half, Int8, LaplaceNoise, NoDefense,
                                     NormClip, Prune, TopK, compose, utility)
from lightning_idlg.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OPTIONS = sorted(path.stem for path in (CONFIGS / "defense").glob("*.yaml"))
SHAPES = {"conv.weight": (4, 2, 3, 3), "conv.bias": (4,), "fc.weight": (5, 6), "fc.bias": (5,)}
ENTRIES = 200_000  # noise statistics: the sample variance is within ~0.5% (Laplace) of the true one


def gradients(trials: int = 3, dtype: torch.dtype = torch.float32, samples: int | None = None,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """A small gradient dict, name -> (K, *shape), or (K, B, *shape) per sample."""
    gen = torch.Generator().manual_seed(seed)
    lead = (trials,) if samples is None else (trials, samples)
    return {name: torch.randn(*lead, *shape, generator=gen).to(dtype) for name, shape in SHAPES.items()}


def one_trial(g: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    return {name: t[k:k + 1] for name, t in g.items()}


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[name], b[name]) for name in a)


def flat(g: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten(1) for t in g.values()], dim=1)


def load(option: str) -> Chain:
    return compose(instantiate(OmegaConf.load(CONFIGS / "defense" / f"{option}.yaml")))


# ---- configs ----

def test_the_group_has_every_defense():
    assert OPTIONS == ["clip", "dpsgd", "fp16", "gaussian", "int8", "laplace", "none", "prune", "topk"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_instantiates_and_keeps_shapes_and_dtypes(option, dtype):
    defense = load(option)
    assert isinstance(defense, Chain) and defense.describe()["name"] == option
    g = gradients(dtype=dtype, samples=4 if defense.per_sample else None)
    before = {name: t.clone() for name, t in g.items()}
    out = defense(g, [0, 1, 2])
    assert equal(g, before)  # pure: the input is not modified
    assert list(out) == list(SHAPES)
    for name, shape in SHAPES.items():
        assert out[name].shape == (3, *shape) and out[name].dtype == dtype
    if option == "none":
        assert equal(out, g)
    else:
        assert not equal(out, {name: t[:, 0] if defense.per_sample else t for name, t in g.items()})


def test_options_compose_as_an_ordered_list_with_overrides():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = hydra_compose(config_name=None, overrides=["+defense=[clip,gaussian]", "defense.gaussian.variance=1e-2"])
        none = hydra_compose(config_name=None, overrides=["+defense=none"])
    assert list(cfg.defense) == ["clip", "gaussian"]
    chain = compose(instantiate(cfg.defense))
    assert chain.describe() == {"name": "clip+gaussian", "parts": [{"name": "clip", "max_norm": 1.0},
                                                                   {"name": "gaussian", "variance": 0.01}]}
    assert [type(part) for part in chain.parts] == [NormClip, GaussianNoise]
    empty = compose(instantiate(none.defense))
    assert empty.parts == [] and empty.describe() == {"name": "none", "parts": []}


def test_defaults():
    assert load("gaussian").parts[0].variance == load("laplace").parts[0].variance == 1e-3
    assert load("clip").parts[0].max_norm == 1.0
    dp = load("dpsgd").parts[0]
    assert (dp.max_grad_norm, dp.noise_multiplier, dp.reduction, dp.sample_rate, dp.rounds, dp.delta) == \
        (1.0, 1.0, "mean", 0.01, 1, 1e-5)
    assert (load("prune").parts[0].ratio, load("prune").parts[0].scope) == (0.2, "tensor")
    assert (load("topk").parts[0].keep, load("topk").parts[0].scope) == (0.1, "global")


# ---- noise ----

def noise_of(defense: Defense, seed: int = 7) -> torch.Tensor:
    base = torch.linspace(-1, 1, ENTRIES).reshape(1, ENTRIES)
    return (defense({"w": base}, [seed])["w"] - base).double().flatten()


@pytest.mark.parametrize("variance", [1e-4, 1e-2])
def test_gaussian_and_laplace_have_the_set_variance_and_their_kurtosis(variance):
    for cls, kurtosis in ((GaussianNoise, 3.0), (LaplaceNoise, 6.0)):
        n = noise_of(cls(variance))
        assert abs(n.var().item() / variance - 1) < 0.03
        assert abs(n.mean().item()) < 5 * math.sqrt(variance / ENTRIES)
        centred = n - n.mean()
        assert abs((centred ** 4).mean().item() / centred.var().item() ** 2 - kurtosis) < 0.4


def test_zero_variance_is_the_identity():
    g = gradients()
    assert equal(GaussianNoise(0)(g, [0, 1, 2]), g) and equal(LaplaceNoise(0.0)(g, [0, 1, 2]), g)


def test_noise_is_drawn_in_the_gradients_dtype():
    g = gradients(dtype=torch.float16)
    out = GaussianNoise(1e-2)(g, [0, 1, 2])
    assert all(out[name].dtype == torch.float16 for name in g)
    g64 = {"w": torch.zeros(1, ENTRIES, dtype=torch.float64)}
    n = GaussianNoise(1e-2)(g64, [3])["w"]
    assert n.dtype == torch.float64 and abs(n.var().item() / 1e-2 - 1) < 0.03


# ---- trials: independent and reproducible ----

ALL = [NoDefense(), GaussianNoise(1e-2), LaplaceNoise(1e-2), NormClip(0.5), Prune(0.3), Prune(0.3, "global"),
       TopK(0.2), TopK(0.2, "tensor"), Half(), Int8(), compose([NormClip(1.0), LaplaceNoise(1e-3), Int8()]),
       DPSGD(1.0, 1.0), compose([DPSGD(0.5, 0.7, "sum"), GaussianNoise(1e-3)])]


@pytest.mark.parametrize("defense", ALL, ids=repr)
def test_trials_together_equal_each_trial_alone(defense):
    g = gradients(samples=4 if defense.per_sample else None)
    seeds = [11, 12, 13]
    together = defense(g, seeds)
    for k, seed in enumerate(seeds):
        alone = defense(one_trial(g, k), [seed])
        assert equal(one_trial(together, k), alone)


@pytest.mark.parametrize("defense", [GaussianNoise(1e-2), LaplaceNoise(1e-2), DPSGD(1.0, 1.0),
                                     compose([NormClip(1.0), GaussianNoise(1e-2)])], ids=repr)
def test_same_seed_same_noise_other_seed_other_noise_global_rng_untouched(defense):
    g = gradients(trials=1, samples=4 if defense.per_sample else None)
    g = {name: t.expand(3, *t.shape[1:]).clone() for name, t in g.items()}  # three copies of one gradient
    state = torch.get_rng_state()
    first, again, other = defense(g, [5, 5, 6]), defense(g, [5, 5, 6]), defense(g, [6, 5, 5])
    assert torch.equal(torch.get_rng_state(), state)
    assert equal(first, again)
    assert equal(one_trial(first, 0), one_trial(first, 1))   # same seed -> same output
    assert equal(one_trial(first, 2), one_trial(other, 0))   # seed 6, wherever it sits
    assert not equal(one_trial(first, 0), one_trial(other, 0))


def test_a_chain_of_one_is_that_defense_and_two_noises_draw_apart():
    g = {"w": torch.zeros(1, 1000)}
    alone = GaussianNoise(1e-2)(g, [3])
    assert equal(compose([GaussianNoise(1e-2)])(g, [3]), alone)
    twice = compose({"a": GaussianNoise(1e-2), "b": GaussianNoise(1e-2)})(g, [3])["w"]
    # a second part with the same seed would double the first noise (variance 4x); drawn apart, 2x
    assert not torch.allclose(twice, 2 * alone["w"])
    assert abs(twice.var().item() / 2e-2 - 1) < 0.2


# ---- prune, top-k ----

def test_prune_zeroes_exactly_the_smallest_share():
    g = {"w": torch.randn(2, 7, 11, generator=torch.Generator().manual_seed(1))}  # n = 77, distinct values
    for ratio in (0.05, 0.2, 0.5, 0.9):
        out = Prune(ratio)(g, [0, 1])["w"].flatten(1)
        for k in range(2):
            row, kept = g["w"][k].flatten(), out[k]
            zero = kept == 0
            assert zero.sum().item() == round(ratio * 77)
            assert torch.equal(kept[~zero], row[~zero])
            assert row[zero].abs().max() < row[~zero].abs().min()


def test_prune_breaks_ties_by_index_and_rounds_the_decimal_share():
    g = {"w": torch.tensor([[2.0, -1.0, 1.0, 1.0, -1.0, 3.0]])}
    assert Prune(0.5)(g, [0])["w"].tolist() == [[2.0, 0.0, 0.0, 0.0, -1.0, 3.0]]  # 3 of four 1s: lowest index
    assert (Prune(0.5)({"w": torch.ones(1, 5)}, [0])["w"] == 0).sum() == 2       # round(2.5) = 2 (to even)
    # 0.07 * 100 is 7.000000000000001 in binary: the share is the decimal written, 7 entries
    assert (Prune(0.07)({"w": torch.arange(1.0, 101).unsqueeze(0)}, [0])["w"] == 0).sum() == 7


def test_prune_global_and_per_tensor_differ():
    g = {"small": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "large": torch.tensor([[100.0, 200.0, 300.0, 400.0]])}
    tensor = Prune(0.5, "tensor")(g, [0])
    assert tensor["small"].tolist() == [[0, 0, 3, 4]] and tensor["large"].tolist() == [[0, 0, 300, 400]]
    glob = Prune(0.5, "global")(g, [0])
    assert glob["small"].tolist() == [[0, 0, 0, 0]] and glob["large"].tolist() == [[100, 200, 300, 400]]


def test_prune_ratio_zero_is_the_identity_and_one_zeroes_everything():
    g = gradients()
    assert equal(Prune(0)(g, [0, 1, 2]), g)
    for scope in ("tensor", "global"):
        assert all((t == 0).all() for t in Prune(1, scope)(g, [0, 1, 2]).values())


def test_topk_keeps_exactly_the_largest_share():
    g = gradients()
    n = sum(math.prod(shape) for shape in SHAPES.values())  # 72 + 4 + 30 + 5 = 111
    for keep in (0.01, 0.1, 0.25, 1.0):
        out, before = flat(TopK(keep)(g, [0, 1, 2])), flat(g)
        for k in range(3):
            nonzero = out[k] != 0
            assert nonzero.sum().item() == math.ceil(keep * n)
            assert torch.equal(out[k][nonzero], before[k][nonzero])
            if keep < 1:
                assert before[k][~nonzero].abs().max() < before[k][nonzero].abs().min()
    assert (TopK(0.07)({"w": torch.arange(1.0, 101).unsqueeze(0)}, [0])["w"] != 0).sum() == 7
    assert all((t == 0).all() for t in TopK(0)(g, [0, 1, 2]).values())
    per_tensor = TopK(0.1, "tensor")(g, [0, 1, 2])
    assert (per_tensor["conv.bias"] != 0).sum(dim=1).tolist() == [1, 1, 1]  # ceil(0.4) per tensor


def test_topk_and_prune_zero_the_same_entries_for_the_same_count():
    g = {"w": torch.tensor([[1.0, -1.0, 2.0, 1.0, 0.5, -2.0, 1.0, 3.0]])}
    assert torch.equal(TopK(0.5)(g, [0])["w"], Prune(0.5)(g, [0])["w"])


# ---- clip, int8, fp16 ----

def test_norm_clip_caps_the_global_norm_and_keeps_the_direction():
    g = gradients()
    g = {name: t * torch.tensor([0.01, 1.0, 10.0]).reshape(3, *[1] * (t.dim() - 1)) for name, t in g.items()}
    g = {name: torch.cat([t, torch.zeros_like(t[:1])]) for name, t in g.items()}  # a zero gradient: kept
    before = flat(g).norm(dim=1)
    out = NormClip(2.0)(g, [0, 1, 2, 3])
    after = flat(out).norm(dim=1)
    assert before[0] < 2 < before[1]
    torch.testing.assert_close(after, before.clamp(max=2.0), rtol=1e-6, atol=0)
    assert equal(one_trial(out, 0), one_trial(g, 0))
    assert torch.allclose(utility(g, out)["cosine"], torch.ones(4, dtype=torch.float64), atol=1e-6)


def test_int8_error_is_at_most_half_a_step_and_representable_values_survive():
    g = gradients()
    g["fc.weight"] = g["fc.weight"] * torch.tensor([1e-3, 1.0, 1e3]).reshape(3, 1, 1)  # a scale per trial
    out = Int8()(g, [0, 1, 2])
    for name, t in g.items():
        scale = t.abs().flatten(1).amax(dim=1) / 127
        error = (out[name] - t).abs().flatten(1)
        assert (error <= scale.unsqueeze(1) / 2 * (1 + 1e-6)).all()
        levels = out[name].flatten(1) / scale.unsqueeze(1)
        assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the grid
    exact = {"w": torch.arange(-127.0, 128).reshape(1, -1) / 16}  # scale 1/16: every entry is on the grid
    assert torch.equal(Int8()(exact, [0])["w"], exact["w"])
    zero = {"w": torch.zeros(2, 5)}
    assert torch.equal(Int8()(zero, [0, 1])["w"], zero["w"])


def test_fp16_rounds_to_half_precision():
    g = gradients()
    g["fc.bias"] = g["fc.bias"] * 1e-6
    out = Half()(g, [0, 1, 2])
    assert all(torch.equal(out[name], t.half().float()) for name, t in g.items())
    assert not equal(out, g)
    g64 = gradients(dtype=torch.float64)
    assert torch.equal(Half()(g64, [0, 1, 2])["fc.weight"], g64["fc.weight"].half().double())


# ---- DP-SGD ----

def test_dpsgd_without_noise_is_the_mean_of_per_sample_clipped_gradients():
    g = gradients(trials=2, samples=5)
    g = {name: t * torch.tensor([0.05, 0.2, 1.0, 3.0, 10.0]).reshape(1, 5, *[1] * (t.dim() - 2))
         for name, t in g.items()}
    expected = {name: torch.zeros(2, *shape) for name, shape in SHAPES.items()}
    clipped = 0
    for k in range(2):
        for i in range(5):
            norm = math.sqrt(sum((t[k, i].double() ** 2).sum().item() for t in g.values()))
            factor = min(1.0, 1.5 / norm)
            clipped += factor < 1
            for name, t in g.items():
                expected[name][k] += t[k, i] * factor / 5
    assert 0 < clipped < 10
    out = DPSGD(max_grad_norm=1.5, noise_multiplier=0.0)(g, [0, 1])
    for name in SHAPES:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-7)
    summed = DPSGD(1.5, 0.0, reduction="sum")(g, [0, 1])
    torch.testing.assert_close(summed["fc.weight"], expected["fc.weight"] * 5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction, batch", [("mean", 4), ("sum", 4), ("mean", 1)])
def test_dpsgd_noise_std_is_sigma_c_over_b(reduction, batch):
    g = {"w": torch.zeros(1, batch, ENTRIES)}
    out = DPSGD(max_grad_norm=2.0, noise_multiplier=0.5, reduction=reduction)(g, [9])["w"]
    std = 0.5 * 2.0 / (batch if reduction == "mean" else 1)
    assert out.shape == (1, ENTRIES)
    assert abs(out.double().std().item() / std - 1) < 0.015
    assert abs(out.double().mean().item()) < 5 * std / math.sqrt(ENTRIES)


@pytest.mark.filterwarnings("ignore:Optimal order")
def test_dpsgd_epsilon_is_opacus_rdp_accountant():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.01, 1000)]
    expected = accountant.get_epsilon(delta=1e-5)
    dp = DPSGD(1.0, 1.0, sample_rate=0.01, rounds=1000, delta=1e-5)
    assert dp.epsilon() == pytest.approx(expected, rel=1e-12)
    assert 1.5 < dp.epsilon() < 3.0  # ~2.1: the known value for sigma 1, q 0.01, 1000 steps, delta 1e-5
    assert DPSGD(1.0, 1.0, sample_rate=0.01, rounds=2000).epsilon() > dp.epsilon()
    assert DPSGD(1.0, 2.0, sample_rate=0.01, rounds=1000).epsilon() < dp.epsilon()
    assert DPSGD(1.0, 1.0, sample_rate=0.01, rounds=1000, delta=1e-3).epsilon() < dp.epsilon()
    described = dp.describe()
    assert described["name"] == "dpsgd" and described["epsilon"] == dp.epsilon() and described["rounds"] == 1000
    assert math.isinf(DPSGD(1.0, 0.0).epsilon()) and DPSGD(1.0, 0.0).describe()["epsilon"] is None


def test_only_the_first_part_of_a_chain_may_take_per_sample_gradients():
    assert compose([DPSGD(1.0, 1.0), Half()]).per_sample
    assert not compose([Half(), NormClip(1.0)]).per_sample and not compose(None).per_sample
    with pytest.raises(ConfigError, match="dpsgd takes per-sample gradients, so it must come first"):
        compose({"clip": NormClip(1.0), "dpsgd": DPSGD(1.0, 1.0)})


# ---- utility ----

def test_utility_of_the_identity_and_of_a_two_entry_example():
    g = gradients()
    same = utility(g, NoDefense()(g, [0, 1, 2]))
    assert torch.allclose(same["cosine"], torch.ones(3, dtype=torch.float64))
    assert torch.equal(same["relative_error"], torch.zeros(3, dtype=torch.float64))
    true = {"a": torch.tensor([[3.0], [3.0], [0.0], [0.0]]), "b": torch.tensor([[4.0], [4.0], [0.0], [0.0]])}
    defended = {"a": torch.tensor([[4.0], [-3.0], [0.0], [1.0]]), "b": torch.tensor([[3.0], [4.0], [0.0], [0.0]])}
    u = utility(true, defended)
    # t = (3, 4): d = (4, 3) -> cos 24/25, |(1, -1)|/5; d = (-3, 4) -> cos 7/25, |(-6, 0)|/5; zero cases
    torch.testing.assert_close(u["cosine"], torch.tensor([24 / 25, 7 / 25, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(u["relative_error"],
                               torch.tensor([math.sqrt(2) / 5, 6 / 5, 0.0, math.inf], dtype=torch.float64))


# ---- bad settings ----

@pytest.mark.parametrize("make, key", [
    (lambda: GaussianNoise(-1e-3), "defense.gaussian.variance must be a number >= 0"),
    (lambda: LaplaceNoise(float("nan")), "defense.laplace.variance must be a number >= 0"),
    (lambda: GaussianNoise("big"), "defense.gaussian.variance"),
    (lambda: NormClip(0), "defense.clip.max_norm must be a number > 0"),
    (lambda: Prune(1.5), "defense.prune.ratio must be a number in [0, 1]"),
    (lambda: Prune(0.2, scope="layer"), "defense.prune.scope='layer' is not known; valid: tensor, global"),
    (lambda: TopK(-0.1), "defense.topk.keep must be a number in [0, 1]"),
    (lambda: TopK(0.1, scope="all"), "defense.topk.scope='all' is not known; valid: tensor, global"),
    (lambda: DPSGD(0.0, 1.0), "defense.dpsgd.max_grad_norm must be a number > 0"),
    (lambda: DPSGD(1.0, -1.0), "defense.dpsgd.noise_multiplier must be a number >= 0"),
    (lambda: DPSGD(1.0, 1.0, reduction="max"), "defense.dpsgd.reduction='max' is not known; valid: mean, sum"),
    (lambda: DPSGD(1.0, 1.0, sample_rate=0), "defense.dpsgd.sample_rate must be a number in (0, 1]"),
    (lambda: DPSGD(1.0, 1.0, rounds=0), "defense.dpsgd.rounds must be a positive integer"),
    (lambda: DPSGD(1.0, 1.0, rounds=2.5), "defense.dpsgd.rounds must be a positive integer"),
    (lambda: DPSGD(1.0, 1.0, delta=1.0), "defense.dpsgd.delta must be a number in (0, 1)"),
    (lambda: compose([NormClip(1.0), "gaussian"]), "is not a defense; valid: the options of configs/defense"),
])
def test_bad_settings_fail_with_one_line_naming_the_key(make, key):
    with pytest.raises(ConfigError) as err:
        make()
    message = str(err.value)
    assert key in message and "\n" not in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("defense", ALL, ids=repr)
def test_on_cuda_device_and_dtype_are_kept_and_noise_is_the_cpu_draw(defense):
    g = gradients(samples=4 if defense.per_sample else None)
    on_cpu = defense(g, [11, 12, 13])
    on_gpu = defense({name: t.cuda() for name, t in g.items()}, [11, 12, 13])
    for name in SHAPES:
        assert on_gpu[name].device.type == "cuda" and on_gpu[name].dtype == torch.float32
        # the noise is drawn on the CPU either way; only reductions (norms, sums) may round differently
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-5, atol=1e-6)


def test_a_seed_per_trial_is_required():
    with pytest.raises(ValueError, match="one seed per trial: 3 trials, 2 seeds"):
        GaussianNoise(1e-3)(gradients(), [0, 1])
