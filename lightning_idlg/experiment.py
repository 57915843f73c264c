"""One experiment: pick trials, run the client and the attacks batch by batch, evaluate, record.

Data flows one way: data set -> victims + private batch -> client's `share_gradient` -> attack
(`GradientInversion`, sees only the `SharedGradient`) -> metrics against the private batch -> records.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lightning_idlg import metrics, tracking
from lightning_idlg.attack import AttackResult, GradientInversion
from lightning_idlg.client import PrivateBatch, share_gradient, stack_victims
from lightning_idlg.data import pick_trials
from lightning_idlg.errors import ConfigError
from lightning_idlg.monitor import ReconstructionMonitor, StepProgress
from lightning_idlg.pictures import save_progress_strip, save_trial_picture
from lightning_idlg.results import TrialStore, write_summary
from lightning_idlg.victim import make_victim

log = logging.getLogger(__name__)
METHOD_ORDER = ("dlg", "idlg")
CPU_TRIALS_PER_BATCH = 32   # ~1 ms per trial-evaluation on a CPU core for K = 16-64 (vmap), worse beyond
GPU_TRIALS_PER_BATCH = 512


@dataclass(frozen=True)
class Trial:
    """One attacked image: its position in the experiment and what is drawn from the seed for it."""

    index: int
    image_index: int
    victim_seed: int
    dummy_seed: int


def derive_seed(seed: int, index: int, stream: int) -> int:
    """Independent seed per (experiment seed, trial, stream) so a trial's draws never depend on which
    batch, device or rank it runs in."""
    return ((seed * 1_000_003 + index) * 16 + stream) % (2**63)


def validate(cfg: DictConfig) -> None:
    for key in ("trials", "steps"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    k = cfg.trials_per_batch
    if not (k == "auto" or (isinstance(k, int) and k >= 1)):
        raise ConfigError(f"trials_per_batch must be 'auto' or a positive integer, got {k!r}")
    if not cfg.method:
        raise ConfigError("method is empty; valid: method=dlg, method=idlg, method=both")
    unknown = [m for m in cfg.method if m not in METHOD_ORDER]
    if unknown:
        raise ConfigError(f"method names {unknown} are not known; valid: {', '.join(METHOD_ORDER)}")


def trials_per_batch(cfg: DictConfig, pending: int) -> int:
    if cfg.trials_per_batch != "auto":
        return int(cfg.trials_per_batch)
    gpu = str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda") or (
        cfg.trainer.get("accelerator") == "auto" and torch.cuda.is_available())
    return max(1, min(pending, GPU_TRIALS_PER_BATCH if gpu else CPU_TRIALS_PER_BATCH))


def plan_trials(cfg: DictConfig, dataset_size: int) -> list[Trial]:
    images = pick_trials(dataset_size, cfg.trials, cfg.seed)
    return [Trial(i, image, derive_seed(cfg.seed, i, 0), derive_seed(cfg.seed, i, 1))
            for i, image in enumerate(images)]


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, dict]:
    """Run the experiment `cfg` into `run_dir` (resuming what is there); returns the summary."""
    validate(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    dataset = instantiate(cfg.dataset)
    methods = [m for m in METHOD_ORDER if m in cfg.method]
    store = TrialStore(run_dir)
    done = store.done()
    trials = plan_trials(cfg, len(dataset))
    pending = [t for t in trials if any((m, t.index) not in done for m in methods)]
    if len(pending) < len(trials):
        log.info("resuming: %d of %d trials already recorded in %s", len(trials) - len(pending), len(trials),
                 store.path)
    k = trials_per_batch(cfg, len(pending))
    logger = instantiate(cfg.logger) if cfg.get("logger") else None
    (run_dir / "pictures").mkdir(exist_ok=True)

    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    step_offset = 0
    with Progress(*columns, console=console, disable=not cfg.get("progress_bar", True)) as progress:
        overall = progress.add_task("trials", total=len(pending) * len(methods))
        steps_task = progress.add_task("steps", total=cfg.steps)
        for start in range(0, len(pending), k):
            batch = pending[start:start + k]
            private, shared = prepare_batch(cfg, dataset, batch)
            results = {}
            for method in methods:
                todo = [t for t in batch if (method, t.index) not in done]
                if not todo:
                    continue
                progress.update(steps_task, description=f"{method} steps", completed=0)
                result, used = attack_batch(cfg, method, shared, batch, logger, step_offset,
                                            [ReconstructionMonitor(private.images, step_offset),
                                             StepProgress(progress, steps_task)])
                step_offset += used
                results[method] = result
                store.append(evaluate(cfg, result, private, batch, todo))
                progress.advance(overall, len(todo))
            save_pictures(cfg, run_dir, batch, private, results)
    if logger is not None:
        logger.finalize("success")
    summary = write_summary(run_dir, store.records())
    tracking.log_run_results(logger, store.records(), summary, run_dir)  # config, summary, W&B table
    print_summary(summary, Console())  # the result goes to stdout; progress went to stderr
    return summary


def prepare_batch(cfg: DictConfig, dataset, batch: list[Trial]):
    """The client side for a batch of trials: private images, fresh victims, shared gradients."""
    images, labels = zip(*(dataset[t.image_index] for t in batch))
    private = PrivateBatch(torch.stack(images), torch.tensor(labels), [t.index for t in batch])
    c, h, _ = dataset.shape
    factory = instantiate(cfg.model.factory)
    victims = [make_victim(factory, in_channels=c, image_size=h, num_classes=dataset.num_classes,
                           seed=t.victim_seed, init=cfg.model.init, init_scale=cfg.model.init_scale)
               for t in batch]
    return private, share_gradient(victims[0], stack_victims(victims), private, dataset.num_classes)


def attack_batch(cfg: DictConfig, method: str, shared, batch: list[Trial], logger, step_offset: int,
                 callbacks) -> tuple[AttackResult, int]:
    attack: GradientInversion = instantiate(cfg.method[method])(
        shared=shared,
        optimizer=instantiate(cfg.optimizer),
        steps=cfg.steps,
        tolerance=cfg.tolerance,
        dummy_seeds=[t.dummy_seed for t in batch],
        snapshot_every=cfg.snapshot_every,
        snapshot_trials=sum(t.index < cfg.progress_trials for t in batch),
    )
    trainer = instantiate(cfg.trainer, max_steps=cfg.steps, logger=logger if logger is not None else False,
                          callbacks=callbacks)
    trainer.fit(attack)
    return attack.result(), int(attack.steps_used.max())


def evaluate(cfg: DictConfig, result: AttackResult, private: PrivateBatch, batch: list[Trial],
             todo: list[Trial]) -> list[dict]:
    """Per-trial records: the attack's output compared with the private data."""
    mse = metrics.mse(result.dummy, private.images)
    psnr = metrics.psnr(result.dummy, private.images)
    ssim = metrics.ssim(result.dummy, private.images)
    wanted = {t.index for t in todo}
    records = []
    for row, trial in enumerate(batch):
        if trial.index not in wanted:
            continue
        label, predicted = int(private.labels[row]), int(result.predicted_label[row])
        records.append({
            "method": result.method,
            "index": trial.index,
            "image_index": trial.image_index,
            "label": label,
            "predicted_label": predicted,
            "label_correct": label == predicted,
            "mse": float(mse[row]),
            "psnr": float(psnr[row]),
            "ssim": float(ssim[row]),
            "distance": float(result.distance[row]),
            "status": result.status[row],
            "steps": int(result.steps[row]),
            "evaluations": int(result.evaluations[row]),
            "seconds": result.seconds / len(batch),  # the batch's wall time, shared among its trials
            "batch_size": len(batch),
            "seed": cfg.seed,
            "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
        })
    return records


