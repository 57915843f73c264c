"""Callbacks that watch an attack while it runs.

`ReconstructionMonitor` is on the evaluation side of the wall: it holds the private images to log the
MSE / PSNR curves the paper plots, and only reads the attack's dummies; the attack never sees it.
With a W&B logger it also logs image panels (tracking.log_panel: ground truth over reconstruction of
the first few trials) every `logger.image_every` steps and at the batch's last step.
`StepProgress` advances a rich progress bar per optimizer step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_idlg import metrics, tracking


class ReconstructionMonitor(pl.Callback):
    """Logs per step, for the K trials of one attack batch: median distance D, median MSE, median PSNR and
    the number of trials still running, under `<method>/...`, at step `step_offset + global_step` so
    that consecutive batches draw one continuous curve."""

    def __init__(self, private_images: torch.Tensor, step_offset: int = 0, every: int = 1):
        self.private_images = private_images
        self.step_offset = step_offset
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if trainer.logger is None or step % self.every:
            return
        dummy = pl_module.dummy.detach().cpu().flatten(0, 1)  # (K, B, C, H, W) -> one image per row
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
            self._panel(trainer, pl_module, dummy)

    def on_train_end(self, trainer, pl_module) -> None:
        # the batch's final reconstructions, also when it stopped early (all trials converged) between panels
        if trainer.logger is not None and not tracking.panel_due(trainer.logger, trainer.global_step):
            self._panel(trainer, pl_module, pl_module.dummy.detach().cpu().flatten(0, 1))

    def _panel(self, trainer, pl_module, dummy: torch.Tensor) -> None:
        if trainer.is_global_zero:  # building the grid is work: skip it where Lightning would drop the log
            tracking.log_panel(trainer.logger, pl_module.method, self.private_images, dummy,
                               self.step_offset + trainer.global_step)


class StepProgress(pl.Callback):
    """Moves a rich progress task one step per optimizer step of the attack."""

    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.progress.update(self.task, completed=trainer.global_step)
