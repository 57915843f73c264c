"""Optimizers over K independent trials stacked along dim 0 of every parameter.

One attack batch optimizes the dummies of K trials at once, but nothing may couple the trials: each has
its own curvature history, step length, convergence tests and evaluation count. torch.optim.LBFGS would
treat the K dummies as one vector (shared history, one step length), so it is re-written here with a
trial dimension; for K = 1 it takes the same steps as torch.optim.LBFGS (tests/test_optim.py).

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

from lightning_idlg.errors import ConfigError


class _TrialOptimizer(torch.optim.Optimizer):
    """Shared plumbing: flat per-trial views of the parameters, the active mask, evaluation counts."""

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

    def _add_step(self, step: torch.Tensor, mask: torch.Tensor) -> None:
        """x += step for trials in mask (torch.where, so a NaN in a frozen row never spreads)."""
        step = torch.where(mask[:, None], step, torch.zeros_like(step))
        offset = 0
        with torch.no_grad():
            for p in self._params:
                numel = p[0].numel()
                p.add_(step[:, offset:offset + numel].view_as(p))
                offset += numel

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
        if line_search_fn is not None:
            raise ConfigError(f"line_search_fn={line_search_fn!r} is not supported by BatchedLBFGS; valid: null")
        max_eval = max_eval if max_eval is not None else max_iter * 5 // 4
        super().__init__(params, dict(lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
                                      tolerance_change=tolerance_change, history_size=history_size))
        k, n = self.trials, sum(p[0].numel() for p in self._params)
        like = dict(device=self._params[0].device, dtype=self._params[0].dtype)
        h = history_size
        self.n_iter = torch.zeros(k, dtype=torch.long, device=like["device"])  # iterations since start
        self.d = torch.zeros(k, n, **like)           # search direction
        self.t = torch.zeros(k, **like)              # step length
        self.old_dirs = torch.zeros(k, h, n, **like)  # y history (ring buffer per trial)
        self.old_stps = torch.zeros(k, h, n, **like)  # s history
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
        self.old_dirs[rows, slot] = y[rows]
        self.old_stps[rows, slot] = s[rows]
        self.ro[rows, slot] = 1.0 / ys[rows]
        self.h_diag[rows] = ys[rows] / (y[rows] * y[rows]).sum(1)
        self.count[rows] = torch.clamp(self.count[rows] + 1, max=self.old_dirs.shape[1])
        self.pos[rows] = (slot + 1) % self.old_dirs.shape[1]

    def _direction(self, flat_grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The L-BFGS two-loop recursion for the trials `rows`, newest to oldest pair, per trial.

        The history is gathered once into newest-first order, so each pair costs three fused ops (the
        recursion itself is sequential in the pairs). Empty slots have ro = 0 and contribute nothing, so a
        trial with fewer pairs than others simply adds zeros."""
        h = self.old_dirs.shape[1]
        depth = int(self.count[rows].max())
        q = flat_grad[rows].neg()
        if depth == 0:
            return q * self.h_diag[rows, None]
        ages = torch.arange(depth, device=q.device)
        order = (self.pos[rows, None] - 1 - ages) % h                 # (R, depth) slot of the i-th newest
        s_hist = self.old_stps[rows[:, None], order]                   # (R, depth, N)
        y_hist = self.old_dirs[rows[:, None], order]
        ro = self.ro[rows[:, None], order]                             # (R, depth)
        alphas = torch.empty_like(ro)
        for i in range(depth):
            alphas[:, i] = torch.linalg.vecdot(s_hist[:, i], q) * ro[:, i]
            q.addcmul_(alphas[:, i, None], y_hist[:, i], value=-1)
        r = q.mul_(self.h_diag[rows, None])
        for i in reversed(range(depth)):
            be = torch.linalg.vecdot(y_hist[:, i], r) * ro[:, i]
            r.addcmul_((alphas[:, i] - be)[:, None], s_hist[:, i])
        return r

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
            self._add_step(self.d * self.t[:, None], run)
            self.known &= ~run
            if n != max_iter:
                new_loss, new_grad = self._evaluate(closure, run)
                loss = torch.where(run, new_loss, loss)
                flat_grad = torch.where(run[:, None], new_grad, flat_grad)
                self.loss = torch.where(run, new_loss, self.loss)
                self.flat_grad = torch.where(run[:, None], new_grad, self.flat_grad)
                self.known |= run
                current_evals += run.long()
                optimal = flat_grad.abs().amax(1) <= tol_grad
            else:
                break
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
    step; the returned objective is the one at the point before the update."""

    def __init__(self, params, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps))
        k, n = self.trials, sum(p[0].numel() for p in self._params)
        like = dict(device=self._params[0].device, dtype=self._params[0].dtype)
        self.m = torch.zeros(k, n, **like)
        self.v = torch.zeros(k, n, **like)
        self.age = torch.zeros(k, **like)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        group = self.param_groups[0]
        (beta1, beta2), lr, eps = group["betas"], group["lr"], group["eps"]
        run = self.active.clone()
        loss, g = self._evaluate(closure, run)
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
        self._add_step(-lr * m_hat / (v_hat.sqrt() + eps), run)
        return loss
