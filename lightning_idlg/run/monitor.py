"""Callbacks that watch an attack while it runs.

`ReconstructionMonitor` is on the evaluation side of the wall: it holds the private images to log the
MSE / PSNR curves the paper plots, and only reads the attack's dummies; the attack never sees it.
With a W&B logger it also logs image panels (tracking.log_panel: ground truth over reconstruction of
the first few trials; for clients of B > 1 samples tracking.log_client_panels: one panel per client, its
B private images over the reconstructions matched to them) every `logger.image_every` steps and at the
batch's last step.
`AttackProgress` moves the run's rich progress bars at every optimizer step: the method's bar (trials
converged / active / done) and the steps bar (ETA, median distance), from the attack's public state.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_idlg.records import metrics

from lightning_idlg.run import tracking


class ReconstructionMonitor(pl.Callback):
    """Logs per step, for the K trials of one attack batch: median distance D, median MSE, median PSNR and
    the number of trials still running, under `<method>/...`, at step `step_offset + global_step` so
    that consecutive batches draw one continuous curve. `private_images` are the batch's K clients' B
    images flattened (K * B, C, H, W), `trial_indices` the trial of each. With B > 1 the MSE and PSNR
    compare each private image with the reconstruction matched to it (metrics.match), as the records do."""

    def __init__(self, private_images: torch.Tensor, step_offset: int = 0, every: int = 1,
                 trial_indices: list[int] | None = None):
        self.private_images = private_images
        self.trial_indices = list(trial_indices) if trial_indices else list(range(len(private_images)))
        self.step_offset = step_offset
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.logger is None or step % self.every:
            return
        dummy = pl_module.dummy.detach().cpu()  # (K, B, C, H, W)
        if dummy.shape[1] > 1:
            dummy = tracking.matched_reconstructions(dummy, self.private_images.reshape(dummy.shape))
        dummy = dummy.flatten(0, 1)  # one image per row
        mse = metrics.mse(dummy, self.private_images)
        psnr = metrics.psnr(dummy, self.private_images)
        prefix = pl_module.method
        trainer.logger.log_metrics({
            f"{prefix}/distance": float(pl_module.distance.median()),
            f"{prefix}/mse": float(mse.median()),
            f"{prefix}/psnr": float(psnr.median()),
            f"{prefix}/active_trials": int((~(pl_module.converged | pl_module.diverged)).sum()),
        }, step=self.step_offset + step)
        if tracking.panel_due(trainer.logger, step):
            self._panel(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        # the batch's final reconstructions, also when it stopped early (all trials converged) between panels
        if trainer.logger is not None and not tracking.panel_due(trainer.logger, trainer.global_step):
            self._panel(trainer, pl_module)

    def _panel(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:  # building the grid is work: skip it where Lightning would drop the log
            return
        dummy = pl_module.dummy.detach().cpu()  # (K, B, C, H, W)
        step = self.step_offset + trainer.global_step
        b = dummy.shape[1]
        if b == 1:
            tracking.log_panel(trainer.logger, pl_module.method, self.private_images, dummy.flatten(0, 1), step,
                               trainer.global_step, self.trial_indices)
        else:  # one panel per client; trial_indices holds each client's trial B times
            tracking.log_client_panels(trainer.logger, pl_module.method, self.private_images.reshape(dummy.shape),
                                       dummy, step, trainer.global_step, self.trial_indices[::b])


class AttackProgress(pl.Callback):
    """Moves two rich progress tasks at every optimizer step of one attack batch, from what the attack
    module exposes (its `distance`, `converged`, `diverged`, `stopped` buffers and `steps_used`):

    - `method_task`: trials done (converged, diverged or stopped) out of the method's total, with the
      counts converged and still active in its `info` field; `done` / `converged` are the counts from
      earlier batches, `rows` the batch's rows that count (a resumed batch may hold trials already
      recorded for this method);
    - `steps_task`: the batch's optimizer step out of `steps` (out of the trainer's `max_steps` once a
      restarted trial runs past `steps`), its clock restarted for every batch, the median distance D of
      the active trials (of all, once none is active) in `info`; a batch that ends early (every trial
      stopped) ends its bar at that step, with no ETA left over."""

    def __init__(self, progress, method_task, steps_task, steps: int, rows: list[int], done: int = 0,
                 converged: int = 0):
        self.progress, self.method_task, self.steps_task = progress, method_task, steps_task
        self.steps, self.rows, self.done, self.converged = steps, rows, done, converged

    def on_train_start(self, trainer, pl_module) -> None:
        self.progress.reset(self.steps_task, total=self.steps, description=f"{pl_module.method} steps", info="")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rows = torch.as_tensor(self.rows, device=pl_module.distance.device)
        converged = pl_module.converged[rows]
        finished = converged | pl_module.diverged[rows] | pl_module.stopped[rows]
        active = ~(pl_module.converged | pl_module.diverged | pl_module.stopped)
        distance = pl_module.distance[active] if active.any() else pl_module.distance
        step = trainer.global_step
        self.progress.update(self.steps_task, completed=step, total=self.steps if step <= self.steps
                             else trainer.max_steps, info=f"median D {float(distance.median()):.1e}")
        self.progress.update(self.method_task, completed=self.done + int(finished.sum()),
                             info=f"{self.converged + int(converged.sum())} converged, {int((~finished).sum())} active")

    def on_train_end(self, trainer, pl_module) -> None:
        # every trial stopped (often long before `steps`): the batch ends here, with nothing left to wait for
        self.progress.update(self.steps_task, total=max(trainer.global_step, 1), completed=trainer.global_step)
