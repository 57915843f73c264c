"""Experiment tracking beyond the per-step curves: W&B runs, image panels, the per-trial table, summaries.

- `WandbTracker` (`logger=wandb`): Lightning's `WandbLogger` that picks offline mode by itself when no
  API key is configured, groups the jobs of a Hydra multirun, tags the run with its methods and data
  set, and carries the image-panel settings that `ReconstructionMonitor` reads.
- `log_panel`: a labelled picture of ground truth (top row) over current reconstructions (bottom row)
  for the first few trials of the batch in flight, 8-bit RGB; W&B only (other loggers have no images).
- `log_client_panels`: for clients of B > 1 samples, one such picture per client (`<method>/client_<trial>`):
  its B private images over the reconstructions matched to them (metrics.match).
- `log_run_results`: once per run, the resolved config, the summary scalars (any logger) and, for W&B,
  the summary in `run.summary` and a per-trial table; then it closes the W&B run, so that the next
  job of a multirun (same process) starts a run of its own.
- `log_label_results`: once per label-restoration run (`lightning-idlg-labels logger=wandb`), the config,
  and for W&B the per-cell accuracy table and the accuracy-against-B plot.
- `flat_summary`: summary.json as flat metric names (`idlg/fidelity/1e-03`): what W&B's summary holds
  and what a W&B sweep or `optimized_metric` (Optuna) names.

wandb itself is imported lazily, only when a W&B logger is in use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

MODES = ("auto", "online", "offline", "disabled")
IMAGE_EVERY, IMAGE_TRIALS = 10, 4  # panel defaults (configs/logger/wandb.yaml sets the same)
TABLE_COLUMNS = ("method", "index", "label", "predicted_label", "mse", "psnr", "ssim", "status", "steps")
# summary.json keys that share a name with a per-step curve (monitor.py); the run-wide value is the median
# over all trials, so it is named apart instead of overwriting the curve's last value in W&B's summary
MEDIANS = ("mse", "psnr", "ssim", "lpips")


def has_api_key() -> bool:
    """Whether W&B credentials are configured (WANDB_API_KEY, ~/.netrc, wandb settings), asked of wandb
    itself without prompting and without network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import wandb

    try:
        return bool(wandb.login(prompt=False, verify=False))
    except TypeError:  # an older wandb without `prompt=`: its deprecated key lookup never prompts
        return bool(wandb.api.api_key)


def resolve_mode(mode: str) -> str:
    """`auto`: WANDB_MODE if set, else online with an API key and offline without one (never a prompt,
    never a network wait); anything else is taken as given."""
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r} is not known; valid: {', '.join(MODES)}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_api_key() else "offline"


