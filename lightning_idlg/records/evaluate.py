"""Evaluation, after the attack: its output compared with the private data, one record per trial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_idlg.attacks.result import AttackResult
from lightning_idlg.case.client import PrivateBatch
from lightning_idlg.case.plan import Trial
from lightning_idlg.records import metrics


@dataclass(frozen=True)
class Evaluation:
    """How the run evaluates, built once: the per-image metrics (MSE, PSNR, SSIM, LPIPS where set), the
    record's axes (what was attacked and how, `record_axes`), its seed and data set name."""

    metrics: dict[str, Callable]
    axes: dict
    seed: int
    dataset: str

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "Evaluation":
        return cls(per_image_metrics(cfg), record_axes(cfg), cfg.seed, cfg.dataset._target_.rsplit(".", 1)[-1])

    def records(self, result: AttackResult, private: PrivateBatch, batch: list[Trial], todo: list[Trial],
                cost: dict[str, torch.Tensor] | None = None, group_size: int | None = None) -> list[dict]:
        """Per-trial records: the attack's output compared with the private data. For a client batch (B > 1)
        each reconstruction is first matched to a private image (Hungarian assignment on MSE), and the record
        holds per-image values under `images` and the trial's means. `group_size`: the trials optimized
        together (default len(batch); continuous batching: its slots, whose trial's result comes alone)."""
        order = metrics.match(result.dummy, private.images)  # (K, B): reconstruction shown as private image j
        dummy = torch.stack([d[o] for d, o in zip(result.dummy, order)])
        predicted = torch.stack([p[o] for p, o in zip(result.predicted_label, order)])
        k, b = private.labels.shape
        flat, truth = dummy.flatten(0, 1), private.images.flatten(0, 1)
        per_image = {name: f(flat, truth).view(k, b) for name, f in self.metrics.items()}
        wanted = {t.index for t in todo}
        shares = (result.seconds / len(batch), group_size or len(batch))
        return [self._record(result, private, trial, row, order, predicted, per_image, cost, *shares)
                for row, trial in enumerate(batch) if trial.index in wanted]

    def _record(self, result, private, trial, row, order, predicted, per_image, cost, seconds, group_size) -> dict:
        b = private.labels.shape[1]
        labels, guesses = private.labels[row].tolist(), predicted[row].tolist()
        correct = [y == p for y, p in zip(labels, guesses)]
        record = {
            "method": result.method,
            "index": trial.index,
            "image_index": trial.images[0] if b == 1 else list(trial.images),
            "label": labels[0] if b == 1 else labels,
            "predicted_label": guesses[0] if b == 1 else guesses,
            "label_correct": all(correct),
            **{name: float(values[row].mean()) for name, values in per_image.items()},
            "distance": float(result.distance[row]),
            "status": result.status[row],
            "steps": int(result.steps[row]),
            "evaluations": int(result.evaluations[row]),
            "restarts": int(result.restarts[row]),
            "seconds": seconds,  # the group's wall time, shared among its trials
            # trials optimized together (trials_per_group), not the client batch
            "group_size": group_size,
            "seed": self.seed,
            "dataset": self.dataset,
            "client_batch_size": b,
            "axes": {**self.axes, "attack": result.method},
        }
        if cost is not None:
            record["defense_cosine"] = float(cost["cosine"][row])
            record["defense_relative_error"] = float(cost["relative_error"][row])
        if b > 1:
            record["label_accuracy"] = sum(correct) / b
            record["images"] = [{"image_index": i, "label": y, "predicted_label": p,
                                 **{name: float(values[row, j]) for name, values in per_image.items()},
                                 "matched_reconstruction": int(order[row, j])}
                                for j, (i, y, p) in enumerate(zip(trial.images, labels, guesses))]
        return record


def evaluate(cfg: DictConfig, result: AttackResult, private: PrivateBatch, batch: list[Trial],
             todo: list[Trial], cost: dict[str, torch.Tensor] | None = None,
             group_size: int | None = None) -> list[dict]:
    """`Evaluation.records` of the evaluation `cfg` builds (for a script or a test)."""
    return Evaluation.from_config(cfg).records(result, private, batch, todo, cost, group_size)


def per_image_metrics(cfg: DictConfig) -> dict:
    """name -> f(reconstructions, private images) -> (N,): MSE, PSNR, SSIM, and LPIPS with `metrics.lpips`
    set (its backbone was checked at startup by `validate`), in the order records list them."""
    found = {"mse": metrics.mse, "psnr": metrics.psnr, "ssim": metrics.ssim}
    net = OmegaConf.select(cfg, "metrics.lpips", default=False)
    if net not in (False, None):
        metric = metrics.lpips_metric(net)
        found["lpips"] = lambda reconstruction, target: metrics.lpips(reconstruction, target, metric)
    return found


def record_axes(cfg: DictConfig) -> dict:
    """The run's choices that define what was attacked and how, as flat keys (what the report and W&B
    group by): data set, victim, its init, the client, the defense and its parameters. Taken from the
    config alone, so every rank of a run writes the same."""
    defense = cfg.get("defense") or {}
    init = cfg.model.get("init") or {}
    axes = {
        "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
        "model": str(cfg.model.factory.get("target") or cfg.model.factory._target_).rsplit(".", 1)[-1],
        "model.init": str(init.get("_target_", "")).rsplit(".", 1)[-1],
        **{f"model.init.{k}": v for k, v in init.items() if k != "_target_"},
        **{f"model.factory.{k}": v for k, v in cfg.model.factory.items() if not k.startswith("_")},
        **{f"client.{k}": v for k, v in cfg.client.items() if k != "_target_"},
        "defense": "+".join(defense) or "none",
        **{f"defense.{name}.{k}": v for name, node in defense.items() for k, v in node.items() if k != "_target_"},
    }
    return {k: (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in axes.items()}
