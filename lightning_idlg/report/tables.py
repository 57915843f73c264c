"""The report's tables as rows (CSV files and markdown tables read them): label accuracy, fidelity,
convergence, and the attack x victim x checkpoint table."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from lightning_idlg.records import paper
from lightning_idlg.records.metrics import median
from lightning_idlg.records.schema import STATUSES
from lightning_idlg.report.format import DASH
from lightning_idlg.report.runs import FIDELITY_KEYS, Run, SUCCESS_MSE, comparable, config_key, dataset_rank, drop_config_where_unique, method_rank, setting, value_text


# -- tables -------------------------------------------------------------------------------------------
def label_accuracy_rows(groups) -> list[dict]:
    rows = []
    for (dataset, variant), methods in groups.items():
        for method, g in methods.items():
            rows.append({
                "dataset": dataset,
                "protocol": variant,
                "method": method,
                "trials": g.summary["trials"],
                "correct": g.correct,
                "label_accuracy": g.summary["label_accuracy"],
                "paper_dataset": paper.DATASETS.get(dataset, ""),
                "paper_label_accuracy": _blank(paper.label_accuracy(dataset, method) if comparable(variant) else None),
            })
    return rows


def fidelity_rows(groups) -> list[dict]:
    rows = []
    for (dataset, variant), methods in groups.items():
        for method, g in methods.items():
            ours = g.summary["fidelity"]
            theirs = (paper.fidelity(dataset, method) if comparable(variant) else None) or {}
            row = {"dataset": dataset, "protocol": variant, "method": method, "trials": g.summary["trials"]}
            row.update({f"mse_below_{k}": ours[k] for k in FIDELITY_KEYS})
            row.update({f"paper_mse_below_{k}": _blank(theirs.get(k)) for k in FIDELITY_KEYS})
            rows.append(row)
    return rows


def convergence_rows(groups) -> list[dict]:
    rows = []
    for (dataset, variant), methods in groups.items():
        for method, g in methods.items():
            s = g.summary
            rows.append({
                "dataset": dataset,
                "protocol": variant,
                "method": method,
                "trials": s["trials"],
                **{status: s["status"][status] for status in STATUSES},
                "restarts": s["restarts"],              # total over the group's trials
                "median_steps_to_converge": s["steps_to_converge"],
                "median_evaluations_to_converge": s["evaluations_to_converge"],
                "median_psnr": s["psnr"],
                "median_ssim": s["ssim"],
                "median_lpips": s.get("lpips"),         # None (empty cell): no record of the group has LPIPS
                "median_mse": s["mse"],
                "median_seconds_per_trial": g.seconds_per_trial,
                "total_seconds": s["seconds"],
            })
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _blank(value):
    return "" if value is None else value


# -- attack x victim x checkpoint ---------------------------------------------------------------------
def victim_rows(runs: list[Run]) -> list[dict]:
    """One row per data set, attack, victim and checkpoint (and remaining config, as a hash where it is not
    the only one): trials, successes (MSE < 1e-3), median PSNR, SSIM and LPIPS (over the records that have
    it; None where none has). Victim and checkpoint come from each run's config, whatever the model's keys
    are, so a new victim or init needs no edit here."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        model = model_config(run)
        dropped = {k for k in setting(run.config) if k == "model" or k.startswith("model.")}
        for record in run.records:
            own = model if run.config else model_config(run, record)   # no config.yaml: the record's axes
            groups[str(record["dataset"]), record["method"], victim_name(own), checkpoint_name(own),
                   config_key(record, run.config, dropped)].append(record)
    rows = []
    for (dataset, method, victim, checkpoint, config), records in sorted(groups.items(), key=_victim_rank):
        lpips = [float(r["lpips"]) for r in records if "lpips" in r]
        rows.append({"dataset": dataset, "attack": method, "victim": victim, "checkpoint": checkpoint,
                     "config": config, "trials": len(records),
                     "successes": sum(1 for r in records if float(r["mse"]) < SUCCESS_MSE),
                     "median_psnr": median([float(r["psnr"]) for r in records]),
                     "median_ssim": median([float(r["ssim"]) for r in records]),
                     "median_lpips": median(lpips) if lpips else None, "lpips_trials": len(lpips)})
    drop_config_where_unique(rows, ("dataset", "attack", "victim", "checkpoint"))
    return rows


def model_config(run: Run, record: dict | None = None) -> dict:
    """The victim's flat `model.*` keys: from the run's config.yaml; without one, from the record's `axes`
    (class names, not import paths); with neither, the paper's victim (such a run counts as the paper's)."""
    flat = paper.flatten(run.config)
    if any(k.startswith("model.") for k in flat):
        return {k: v for k, v in flat.items() if k.startswith("model.")}
    axes = (record or {}).get("axes") or {}
    if "model" in axes:
        return {"model.factory._target_": axes["model"], "model.init._target_": axes.get("model.init"),
                **{k: v for k, v in axes.items() if k.startswith(("model.factory.", "model.init."))}}
    return {k: v for k, v in paper.PROTOCOL.items() if k.startswith("model.")}


def victim_name(model: dict) -> str:
    """"LeNet (activation=sigmoid, width=12)": the victim's class (an own model's `model.factory.target`) and
    every other key of its factory, so victims that differ in any setting get rows of their own."""
    target = model.get("model.factory.target") or model.get("model.factory._target_")
    if not target:
        return DASH
    keys = {k.split(".", 2)[2]: v for k, v in model.items()
            if k.startswith("model.factory.") and not k.split(".", 2)[2].startswith("_") and k != "model.factory.target"}
    return _named(str(target).rsplit(".", 1)[-1], keys)


def checkpoint_name(model: dict) -> str:
    """The victim's weights: a checkpoint's file name, else the init's class without `Init`, lower case, with
    its keys ("uniform (scale=0.5)", "default"); a config.yaml from before inits were classes (`init: uniform`,
    `init_scale: 0.5`) reads the same."""
    if model.get("model.init.path"):
        return Path(str(model["model.init.path"])).name
    target = model.get("model.init._target_") or model.get("model.init")
    if not target:
        return DASH
    name = str(target).rsplit(".", 1)[-1]
    name = (name[:-len("Init")] if name.endswith("Init") and name != "Init" else name).lower()
    keys = {k.split(".", 2)[2]: v for k, v in model.items()
            if k.startswith("model.init.") and not k.split(".", 2)[2].startswith("_") and k != "model.init.path"}
    keys.update({k[len("model.init_"):]: v for k, v in model.items() if k.startswith("model.init_")})  # init_scale
    return _named(name, keys)


def _named(name: str, keys: dict) -> str:
    return name + (" (" + ", ".join(f"{k}={value_text(v)}" for k, v in sorted(keys.items())) + ")" if keys else "")


def _victim_rank(item):
    dataset, method, victim, checkpoint, config = item[0]
    return (dataset_rank(dataset), method_rank(method), victim, checkpoint, config)