def multirun_group() -> str | None:
    """In a Hydra multirun: the sweep dir's last two parts (`2024-05-01-12-00-00` for the default
    `multirun/DATE/TIME`), so the jobs of one multirun share a W&B group; else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return "-".join(Path(HydraConfig.get().sweep.dir).parts[-2:])


class WandbTracker(WandbLogger):
    """`WandbLogger` with offline-by-default, multirun groups, method/data-set tags and panel settings.

    `image_every`: log a panel every N steps of an attack batch, and at its last step (0: no panels);
    `image_trials`: how many trials (the first of the batch) a panel shows."""

    def __init__(self, project: str = "lightning_idlg", save_dir: str = ".", mode: str = "auto",
                 group: str | None = None, tags: list[str] | tuple = (), methods: list[str] | tuple = (),
                 dataset: str | None = None, image_every: int = IMAGE_EVERY, image_trials: int = IMAGE_TRIALS,
                 **kwargs):
        for key, value in (("image_every", image_every), ("image_trials", image_trials)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"logger.{key} must be a non-negative integer, got {value!r}")
        self.image_every, self.image_trials = image_every, image_trials
        Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp when dir is missing
        tags = list(dict.fromkeys([*methods, *([dataset] if dataset else []), *tags]))  # ordered, unique
        super().__init__(project=project, save_dir=save_dir, mode=resolve_mode(mode),
                         group=group or multirun_group(), tags=tags, **kwargs)


def panel_settings(logger: Logger | None) -> tuple[int, int]:
    """(image_every, image_trials) of a W&B logger (a plain WandbLogger gets the defaults); (0, 0), no
    panels, for any other logger: they have no images."""
    if not isinstance(logger, WandbLogger):
        return 0, 0
    return getattr(logger, "image_every", IMAGE_EVERY), getattr(logger, "image_trials", IMAGE_TRIALS)


def panel_due(logger: Logger | None, local_step: int) -> bool:
    """Whether step `local_step` of an attack batch gets a panel (the batch's last step always does)."""
    every, trials = panel_settings(logger)
    return bool(every and trials) and local_step % every == 0


def log_panel(logger: Logger | None, method: str, truth: torch.Tensor, dummy: torch.Tensor, step: int,
              attack_step: int | None = None, trials: list[int] | None = None) -> None:
    """Ground truth (top row) over reconstruction (bottom row) of the batch's first `image_trials` trials,
    one image `<method>/reconstructions` at `step` (the curves' step), labelled with the method, the
    attack's own step in its batch (`attack_step`) and the trial indices (`trials`). The picture is 8-bit
    RGB in [0, 255] (pictures.panel_canvas: clamped to [0, 1], x 255, upscaled by nearest neighbour),
    handed to W&B as a PIL image, which it stores as a PNG unchanged. Rank zero only; W&B only."""
    shown = _panel_subjects(logger, dummy, step, attack_step, trials)
    if shown is None:
        return
    import wandb

    from lightning_idlg.run.pictures import panel_canvas

    n, attack_step, trials = shown
    canvas = panel_canvas(method, attack_step, truth[:n].cpu(), dummy[:n].detach().cpu(), trials)
    caption = (f"{method} at step {attack_step} of its batch (chart step {step}): ground truth (top) over "
               f"reconstruction (bottom), trials {', '.join(map(str, trials))}")
    logger.log_metrics({f"{method}/reconstructions": wandb.Image(canvas.image, caption=caption)}, step=step)


def _panel_subjects(logger: Logger | None, dummy: torch.Tensor, step: int, attack_step: int | None,
                    trials: list[int] | None) -> tuple[int, int, list[int]] | None:
    """(how many trials a panel shows, the attack's step, their indices), or None where no panel is logged
    (panels off, or not rank zero)."""
    every, n = panel_settings(logger)
    if not (every and n) or rank_zero_only.rank != 0:
        return None
    n = min(n, len(dummy))
    trials = list(trials)[:n] if trials is not None else list(range(n))
    return n, step if attack_step is None else attack_step, trials


def client_panel_key(method: str, trial: int) -> str:
    return f"{method}/client_{trial}"


def log_client_panels(logger: Logger | None, method: str, truth: torch.Tensor, dummy: torch.Tensor, step: int,
                      attack_step: int | None = None, trials: list[int] | None = None) -> None:
    """Clients of B > 1 samples ((K, B, C, H, W) each): one picture per client of the batch's first
    `image_trials`, `<method>/client_<trial>` (client_panel_key), its B private images (top row) over the
    reconstructions matched to them (bottom row, each under the private image it was assigned to by
    metrics.match, the assignment of least total MSE: a reconstruction's position in the dummy batch means
    nothing), each reconstruction labelled with its MSE to that image. 8-bit RGB as in `log_panel`, all of a
    step's panels in one log call at `step`. Rank zero only; W&B only."""
    shown = _panel_subjects(logger, dummy, step, attack_step, trials)
    if shown is None:
        return
    import wandb

    from lightning_idlg.records import metrics
    from lightning_idlg.run.pictures import client_panel_canvas

    n, attack_step, trials = shown
    truth, dummy = truth[:n].cpu(), dummy[:n].detach().cpu()
    matched = matched_reconstructions(dummy, truth)
    panels = {}
    for trial, private, mine in zip(trials, truth, matched):
        errors = metrics.mse(mine, private).tolist()
        canvas = client_panel_canvas(method, attack_step, trial, private, mine, errors)
        caption = (f"{method}, client of trial {trial}, at step {attack_step} of its batch (chart step {step}): "
                   f"its {len(private)} private images (top) over the reconstructions matched to them (bottom)")
        panels[client_panel_key(method, trial)] = wandb.Image(canvas.image, caption=caption)
    logger.log_metrics(panels, step=step)


def matched_reconstructions(dummy: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """(K, B, C, H, W) reconstructions reordered so that [k, j] is the one metrics.match assigns to private
    image [k, j]."""
    from lightning_idlg.records import metrics

    order = metrics.match(dummy, truth)
    return dummy[torch.arange(len(dummy))[:, None], order]


LABEL_TABLE, LABEL_PLOT = "label_restoration/table", "label_restoration/accuracy_vs_B"


def log_label_results(logger: Logger | None, rows: list[dict], columns: list[str] | tuple, plot: str | Path,
                      config: dict) -> None:
    """Once per label-restoration run (lightning_idlg.label_restoration), after labels.csv and labels.png:
    the resolved `config` as hyperparameters (any logger); for W&B the per-cell table `LABEL_TABLE` (one row
    per data set x victim x label draw x B x strategy, `columns` as in labels.csv) and the picture `plot`
    (labels.png) as `LABEL_PLOT`, then the W&B run is finished (a multirun's next job starts its own)."""
    if logger is None:
        return
    logger.log_hyperparams(config)
    if not isinstance(logger, WandbLogger):
        logger.finalize("success")
        return
    import wandb

    data = [[_number(v) if isinstance(v, float) else v for v in (row.get(c) for c in columns)] for row in rows]
    run = logger.experiment
    run.log({LABEL_TABLE: wandb.Table(columns=list(columns), data=data),
             LABEL_PLOT: wandb.Image(str(plot), caption="label restoration: instance accuracy (solid) and "
                                     "exact-multiset accuracy (dashed) against the client batch size B")})
    run.finish()


def flat_summary(summary: dict[str, dict]) -> dict[str, float]:
    """summary.json as flat names without dots (W&B reads a dot as nesting): `idlg/label_accuracy`,
    `idlg/fidelity/1e-03` (share with MSE < 0.001), `idlg/status/converged`, `idlg/steps_to_converge`,
    `idlg/median_psnr` (mse, psnr, ssim get `median_`: the per-step curves own the plain names), ..."""
    flat: dict[str, float] = {}
    for method, values in summary.items():
        for key, value in values.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    name = f"{float(sub):.0e}" if key == "fidelity" else sub
                    flat[f"{method}/{key}/{name}"] = v
            else:
                flat[f"{method}/{'median_' + key if key in MEDIANS else key}"] = value
    return flat


def metric_names(methods, lpips: bool = False) -> list[str]:
    """Every flat name a run of `methods` has in its summary (from a stand-in record per method, so the
    list cannot drift from summarize / flat_summary): lets a bad name fail before the run. `lpips`: the run
    records LPIPS (metrics.lpips), so `M/median_lpips` is one too."""
    from lightning_idlg.records.store import summarize

    stand_in = {"label_correct": True, "mse": 0.0, "psnr": 0.0, "ssim": 0.0, "status": "converged", "steps": 1,
                "evaluations": 1, "seconds": 0.0, **({"lpips": 0.0} if lpips else {})}
    return list(flat_summary(summarize([{"method": m, **stand_in} for m in methods])))


class MetricNameError(ValueError):
    """A metric name that the summary does not have (one line, with the valid names)."""


def metric_value(summary: dict[str, dict], name: str) -> float:
    """The value of flat metric `name` (see flat_summary), e.g. what `optimized_metric` names."""
    flat = flat_summary(summary)
    if name not in flat:
        raise MetricNameError(f"optimized_metric={name!r} is not in the summary; valid: {', '.join(flat)}")
    return float(flat[name])


@rank_zero_only
def log_run_results(logger: Logger | None, records: list[dict], summary: dict[str, dict],
                    run_dir: str | Path, step: int | None = None) -> None:
    """Once per run, after summary.json: the resolved config (run_dir/config.yaml) as hyperparameters; for
    W&B run.summary and the per-trial table `trials`, then the W&B run is finished (a multirun's next job
    in this process must not reuse it); for other loggers the summary scalars at `step` (the curves' last)."""
    if logger is None:
        return
    config_file = Path(run_dir) / "config.yaml"
    if config_file.exists():
        logger.log_hyperparams(OmegaConf.to_container(OmegaConf.load(config_file)))
    flat = flat_summary(summary)
    if not isinstance(logger, WandbLogger):
        logger.log_metrics({k: v for k, v in flat.items() if isinstance(v, (int, float))}, step=step)
        logger.finalize("success")  # writes what came after experiment.run's own finalize
        return
    import wandb

    from lightning_idlg.records.store import unique

    run = logger.experiment
    run.summary.update(flat)
    rows = [[r["method"], r["index"], r["label"], r["predicted_label"], _number(r["mse"]), _number(r["psnr"]),
             _number(r["ssim"]), r["status"], r["steps"]] for r in unique(records)[0]]
    run.log({"trials": wandb.Table(columns=list(TABLE_COLUMNS), data=rows)})
    run.finish()


def _number(value: float) -> float | None:
    # NaN (a diverged trial) and inf (PSNR of an exact copy) are not JSON: the table file would hold
    # NaN/Infinity, which strict JSON readers refuse; None shows as an empty cell (trials.jsonl keeps them)
    return value if math.isfinite(value) else None
