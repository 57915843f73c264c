"""Optimizers over K independent trials stacked along dim 0 of every parameter.

One attack batch optimizes the dummies of K trials at once, but nothing may couple the trials: each has
its own curvature history, step length, convergence tests and evaluation count. torch.optim.LBFGS would
treat the K dummies as one vector (shared history, one step length), so it is re-written here with a
trial dimension; for K = 1 it takes the same steps as torch.optim.LBFGS (tests/attacks/test_optim.py).

Closure contract (the attack module provides it): `closure()` evaluates the objective for the trials in
`optimizer.evaluating` (bool (K,)), writes their gradient into `p.grad` and returns the per-trial
objective (K,) (entries of other trials are ignored). `optimizer.active` (bool (K,)) marks the trials
still being optimized; the caller clears entries to freeze converged or diverged trials, which then cost
no evaluation. `step` returns the objective of every active trial at its current point.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from lightning_idlg.attacks.line_search import strong_wolfe
from lightning_idlg.errors import ConfigError

# breaching's step-lr milestones: N // 2.667, N // 1.6, N // 1.142 of a budget of N steps
STEP_LR_DIVISORS = (2.667, 1.6, 1.142)


class _TrialOptimizer(torch.optim.Optimizer):
    """Shared plumbing: flat per-trial views of the parameters, the active mask, evaluation counts.
    measures_start: `step` returns the objective at the step's starting point (else at its end point)."""

    measures_start = False

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._params = [p for group in self.param_groups for p in group["params"]]
        self.trials = self._params[0].shape[0]
        if any(p.shape[0] != self.trials for p in self._params):
            raise ValueError("every parameter needs the trial dimension K first")
        device = self._params[0].device
        self.active = torch.ones(self.trials, dtype=torch.bool, device=device)
        self.evaluating = self.active.clone()
        self.evaluations = torch.zeros(self.trials, dtype=torch.long, device=device)

    def _flat_grad(self) -> torch.Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(self.trials, -1) for p in self._params
        ], dim=1)

    def _per_parameter(self, flat: torch.Tensor):
        """(parameter, its columns of the flat (K, N) tensor `flat` viewed in the parameter's shape)."""
        offset = 0
        for p in self._params:
            numel = p[0].numel()
            yield p, flat[:, offset:offset + numel].view_as(p)
            offset += numel

    def _add_step(self, step: torch.Tensor, mask: torch.Tensor) -> None:
        """x += step for trials in mask (torch.where, so a NaN in a frozen row never spreads)."""
        step = torch.where(mask[:, None], step, torch.zeros_like(step))
        with torch.no_grad():
            for p, part in self._per_parameter(step):
                p.add_(part)

    def _flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(self.trials, -1) for p in self._params], dim=1)

    def _set_params(self, flat: torch.Tensor, mask: torch.Tensor) -> None:
        """x = flat for the trials in mask (the others keep their values)."""
        with torch.no_grad():
            for p, part in self._per_parameter(flat):
                p.copy_(torch.where(mask.view(-1, *[1] * (p.dim() - 1)), part, p))

    def _evaluate(self, closure: Callable[[], torch.Tensor], mask: torch.Tensor):
        """Objective and flat gradient for the trials in mask (others: zeros, ignored)."""
        self.evaluating = mask
        with torch.enable_grad():
            loss = closure().detach()
        self.evaluations += mask.long()
        return loss, self._flat_grad()