def save_pictures(cfg: DictConfig, run_dir: Path, batch: list[Trial], private: PrivateBatch,
                  results: dict[str, AttackResult]) -> None:
    if not results or not cfg.get("pictures", True):
        return
    methods = list(results)
    for row, trial in enumerate(batch):
        save_trial_picture(run_dir / "pictures" / f"trial_{trial.index:05d}.png", private.images[row],
                           [results[m].dummy[row] for m in methods])
        if trial.index < cfg.progress_trials and all(results[m].snapshots for m in methods):
            strips = [[snaps[row] for _, snaps in sorted(results[m].snapshots.items())] for m in methods]
            save_progress_strip(run_dir / "pictures" / f"progress_{trial.index:05d}.png", strips)


def print_summary(summary: dict[str, dict], console: Console) -> None:
    """The per-method summary as a table (fidelity columns: share of trials with MSE below 1e-2 ...)."""
    table = Table(title="lightning_idlg summary", caption="fid<t: share of trials with MSE < t")
    for column in ("method", "trials", "label", "fid<1e-2", "fid<1e-3", "fid<1e-4", "conv", "div", "PSNR",
                   "SSIM", "steps"):
        table.add_column(column, justify="right", no_wrap=True)
    for method, s in summary.items():
        f = s["fidelity"]
        table.add_row(method, str(s["trials"]), f"{s['label_accuracy']:.3f}", f"{f['0.01']:.3f}",
                      f"{f['0.001']:.3f}", f"{f['0.0001']:.3f}", str(s["status"]["converged"]),
                      str(s["status"]["diverged"]), f"{s['psnr']:.1f}", f"{s['ssim']:.3f}",
                      f"{s['steps_to_converge']:.0f}")
    console.print(table)
