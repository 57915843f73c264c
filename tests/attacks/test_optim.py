"""BatchedLBFGS / BatchedAdam against torch.optim, and the independence of the K trials.

Comparisons with torch.optim run in float64: L-BFGS with lr=1 and no line search amplifies the last-bit
differences of a different summation order (torch: dot and add_(alpha=t); here: (a*b).sum(1) and a
separate multiply), so float32 trajectories drift apart to ~1e-4 relative on well-behaved problems
although every step is the same. In float64 the same trajectories agree to ~1e-8 (Rosenbrock) and ~1e-11
(iDLG), so the tolerance below (1e-6 relative to the largest parameter) still catches any real
difference in the algorithm (those show up as O(1)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_idlg.case.client import PrivateBatch, share_gradient, stack_victims
from lightning_idlg.attacks.objective import BatchedDistance
from lightning_idlg.attacks.optimizer import BatchedAdam, BatchedLBFGS
from lightning_idlg.case.model import LeNet, make_victim

DT = torch.float64
MAX_ITER = 20
RTOL = 1e-6  # relative to the largest |parameter| of the reference (at least 1)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> bool:
    return bool(((a - b).abs().max() <= rtol * b.abs().max().clamp(min=1.0)).item())


# --- reference runs --------------------------------------------------------------------------------


def run_torch_lbfgs(f, x0: torch.Tensor, steps: int, line_search_fn: str | None = None):
    """torch.optim.LBFGS(lr=1, max_iter=20, history_size=100), no line search. Per step: the point
    after it, the closure evaluations, whether its final point was left unevaluated (the step ended on
    max_iter after a move), and the loss it returns (the loss at the start of the step)."""
    x = x0.clone().requires_grad_()
    opt = torch.optim.LBFGS([x], lr=1, max_iter=MAX_ITER, history_size=100, line_search_fn=line_search_fn)
    evaluated: list[torch.Tensor] = []

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        evaluated.append(x.detach().clone())
        return loss

    points, evals, unevaluated_end, returned = [], [], [], []
    for _ in range(steps):
        before = len(evaluated)
        returned.append(float(opt.step(closure).detach()))
        evals.append(len(evaluated) - before)
        unevaluated_end.append(not torch.equal(evaluated[-1], x.detach()))
        points.append(x.detach().clone())
    return points, evals, unevaluated_end, returned


class Batched:
    """BatchedLBFGS/BatchedAdam over K rows, trial k with its own function fs[k] (row -> scalar).
    The closure follows the optim.py contract and logs which rows it was asked to evaluate."""

    def __init__(self, opt_cls, fs, x0: torch.Tensor, **kw):
        self.fs = fs
        self.x = x0.clone().requires_grad_()
        self.opt = opt_cls([self.x], **kw)
        self.asked: list[torch.Tensor] = []

    def closure(self) -> torch.Tensor:
        self.x.grad = None
        mask = self.opt.evaluating.clone()
        self.asked.append(mask)
        rows = mask.nonzero().flatten().tolist()
        out = torch.full((len(self.fs),), 12345.0, dtype=self.x.dtype)  # ignored entries
        if rows:
            losses = torch.stack([self.fs[k](self.x[k]) for k in rows])
            losses.sum().backward()
            out[rows] = losses.detach()
        return out

    def step(self):
        before = self.opt.evaluations.clone()
        loss = self.opt.step(self.closure).clone()
        return self.x.detach().clone(), (self.opt.evaluations - before).tolist(), loss


def run_batched(opt_cls, fs, x0, steps, **kw):
    b = Batched(opt_cls, fs, x0, **kw)
    points, evals, losses = [], [], []
    for _ in range(steps):
        p, e, l = b.step()
        points.append(p)
        evals.append(e)
        losses.append(l)
    return points, evals, losses


# --- test functions --------------------------------------------------------------------------------


def rosenbrock(a: float = 100.0):
    def f(x):
        x = x.flatten()
        return (a * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()
    return f


def quadratic(eigenvalues, seed: int):
    """0.5 (x - c)^T A (x - c) with A = Q diag(eigenvalues) Q^T, random rotation Q and centre c."""
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    a = q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T
    c = torch.randn(n, generator=g, dtype=DT)

    def f(x):
        d = x.flatten() - c
        return 0.5 * d @ a @ d
    f.centre = c
    return f


def x_start(k: int, n: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(k, 1, n, generator=g, dtype=DT) - 0.5


def expected_batched_evals(torch_evals, unevaluated_end):
    """BatchedLBFGS's count per step, derived from torch's: torch evaluates the start point of every step
    (1) plus each point it moves to (e - 1); BatchedLBFGS evaluates the start point only on the first
    step (later steps start where the previous one evaluated), and evaluates a step's final point once
    at its end when torch left it unevaluated (max_iter reached after a move)."""
    return [(1 if s == 0 else 0) + (e - 1) + int(u) for s, (e, u) in enumerate(zip(torch_evals, unevaluated_end))]


# --- BatchedLBFGS, K = 1, against torch.optim.LBFGS ----------------------------------------------------


def test_lbfgs_k1_matches_torch_on_rosenbrock():
    f = rosenbrock(100.0)
    x0 = x_start(1)
    t_points, t_evals, t_open, t_returned = run_torch_lbfgs(f, x0[0], steps=10)
    b_points, b_evals, b_losses = run_batched(BatchedLBFGS, [f], x0, steps=10, lr=1, max_iter=MAX_ITER,
                                              history_size=100)
    for s, (tp, bp) in enumerate(zip(t_points, b_points)):
        assert close(bp[0], tp), f"step {s}: {(bp[0] - tp).abs().max().item():.3g}"
    # the scenario exercises both regimes: steps cut by max_iter, then an early stop, then converged
    assert t_evals == [20, 20, 12, 1, 1, 1, 1, 1, 1, 1]
    assert t_open == [True, True] + [False] * 8
    assert [e[0] for e in b_evals] == expected_batched_evals(t_evals, t_open) == [21, 20, 11] + [0] * 7
    assert sum(t_evals) == 59 and sum(e[0] for e in b_evals) == 52
    # it converged to the minimum (1, ..., 1) in both
    assert close(b_points[-1][0], torch.ones(1, 8), rtol=1e-4)
    # step returns the loss at the point it ends on; torch returns the loss at the point it starts from
    for s in range(9):
        assert math.isclose(float(b_losses[s][0]), t_returned[s + 1], rel_tol=1e-6, abs_tol=1e-12)
    assert math.isclose(float(b_losses[-1][0]), float(f(t_points[-1])), rel_tol=1e-6, abs_tol=1e-12)


def _tiny_idlg(seed: int):
    """The real iDLG objective on a tiny LeNet (1x8x8 input, 10 classes), paper init, one trial."""
    net = make_victim(LeNet, in_channels=1, image_size=8, num_classes=10, seed=seed).to(DT)
    weights, _ = stack_victims([net])
    g = torch.Generator().manual_seed(100 + seed)
    image = torch.rand(1, 1, 8, 8, generator=g, dtype=DT)
    label = torch.randint(10, (1,), generator=g)
    shared = share_gradient(net, weights, PrivateBatch(image[:, None], label[:, None]), 10)
    distance = BatchedDistance(net)
    one_hot = F.one_hot(label, 10).to(DT)

    def objective(x):  # one trial's dummy (1, 8, 8) or (1, 1, 8, 8) -> D
        return distance(weights, shared.gradients, x.reshape(1, 1, 1, 8, 8), one_hot[:, None]).sum()

    dummy = torch.randn(1, 1, 1, 8, 8, generator=g, dtype=DT)  # (K=1, 1, 1, 8, 8)
    return objective, dummy, image


def test_lbfgs_k1_matches_torch_on_idlg_objective():
    objective, dummy, image = _tiny_idlg(seed=0)
    t_points, t_evals, t_open, t_returned = run_torch_lbfgs(objective, dummy[0], steps=5)
    b_points, b_evals, b_losses = run_batched(BatchedLBFGS, [objective], dummy, steps=5, lr=1,
                                              max_iter=MAX_ITER, history_size=100)
    for s, (tp, bp) in enumerate(zip(t_points, b_points)):
        assert close(bp[0], tp), f"step {s}: {(bp[0] - tp).abs().max().item():.3g}"
    # both regimes (steps cut by max_iter, then early stops), without the step where the early stop
    # comes, which float64 rounding near the optimum may move by one on another CPU's kernels
    assert t_evals[:2] == [20, 20] and t_open[:2] == [True, True] and t_open[-1] is False
    assert [e[0] for e in b_evals] == expected_batched_evals(t_evals, t_open)
    for s in range(4):
        assert math.isclose(float(b_losses[s][0]), t_returned[s + 1], rel_tol=1e-6, abs_tol=1e-15)
    # and the attack worked: the dummy is the private image
    assert float(((b_points[-1][0] - image) ** 2).mean()) < 1e-6
    assert float(b_losses[-1][0]) < 1e-8


@pytest.mark.parametrize("problem", ["rosenbrock", "idlg"])
def test_lbfgs_strong_wolfe_k1_matches_torch(problem):
    """line_search_fn="strong_wolfe" (the `improved` variant): the same points, line-search evaluations and
    returned losses as torch.optim.LBFGS with its strong-Wolfe search."""
    if problem == "rosenbrock":
        f, x0, steps = rosenbrock(100.0), x_start(1), 6
    else:
        f, x0, _ = _tiny_idlg(seed=1)
        steps = 4
    t_points, t_evals, t_open, t_returned = run_torch_lbfgs(f, x0[0], steps, line_search_fn="strong_wolfe")
    b_points, b_evals, b_losses = run_batched(BatchedLBFGS, [f], x0, steps, lr=1, max_iter=MAX_ITER,
                                              history_size=100, line_search_fn="strong_wolfe")
    for s, (tp, bp) in enumerate(zip(t_points, b_points)):
        assert close(bp[0], tp), f"step {s}: {(bp[0] - tp).abs().max().item():.3g}"
    assert not any(t_open)  # a line search always ends on an evaluated point
    assert [e[0] for e in b_evals] == expected_batched_evals(t_evals, t_open)
    assert t_evals[0] > MAX_ITER + 1  # line searches took more than one evaluation per iteration
    for s in range(steps - 1):
        assert math.isclose(float(b_losses[s][0]), t_returned[s + 1], rel_tol=1e-6, abs_tol=1e-12)


# --- K trials: no coupling ----------------------------------------------------------------------------


def _four_trials():
    return [
        quadratic([1.0, 2, 3, 5, 8, 13, 21, 34], seed=1),   # ill-conditioned: many iterations
        quadratic([1.0] * 8, seed=2),                       # isotropic: converges within the first step
        rosenbrock(100.0),                                  # non-quadratic: every step hits max_iter early on
        quadratic([0.1, 0.2, 0.5, 1, 2, 5, 10, 50], seed=3),
    ]


def _alone(fs, x0, steps, opt_cls=BatchedLBFGS, **kw):
    """Each trial run alone (K = 1)."""
    return [run_batched(opt_cls, [f], x0[k:k + 1], steps, **kw) for k, f in enumerate(fs)]


def test_lbfgs_batched_trials_equal_single_runs():
    fs, x0 = _four_trials(), x_start(4, seed=7)
    steps = 6
    b_points, b_evals, b_losses = run_batched(BatchedLBFGS, fs, x0, steps)
    alone = _alone(fs, x0, steps)
    for k in range(4):
        a_points, a_evals, a_losses = alone[k]
        for s in range(steps):
            assert close(b_points[s][k], a_points[s][0]), (k, s)
            assert math.isclose(float(b_losses[s][k]), float(a_losses[s][0]), rel_tol=1e-6, abs_tol=1e-12)
        assert [e[k] for e in b_evals] == [e[0] for e in a_evals], k
    # the trials really behave differently (otherwise nothing was tested)
    totals = [sum(e[k] for e in b_evals) for k in range(4)]
    assert len(set(totals)) >= 3, totals
    assert totals[1] < 21  # the isotropic trial stops within the first step
    assert b_evals[0][2] == 21  # the Rosenbrock trial runs the full first step
    assert close(b_points[-1][1], fs[1].centre.view(1, 8), rtol=1e-6)


def test_lbfgs_strong_wolfe_batched_trials_equal_single_runs():
    fs, x0 = _four_trials(), x_start(4, seed=7)
    kw = dict(line_search_fn="strong_wolfe")
    b_points, b_evals, b_losses = run_batched(BatchedLBFGS, fs, x0, 4, **kw)
    alone = _alone(fs, x0, 4, **kw)
    for k in range(4):
        a_points, a_evals, a_losses = alone[k]
        for s in range(4):
            assert close(b_points[s][k], a_points[s][0]), (k, s)
        assert [e[k] for e in b_evals] == [e[0] for e in a_evals], k
    assert len({sum(e[k] for e in b_evals) for k in range(4)}) >= 3


def test_lbfgs_frozen_trial_neither_moves_nor_is_evaluated_and_resumes_unchanged():
    fs, x0 = _four_trials(), x_start(4, seed=7)
    alone = _alone(fs, x0, 6)
    b = Batched(BatchedLBFGS, fs, x0)
    b.step()                                  # step 1: everyone
    frozen_at = b.x.detach().clone()[2]
    evals_at = int(b.opt.evaluations[2])
    b.opt.active[2] = False
    asked_before = len(b.asked)
    for _ in range(3):                        # steps 2-4: trial 2 frozen
        p, e, _ = b.step()
        assert torch.equal(p[2], frozen_at)
        assert e[2] == 0
    assert int(b.opt.evaluations[2]) == evals_at
    assert len(b.asked) > asked_before and not any(bool(m[2]) for m in b.asked[asked_before:])
    # the other trials went on exactly as alone
    for k in (0, 1, 3):
        assert close(p[k], alone[k][0][3][0]), k
    # unfrozen, trial 2 continues as if it had never paused (its own state untouched)
    b.opt.active[2] = True
    p, e, _ = b.step()
    assert close(p[2], alone[2][0][1][0])
    assert e[2] == alone[2][1][1][0] == 20
    assert not torch.equal(p[2], frozen_at)


def test_lbfgs_nan_in_one_trial_does_not_spread():
    fs, x0 = _four_trials(), x_start(4, seed=7)
    alone = _alone(fs, x0, 4)
    calls = {"n": 0}
    rosen = fs[2]

    def poisoned(x):  # turns NaN (value and gradient) from its 5th evaluation on
        calls["n"] += 1
        return rosen(x) * (float("nan") if calls["n"] >= 5 else 1.0)

    b_points, b_evals, b_losses = run_batched(BatchedLBFGS, [fs[0], fs[1], poisoned, fs[3]], x0, 4)
    assert calls["n"] >= 5 and torch.isnan(b_points[-1][2]).all()
    for k in (0, 1, 3):
        for s in range(4):
            assert torch.isfinite(b_points[s][k]).all()
            assert close(b_points[s][k], alone[k][0][s][0]), (k, s)
            assert math.isclose(float(b_losses[s][k]), float(alone[k][2][s][0]), rel_tol=1e-6, abs_tol=1e-12)
        assert [e[k] for e in b_evals] == [e[0] for e in alone[k][1]]


def test_lbfgs_rejects_unknown_line_search_and_parameters_without_trial_dim():
    with pytest.raises(ValueError, match="valid: null .*strong_wolfe"):
        BatchedLBFGS([torch.zeros(2, 3, requires_grad=True)], line_search_fn="backtracking")
    with pytest.raises(ValueError, match="trial dimension"):
        BatchedLBFGS([torch.zeros(2, 3, requires_grad=True), torch.zeros(3, 3, requires_grad=True)])


# --- BatchedAdam ---------------------------------------------------------------------------------------


def run_torch_adam(f, x0, steps, lr):
    x = x0.clone().requires_grad_()
    opt = torch.optim.Adam([x], lr=lr)

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    points, losses = [], []
    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
        points.append(x.detach().clone())
    return points, losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_matches_torch_per_trial(dtype):
    fs, x0 = _four_trials(), x_start(4, seed=7)
    lr, steps = 0.1, 20
    x0 = x0.to(dtype)
    fs32 = [(lambda x, f=f: f(x.to(DT)).to(dtype)) for f in fs]
    b_points, b_evals, b_losses = run_batched(BatchedAdam, fs32, x0, steps, lr=lr)
    assert all(e == [1, 1, 1, 1] for e in b_evals)
    for k in range(4):
        t_points, t_losses = run_torch_adam(fs32[k], x0[k], steps, lr)
        for s in range(steps):
            assert close(b_points[s][k], t_points[s], rtol=1e-5), (k, s)
            assert math.isclose(float(b_losses[s][k]), t_losses[s], rel_tol=1e-5)
        # 20 steps of lr 0.1 moved every coordinate (by up to ~2)
        assert float((b_points[-1][k] - x0[k]).abs().max()) > 0.5


def test_adam_frozen_trial_neither_moves_nor_ages():
    fs, x0 = _four_trials(), x_start(4, seed=7)
    alone = _alone(fs, x0, 10, BatchedAdam, lr=0.1)
    b = Batched(BatchedAdam, fs, x0, lr=0.1)
    for _ in range(3):
        b.step()
    b.opt.active[1] = False
    frozen_at = b.x.detach().clone()[1]
    asked_before = len(b.asked)
    for _ in range(4):
        p, e, _ = b.step()
        assert torch.equal(p[1], frozen_at) and e == [1, 0, 1, 1]
    assert len(b.asked) == asked_before + 4 and not any(bool(m[1]) for m in b.asked[asked_before:])
    assert int(b.opt.evaluations[1]) == 3 and float(b.opt.age[1]) == 3
    for k in (0, 2, 3):
        assert close(p[k], alone[k][0][6][0]), k
    b.opt.active[1] = True
    p, _, _ = b.step()
    assert close(p[1], alone[1][0][3][0])   # its 4th step, with its own bias correction
    assert not close(p[1], alone[1][0][6][0])


def test_lbfgs_trials_out_of_step_are_aligned_and_take_the_same_steps_bit_for_bit():
    """A trial that sat out steps falls behind the others in its history's ring buffer; the two-loop reads
    every trial's i-th newest pair from one slot, so one of the two is rotated to the other's position
    (its pairs moved, not changed): both take exactly the steps of their solo runs."""
    fs, x0 = [rosenbrock(100.0), rosenbrock(30.0), rosenbrock(100.0)], x_start(3, seed=7)
    alone = _alone(fs, x0, 4)
    b = Batched(BatchedLBFGS, fs, x0)
    b.step()
    b.opt.active[1] = False          # sits out two steps (every step of these runs all 20 iterations)
    b.step(), b.step()
    b.opt.active[1] = True
    assert int(b.opt.pos[1]) != int(b.opt.pos[0]) == int(b.opt.pos[2])  # out of step
    rotated, align = [], b.opt._align

    def spy(rows):
        before = b.opt.pos[rows].clone()
        clock = align(rows)
        rotated.append(bool((before != clock).any()))
        assert bool((b.opt.pos[rows] == clock).all())
        return clock

    b.opt._align = spy
    p, _, _ = b.step()
    assert rotated[0]  # the first iteration brought the trials in step
    assert torch.equal(p[1], alone[1][0][1][0])  # its second step, as alone, to the last bit
    assert torch.equal(p[0], alone[0][0][3][0]) and torch.equal(p[2], alone[2][0][3][0])
    p, _, _ = b.step()
    assert torch.equal(p[1], alone[1][0][2][0])