class BatchedLBFGS(_TrialOptimizer):
    """torch.optim.LBFGS (no line search) run independently per trial.

    Defaults are PyTorch's, which the iDLG reference protocol uses with lr=1: max_iter 20 iterations per
    step, max_eval = max_iter * 5 / 4, history 100, tolerance_grad 1e-7, tolerance_change 1e-9.
    One difference that changes no trajectory: where the last evaluation of a step is already at the
    current point, it is reused by the next step instead of being computed again (torch re-evaluates).
    """

    def __init__(self, params, lr: float = 1.0, max_iter: int = 20, max_eval: int | None = None,
                 tolerance_grad: float = 1e-7, tolerance_change: float = 1e-9, history_size: int = 100,
                 line_search_fn: str | None = None):
        if line_search_fn not in (None, "strong_wolfe"):
            raise ConfigError(f"line_search_fn={line_search_fn!r} is not supported; valid: null (the paper), strong_wolfe")
        max_eval = max_eval if max_eval is not None else max_iter * 5 // 4
        super().__init__(params, dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                                      tolerance_change=tolerance_change, history_size=history_size,
                                      line_search_fn=line_search_fn))
        k, n = self.trials, sum(p[0].numel() for p in self._params)
        like = dict(device=self._params[0].device, dtype=self._params[0].dtype)
        h = history_size
        self.n_iter = torch.zeros(k, dtype=torch.long, device=like["device"])  # iterations since start
        self.d = torch.zeros(k, n, **like)           # search direction
        self.t = torch.zeros(k, **like)              # step length
        # (s, y) history, a ring buffer per trial; s and y of a pair side by side, so that one copy
        # fetches both (torch.optim.LBFGS: old_stps, old_dirs)
        self.pairs = torch.zeros(k, h, 2, n, **like)
        self.ro = torch.zeros(k, h, **like)          # 1 / (y . s); zero marks an empty slot
        self.count = torch.zeros(k, dtype=torch.long, device=like["device"])
        self.pos = torch.zeros(k, dtype=torch.long, device=like["device"])  # next slot to write
        self.h_diag = torch.ones(k, **like)
        self.prev_flat_grad = torch.zeros(k, n, **like)
        self.prev_loss = torch.zeros(k, **like)
        # objective and gradient at the current point, where known (reused by the next step)
        self.loss = torch.full((k,), float("nan"), **like)
        self.flat_grad = torch.zeros(k, n, **like)
        self.known = torch.zeros(k, dtype=torch.bool, device=like["device"])

    def _push_history(self, y: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> None:
        """Append (y, s) for trials in mask where y.s > 1e-10 (else torch skips the update)."""
        ys = (y * s).sum(1)
        update = mask & (ys > 1e-10)
        if not update.any():
            return
        rows = update.nonzero().squeeze(1)
        slot = self.pos[rows]
        self.pairs[rows, slot, 0] = s[rows]
        self.pairs[rows, slot, 1] = y[rows]
        self.ro[rows, slot] = 1.0 / ys[rows]
        self.h_diag[rows] = ys[rows] / (y[rows] * y[rows]).sum(1)
        self.count[rows] = torch.clamp(self.count[rows] + 1, max=self.pairs.shape[1])
        self.pos[rows] = (slot + 1) % self.pairs.shape[1]

    def _direction(self, flat_grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The L-BFGS two-loop recursion for the trials `rows`, newest to oldest pair, per trial: the same
        operations as torch.optim.LBFGS, so a trial's steps do not depend on the batch it runs in.

        The i-th newest pair of every trial sits in one slot (`_align`), so the loops read the history in
        place: a strided view of all the trials' s (or y) of that slot, whatever rows are being evaluated
        (the trials between them ride along and are dropped at the end) unless they are fewer than half of
        that span; and each dot is vecdot's product and sum (the same rounding) into buffers allocated
        once. Gathering each pair per trial instead (index_select of R x 2 x pixels, twice per pair) and
        allocating every product took 2.2 / 5.9 / 17.3 ms per direction at K = 1 / 8 / 32 (3x32x32, 100
        pairs, one thread), this 1.4 / 4.2 / 14.5 ms, the same bits. The loops stay a chain of small
        kernels: the compact form (two matmuls and two triangular solves) took 0.5 ms at K = 1 but
        rounds differently, and L-BFGS without a line search carries that into visibly different records.
        Empty slots have ro = 0 and add nothing, so a trial with fewer pairs than others simply adds zeros."""
        k, h, _, n = self.pairs.shape
        depth = int(self.count[rows].max())
        if depth == 0:
            return flat_grad[rows].neg() * self.h_diag[rows, None]
        clock = self._align(rows)
        lo, hi = int(rows[0]), int(rows[-1])
        if 2 * rows.numel() >= hi - lo + 1:  # a view of the trials lo..hi
            pairs, ro, h_diag, at = self.pairs[lo:hi + 1], self.ro[lo:hi + 1], self.h_diag[lo:hi + 1], rows - lo
            q = torch.zeros(hi - lo + 1, n, dtype=flat_grad.dtype, device=flat_grad.device)
            q[at] = flat_grad[rows].neg()
        else:  # few trials spread out: a copy of their rows
            pairs, ro, h_diag, at = self.pairs[rows], self.ro[rows], self.h_diag[rows], slice(None)
            q = flat_grad[rows].neg()
        # the loops' dots as vecdot computes them (a product, then its sum over the pixels: the same
        # rounding), into buffers allocated once; (R', 1) columns, ready to scale a row each
        slots = [(clock - 1 - i) % h for i in range(depth)]
        s_of, y_of = pairs[:, :, 0].unbind(1), pairs[:, :, 1].unbind(1)
        ro_of = ro[:, :, None].unbind(1)
        product = torch.empty_like(q)
        alphas = torch.empty(depth, q.shape[0], 1, dtype=q.dtype, device=q.device)
        be = torch.empty(q.shape[0], 1, dtype=q.dtype, device=q.device)
        for i, slot in enumerate(slots):
            torch.sum(torch.mul(s_of[slot], q, out=product), 1, keepdim=True, out=alphas[i])
            alphas[i].mul_(ro_of[slot])
            q.addcmul_(alphas[i], y_of[slot], value=-1)
        r = q.mul_(h_diag[:, None])
        for i in reversed(range(depth)):
            slot = slots[i]
            torch.sum(torch.mul(y_of[slot], r, out=product), 1, keepdim=True, out=be)
            r.addcmul_(torch.sub(alphas[i], be.mul_(ro_of[slot]), out=be), s_of[slot])
        return r[at]

    def _align(self, rows: torch.Tensor) -> int:
        """The ring position (next slot to write) of most of `rows`, the trials at another one rotated to it
        (their pairs moved, not changed: a trial's history is the same sequence of pairs in other slots).
        Trials that start together stay in step unless one skips an update or sits out an iteration, and
        a fresh trial has nothing to move, so this copies little."""
        pos = self.pos[rows]
        clock = int(pos.mode().values)
        off = rows[pos != clock]
        if off.numel():
            h = self.pairs.shape[1]
            # slot j of the rotated ring holds old slot j - clock + pos: the newest pair stays the newest
            old = (torch.arange(h, device=off.device)[None] - clock + self.pos[off, None]) % h
            self.pairs[off] = self.pairs[off[:, None], old]
            self.ro[off] = self.ro[off[:, None], old]
            self.pos[off] = clock
        return clock

    def reset(self, mask: torch.Tensor) -> None:
        """Forget the trials in mask (a restart): their next step is a first step, as for a new optimizer.
        Their evaluation counts go on (they are the trial's total)."""
        self.n_iter[mask] = 0
        self.known[mask] = False

    def _line_search(self, closure: Callable[[], torch.Tensor], run: torch.Tensor, gtd: torch.Tensor,
                     max_ls: torch.Tensor, tolerance_change: float) -> torch.Tensor:
        """A strong-Wolfe line search along self.d from t = self.t for each trial in `run`, all trials'
        searches advancing together: each trial's search is a generator (`strong_wolfe`) that asks for step
        lengths; every round evaluates all pending requests in one batched closure call. Leaves each trial
        at its accepted point with self.t, self.loss, self.flat_grad set; returns the evaluations used (K,)."""
        x0 = self._flat_params()
        rows = run.nonzero().squeeze(1).tolist()
        searches = {r: strong_wolfe(float(self.t[r]), float(self.loss[r]), self.flat_grad[r], float(gtd[r]),
                                    float(self.d[r].abs().max()), tolerance_change=tolerance_change,
                                    max_ls=int(max_ls[r])) for r in rows}
        asked = {r: next(search) for r, search in searches.items()}
        before = self.evaluations.clone()
        while asked:
            t = torch.zeros_like(self.t)
            mask = torch.zeros_like(run)
            for r, step in asked.items():
                t[r], mask[r] = step, True
            self._set_params(x0 + t[:, None] * self.d, mask)
            loss, flat_grad = self._evaluate(closure, mask)
            gtd_new = (flat_grad * self.d).sum(1)
            still = {}
            for r in asked:
                try:
                    still[r] = searches[r].send((float(loss[r]), flat_grad[r].clone(), float(gtd_new[r])))
                except StopIteration as accepted:
                    f, g, self.t[r] = accepted.value
                    self.loss[r], self.flat_grad[r] = f, g
            asked = still
        self._set_params(x0 + self.t[:, None] * self.d, run)
        self.known |= run
        return self.evaluations - before

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        group = self.param_groups[0]
        lr, max_iter, max_eval = group["lr"], group["max_iter"], group["max_eval"]
        tol_grad, tol_change = group["tolerance_grad"], group["tolerance_change"]

        run = self.active.clone()
        fresh = run & ~self.known
        if fresh.any():
            loss, flat_grad = self._evaluate(closure, fresh)
            self.loss = torch.where(fresh, loss, self.loss)
            self.flat_grad = torch.where(fresh[:, None], flat_grad, self.flat_grad)
        loss, flat_grad = self.loss.clone(), self.flat_grad.clone()
        current_evals = run.long()
        run &= ~(flat_grad.abs().amax(1) <= tol_grad)  # already optimal

        n = 0
        while run.any():
            n += 1
            self.n_iter += run.long()
            first = run & (self.n_iter == 1)
            rest = run & ~first
            if first.any():  # the first iteration ever: steepest descent, empty history
                self.count[first] = 0
                self.pos[first] = 0
                self.ro[first] = 0
                self.h_diag[first] = 1
            if rest.any():
                y = flat_grad - self.prev_flat_grad
                s = self.d * self.t[:, None]
                self._push_history(y, s, rest)
                rows = rest.nonzero().squeeze(1)
                self.d[rows] = self._direction(flat_grad, rows)
            self.d = torch.where(first[:, None], flat_grad.neg(), self.d)
            self.prev_flat_grad = torch.where(run[:, None], flat_grad, self.prev_flat_grad)
            self.prev_loss = torch.where(run, loss, self.prev_loss)
            first_t = torch.clamp(1.0 / flat_grad.abs().sum(1), max=1.0) * lr
            self.t = torch.where(first, first_t, torch.where(run, torch.full_like(self.t, lr), self.t))

            gtd = (flat_grad * self.d).sum(1)
            run &= ~(gtd > -tol_change)  # not a descent direction
            if not run.any():
                break
            if group["line_search_fn"] == "strong_wolfe":
                current_evals += self._line_search(closure, run, gtd, max_eval - current_evals, tol_change)
                loss = torch.where(run, self.loss, loss)
                flat_grad = torch.where(run[:, None], self.flat_grad, flat_grad)
                optimal = flat_grad.abs().amax(1) <= tol_grad
                if n == max_iter:
                    break
            else:  # the paper: a fixed step of length t
                self._add_step(self.d * self.t[:, None], run)
                self.known &= ~run
                if n == max_iter:
                    break  # re-evaluated (only) if the next step needs it, as torch
                new_loss, new_grad = self._evaluate(closure, run)
                loss = torch.where(run, new_loss, loss)
                flat_grad = torch.where(run[:, None], new_grad, flat_grad)
                self.loss = torch.where(run, new_loss, self.loss)
                self.flat_grad = torch.where(run[:, None], new_grad, self.flat_grad)
                self.known |= run
                current_evals += run.long()
                optimal = flat_grad.abs().amax(1) <= tol_grad
            run &= ~(current_evals >= max_eval)
            run &= ~optimal
            run &= ~((self.d * self.t[:, None]).abs().amax(1) <= tol_change)
            run &= ~((loss - self.prev_loss).abs() < tol_change)

        stale = self.active & ~self.known  # last iteration moved without evaluating (max_iter reached)
        if stale.any():
            loss, flat_grad = self._evaluate(closure, stale)
            self.loss = torch.where(stale, loss, self.loss)
            self.flat_grad = torch.where(stale[:, None], flat_grad, self.flat_grad)
            self.known |= stale
        return self.loss.clone()


class BatchedAdam(_TrialOptimizer):
    """Adam with per-trial step counts, so a frozen trial neither moves nor ages. One evaluation per
    step; the returned objective is the one at the point before the update.

    Inverting Gradients' options (Geiping et al. 2020; breaching's `invertinggradients`):
    signed: Adam on sign(gradient) (breaching's `signed: hard`), the sign taken per pixel of the total
    objective's gradient; step_decay: the attack's step budget N, the learning rate multiplied by `gamma` after
    N // 2.667, N // 1.6 and N // 1.142 steps of the trial's attempt (breaching's `step-lr`, about 3/8, 5/8
    and 7/8 of N), counted per trial like Adam's own step count."""

    def __init__(self, params, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 signed: bool = False, step_decay: int | None = None, gamma: float = 0.1):
        if step_decay is not None and (not isinstance(step_decay, int) or isinstance(step_decay, bool)
                                       or step_decay < 1):
            raise ConfigError(f"optimizer.step_decay must be null or the step budget (an integer >= 1), "
                              f"got {step_decay!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        self.measures_start = True
        k, n = self.trials, sum(p[0].numel() for p in self._params)
        like = dict(device=self._params[0].device, dtype=self._params[0].dtype)
        self.m = torch.zeros(k, n, **like)
        self.v = torch.zeros(k, n, **like)
        self.age = torch.zeros(k, **like)
        self.signed, self.gamma = bool(signed), float(gamma)
        self.milestones = [] if step_decay is None else [step_decay // d for d in STEP_LR_DIVISORS]

    def reset(self, mask: torch.Tensor) -> None:
        """Forget the trials in mask (a restart): moments and step count back to zero."""
        self.m[mask] = 0
        self.v[mask] = 0
        self.age[mask] = 0

    def learning_rate(self) -> torch.Tensor:
        """(K, 1) the learning rate of each trial's next step: lr x gamma per milestone its attempt has passed
        (a step t, counted from 1, uses the rate after t - 1 scheduler steps, as torch's MultiStepLR)."""
        lr = self.param_groups[0]["lr"]
        passed = sum((self.age - 1 >= m).to(self.age.dtype) for m in self.milestones) if self.milestones else 0
        return (lr * self.gamma ** passed * torch.ones_like(self.age))[:, None]

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        group = self.param_groups[0]
        (beta1, beta2), eps = group["betas"], group["eps"]
        run = self.active.clone()
        loss, g = self._evaluate(closure, run)
        if self.signed:
            g = g.sign()
        self.age += run
        m = beta1 * self.m + (1 - beta1) * g
        v = beta2 * self.v + (1 - beta2) * g * g
        self.m = torch.where(run[:, None], m, self.m)
        self.v = torch.where(run[:, None], v, self.v)
        age = self.age.clamp(min=1)[:, None]
        # 1 - beta**t as -expm1(t log beta): written out, 1 - 0.999**t cancels in float32 (~1e-5 relative
        # error in the step; torch.optim.Adam computes it in double)
        m_hat = self.m / -torch.expm1(age * math.log(beta1))
        v_hat = self.v / -torch.expm1(age * math.log(beta2))
        self._add_step(-self.learning_rate() * m_hat / (v_hat.sqrt() + eps), run)
        return loss
