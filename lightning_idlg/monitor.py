"""Callbacks that watch an attack while it runs.

`ReconstructionMonitor` is on the evaluation side of the wall: it holds the private images to log the
MSE / PSNR curves the paper plots, and only reads the attack's dummies; the attack never sees it.
`StepProgress` advances a rich progress bar per optimizer step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_idlg import metrics


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
        dummy = pl_module.dummy.detach().cpu()
        mse = metrics.mse(dummy, self.private_images)
        psnr = metrics.psnr(dummy, self.private_images)
        prefix = pl_module.method
        trainer.logger.log_metrics({
            f"{prefix}/distance": float(pl_module.distance.median()),
            f"{prefix}/mse": float(mse.median()),
            f"{prefix}/psnr": float(psnr.median()),
            f"{prefix}/active_trials": int((~(pl_module.converged | pl_module.diverged)).sum()),
        }, step=self.step_offset + step)


class StepProgress(pl.Callback):
    """Moves a rich progress task one step per optimizer step of the attack."""

    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.progress.update(self.task, completed=trainer.global_step)
