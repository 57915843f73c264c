"""`lightning-idlg-report`: the paper's tables and figures from the per-trial records of finished runs.

    lightning-idlg-report RUN_DIR [RUN_DIR ...] [--out DIR] [--title TEXT] [--progress-trial N ...]

Every `trials.jsonl` below each argument is read (one run, or a whole Hydra multirun dir). Records are
grouped by data set (the record's `dataset` field, the loader name), variant and method. The variant comes
from the run's config.yaml (`paper.protocol_of`): "paper" when it is the paper protocol exactly (steps,
tolerance, optimizer, label rule, victim as `experiment=paper_*` sets them), "improved" when it is that
plus what the `_improved` presets add (a line search, restarts, patience), "reliable" when it is that with
what the `_reliable` presets change (patience 50, the best iterate kept), each followed by the keys that
differ from that preset ("improved: steps=100"); a run that differs from the paper otherwise is "custom:
steps=10". Runs are pooled into one row only when their configs agree on everything but the seed and
where and how they ran (`PLACEMENT`); where configs of the same variant differ, the differing keys are
added to the row's name. The paper's numbers stand beside "paper", "improved" and "reliable" rows only. The
numbers come from `results.summarize` and `metrics.fidelity`, the definitions the runs' own `summary.json` use.
Written into `--out`:

- `report.md`: runs and their commands, then the tables and figures below, with the paper's numbers beside
  ours where the paper has the data set (MNIST, CIFAR-100, LFW);
- `label_accuracy.csv`: the paper's Table 1;
- `fidelity.csv`, `fidelity.png`: share of trials with MSE below each threshold (the paper's Figure 1);
- `convergence.csv`: status counts, total restarts and medians (steps, evaluations, PSNR, SSIM, LPIPS where
  recorded, MSE, seconds per trial);
- `victims.csv`: per attack, victim (model and settings) and checkpoint (init or saved weights): successes and
  median PSNR, SSIM, LPIPS;
- `progress_*.png`: reconstruction strips with step labels, DLG row above iDLG (the paper's Figure 2).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import re
import shlex
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from PIL import Image

from lightning_idlg import leakage, paper
from lightning_idlg.metrics import FIDELITY_THRESHOLDS, median
from lightning_idlg.pictures import LAYOUT_KEY, LAYOUT_VALUE
from lightning_idlg.results import STATUSES, TRIALS_FILE, read_records, summarize, unique

METHOD_ORDER = ("dlg", "idlg")           # the order of the rows of a progress strip, too
METHOD_NAMES = {"dlg": "DLG", "idlg": "iDLG"}
DATASET_ORDER = ("mnist", "cifar100", "lfw", "digits", "faces", "image_folder")
PROTOCOLS = ("paper", "improved", "reliable", "custom")   # row order within a data set
FIDELITY_KEYS = paper.FIDELITY_KEYS      # "0.01" ... "0.0001", the keys of summarize()["fidelity"]
COLORS = {"dlg": "tab:blue", "idlg": "tab:orange"}
MARKERS = {"dlg": "o", "idlg": "^"}
# ours by protocol (reliable: dash-dot-dot); the paper's own curves are dashed
LINES = {"paper": "-", "improved": "-.", "reliable": (0, (5, 1, 1, 1, 1, 1)), "custom": ":"}
# config keys (and key prefixes) that may differ between pooled runs: which sample of trials (seed, trials),
# where the data lie, and where and how the run ran and was recorded; everything else changes what a trial
# measures, so runs that differ in it are never pooled
PLACEMENT = ("hydra", "seed", "trials", "trials_per_group", "continuous_batching", "threads", "progress_bar",
             "pictures", "progress_trials", "snapshot_every", "logger", "optimized_metric", "dataset.root",
             "dataset.download", "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
             "trainer.enable_checkpointing", "trainer.enable_progress_bar", "trainer.enable_model_summary",
             "trainer.num_sanity_val_steps",
             "metrics")   # evaluation only: adds numbers (metrics.lpips) to records, changes none
DASH = "—"
SUCCESS_MSE = 1e-3   # a trial "succeeds" below this MSE (the threshold the leakage tables use)


@dataclass
class Run:
    """One run dir (the folder of a trials.jsonl) and what it says about how it was made."""

    path: Path
    records: list[dict]
    config: dict = field(default_factory=dict)        # config.yaml (resolved), {} if absent
    overrides: list[str] | None = None                # .hydra/overrides.yaml, None if absent
    duplicates: int = 0                               # lines repeating a (method, index) of this run: ignored

    @property
    def command(self) -> str:
        if self.overrides is None:
            return ""
        return " ".join(["lightning-idlg", *(shlex.quote(o) for o in self.overrides)])

    @property
    def label(self) -> str:
        return _safe(self.path.name) or "run"

    @property
    def protocol(self) -> str:
        return variant_name(*paper.protocol_of(self.config))

    def method_config(self, method: str) -> dict:
        """The config as it applied to `method`'s trials: the other methods' settings left out."""
        methods = self.config.get("method")
        if not isinstance(methods, dict):
            return self.config
        return {**self.config, "method": {m: v for m, v in methods.items() if m == method}}


def protocol(config: dict) -> str:
    """"paper", "improved", "reliable" or "custom" (paper.protocol_of): "paper" only for the paper protocol
    exactly; a run without config.yaml ({}) counts as "paper", as before there were variants;
    `restart_distance` alone changes nothing (it only matters with restarts)."""
    return paper.protocol_of(config)[0]


def variant_name(name: str, differences: dict) -> str:
    """"paper", "improved", or the protocol with the keys that differ from its preset: "custom: steps=10"."""
    return name + (": " + ", ".join(f"{k}={_value(v)}" for k, v in differences.items()) if differences else "")


def _value(value) -> str:
    return "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def setting(config: dict) -> dict[str, str]:
    """The config keys that change what a trial measures (all but PLACEMENT), flat, values as text."""
    return {k: _value(v) for k, v in paper.flatten(config).items()
            if not any(k == p or k.startswith(p + ".") for p in PLACEMENT)}


def comparable(variant: str) -> bool:
    """Whether the paper's numbers belong beside a row: the paper protocol, the improved or reliable preset."""
    return variant in ("paper", "improved", "reliable")


@dataclass
class Group:
    """All records of one (data set, protocol, method), pooled over runs."""

    dataset: str
    protocol: str
    method: str
    records: list[dict]
    summary: dict                                     # results.summarize()[method]

    @property
    def seconds_per_trial(self) -> float:
        return median([float(r["seconds"]) for r in self.records])

    @property
    def correct(self) -> int:
        return sum(bool(r["label_correct"]) for r in self.records)


# -- reading ------------------------------------------------------------------------------------------
def find_runs(paths: list[str | Path]) -> list[Run]:
    """A Run for every trials.jsonl at or below each path (each file once), in natural order."""
    runs, seen = [], set()
    for path in map(Path, paths):
        if path.is_file() and path.name == TRIALS_FILE:
            files = [path]
        elif path.is_dir():
            files = sorted(path.rglob(TRIALS_FILE), key=lambda p: _natural(p.relative_to(path).as_posix()))
        else:
            raise FileNotFoundError(f"{path} is not a run dir or a {TRIALS_FILE}")
        if not files:
            raise FileNotFoundError(f"no {TRIALS_FILE} found at or below {path}")
        for file in files:
            if file.resolve() in seen:
                continue
            seen.add(file.resolve())
            runs.append(_load_run(file.parent))
    return runs


def _load_run(run_dir: Path) -> Run:
    config = _read_yaml(run_dir / "config.yaml") or {}
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    records, duplicates = unique(read_records(run_dir / TRIALS_FILE))  # each (method, index) of a run once
    fallback = str((config.get("dataset") or {}).get("_target_", "unknown")).rsplit(".", 1)[-1]
    for record in records:
        record.setdefault("dataset", fallback)
    return Run(run_dir, records, config if isinstance(config, dict) else {},
               [str(o) for o in overrides] if isinstance(overrides, list) else None, duplicates)


def _read_yaml(path: Path):
    if not path.exists():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None


def group_records(runs: list[Run]) -> dict[tuple[str, str], dict[str, Group]]:
    """{(dataset, variant): {method: Group}}, data sets in the paper's order first, then paper, improved,
    reliable, custom variants, methods DLG then iDLG. Records pool only across runs whose settings (`setting`)
    agree."""
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    settings: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for run in runs:                    # the variant is the run's (its config), not the record's
        for method in sorted({r["method"] for r in run.records}, key=_method_rank):
            config = run.method_config(method)
            base = variant_name(*paper.protocol_of(config))
            own = setting(config)
            signature = tuple(sorted(own.items()))
            for record in run.records:
                if record["method"] == method:
                    by_key[str(record["dataset"]), base, method, signature].append(record)
                    settings[str(record["dataset"]), base, method][signature] = own
    records_of: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(dict)
    for (dataset, base, method, signature), records in by_key.items():
        variant = base + _distinguishing(settings[dataset, base, method], signature)
        records_of[dataset, variant][method] = records
    groups = {}
    for key in sorted(records_of, key=_key_rank):
        groups[key] = {}
        for method in sorted(records_of[key], key=_method_rank):
            records = records_of[key][method]
            groups[key][method] = Group(*key, method, records, summarize(records)[method])
    return groups


def _distinguishing(settings: dict[tuple, dict], signature: tuple) -> str:
    """"" when one setting has this variant; else "; " and the keys in which this one differs from the
    others with its values (so that two settings never share a row)."""
    if len(settings) < 2:
        return ""
    own = settings[signature]
    keys = sorted({k for other in settings.values() for k in set(other) | set(own)
                   if any(other.get(k) != own.get(k) for other in settings.values())})
    return "; " + ", ".join(f"{k}={own[k] if k in own else '(unset)'}" for k in keys)


def _dataset_rank(name: str):
    return (DATASET_ORDER.index(name) if name in DATASET_ORDER else len(DATASET_ORDER), name)


def _key_rank(key: tuple[str, str]):
    dataset, variant = key
    base = _base(variant)
    return (_dataset_rank(dataset), PROTOCOLS.index(base) if base in PROTOCOLS else len(PROTOCOLS), variant)


def _base(variant: str) -> str:
    """The protocol a variant name starts with: "custom: steps=10" -> "custom"."""
    return variant.split(":")[0].split(";")[0]


def _row_label(dataset: str, variant: str) -> str:
    """The data set as a table row names it: paper-protocol rows by the data set alone, as before."""
    return dataset if variant == "paper" else f"{dataset}, {variant}"


def _datasets(groups) -> list[str]:
    return list(dict.fromkeys(dataset for dataset, _ in groups))


def _method_rank(name: str):
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


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
                   leakage._config_key(record, run.config, dropped)].append(record)
    rows = []
    for (dataset, method, victim, checkpoint, config), records in sorted(groups.items(), key=_victim_rank):
        lpips = [float(r["lpips"]) for r in records if "lpips" in r]
        rows.append({"dataset": dataset, "attack": method, "victim": victim, "checkpoint": checkpoint,
                     "config": config, "trials": len(records),
                     "successes": sum(1 for r in records if float(r["mse"]) < SUCCESS_MSE),
                     "median_psnr": median([float(r["psnr"]) for r in records]),
                     "median_ssim": median([float(r["ssim"]) for r in records]),
                     "median_lpips": median(lpips) if lpips else None, "lpips_trials": len(lpips)})
    leakage._drop_config_where_unique(rows, ("dataset", "attack", "victim", "checkpoint"))
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
    return name + (" (" + ", ".join(f"{k}={_value(v)}" for k, v in sorted(keys.items())) + ")" if keys else "")


def _victim_rank(item):
    dataset, method, victim, checkpoint, config = item[0]
    return (_dataset_rank(dataset), _method_rank(method), victim, checkpoint, config)


def victim_section(rows: list[dict]) -> list[str]:
    """The markdown table of `victim_rows`."""
    show_config = any(r["config"] for r in rows)
    header = ["data set", "attack", "victim", "checkpoint", "trials", "MSE < 1e-3", "PSNR (dB)", "SSIM", "LPIPS"]
    lines = ["## Attack, victim and checkpoint", "",
             "Per attack, victim (its model and settings) and checkpoint (the victim's weights: an init drawn per "
             "trial, or a saved network's file): trials, successes (final MSE < 1e-3), medians of PSNR and SSIM "
             "(images clamped to [0, 1]) and of LPIPS over the trials that recorded it (`metrics.lpips=...`; "
             f"{DASH}: none did; (n): fewer than all). Rows pool records whose settings agree on everything but "
             "the seed, the number of trials and where they ran; a `config` hash tells apart rows whose columns "
             "agree but whose other settings differ.", "",
             *_table(header + ["config"] * show_config, [[
                 r["dataset"], METHOD_NAMES.get(r["attack"], r["attack"]), r["victim"], r["checkpoint"], r["trials"],
                 f"{r['successes']}/{r['trials']}", _num(r["median_psnr"], ".1f"), _num(r["median_ssim"], ".3f"),
                 _num(r["median_lpips"], ".3f") + (f" ({r['lpips_trials']})"
                                                  if 0 < r["lpips_trials"] < r["trials"] else ""),
                 *([r["config"]] * show_config)] for r in rows]),
             "", "CSV: `victims.csv`.", ""]
    return lines


# -- figures ------------------------------------------------------------------------------------------
def plot_fidelity(groups, path: Path) -> None:
    """One panel per data set: share of trials with MSE < t against t (log axis, 1e-2 down to 1e-4, as
    in the paper's Figure 1), ours solid (improved: dash-dot, reliable: dash-dot-dot, custom: dotted), the
    paper's dashed, drawn only where a row of the panel is the paper protocol or the improved or reliable
    preset."""
    datasets = _datasets(groups)
    n = len(datasets)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.4 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, dataset in zip(axes, datasets):
        methods = []
        for (d, variant), by_method in groups.items():
            if d != dataset:
                continue
            for method, g in by_method.items():
                if comparable(variant):
                    methods.append(method)
                name = METHOD_NAMES.get(method, method)
                source = "ours" if variant == "paper" else f"ours, {variant}"
                ours = [100 * g.summary["fidelity"][k] for k in FIDELITY_KEYS]
                ax.plot(FIDELITY_THRESHOLDS, ours, linestyle=LINES.get(_base(variant), ":"),
                        marker=MARKERS.get(method, "o"), color=COLORS.get(method),
                        markersize=7 if method == "dlg" else 5,   # DLG's larger marker stays visible under iDLG's
                        label=f"{name} ({source}, n={g.summary['trials']})")
        for method in sorted(set(methods), key=_method_rank):   # once per method, beside comparable rows only
            theirs = paper.fidelity(dataset, method)
            if theirs:
                ax.plot(FIDELITY_THRESHOLDS, [100 * theirs[k] for k in FIDELITY_KEYS], "--",
                        color=COLORS.get(method), alpha=0.7, marker=MARKERS.get(method, "o"), markersize=4,
                        markerfacecolor="white",
                        label=f"{METHOD_NAMES.get(method, method)} (paper, n={paper.TRIALS})")
        ax.set_xscale("log")
        ax.set_xlim(max(FIDELITY_THRESHOLDS) * 1.3, min(FIDELITY_THRESHOLDS) / 1.3)   # reversed, as the paper
        ax.set_xticks(FIDELITY_THRESHOLDS, [f"{t:g}" for t in FIDELITY_THRESHOLDS], fontsize=8)
        ax.minorticks_off()
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        title = dataset + (f"  (paper: {paper.DATASETS[dataset]})" if dataset in paper.DATASETS else "")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("MSE threshold t")
        ax.set_ylabel("trials with MSE < t (%)")
        ax.legend(fontsize=7, loc="lower left")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle("Fidelity: share of trials below each MSE threshold", fontsize=11)
    fig.savefig(path, dpi=120)


@dataclass
class Strip:
    """A progress picture to show: which run and trial, and where the labelled copy went."""

    run: Run
    source: Path
    index: int
    output: str
    dataset: str = ""
    caption: str = ""


def choose_strips(runs: list[Run], trials: list[int] | None) -> list[Strip]:
    """The chosen trials' progress_NNNNN.png of every run (default: the first one each run has)."""
    strips = []
    for run in runs:
        pictures = run.path / "pictures"
        if trials:
            files = [pictures / f"progress_{i:05d}.png" for i in trials]
            files = [f for f in files if f.exists()]
        else:
            files = sorted(pictures.glob("progress_*.png"))[:1]
        for file in files:
            match = re.fullmatch(r"progress_(\d+)\.png", file.name)
            if match:
                index = int(match.group(1))
                strips.append(Strip(run, file, index, f"progress_{len(strips):02d}_{run.label}_{index:05d}.png"))
    return strips


def plot_progress(strip: Strip, out: Path) -> None:
    """A run's own labelled strip (pictures.py) is copied as it is; an older, unlabelled one is drawn with
    its step under each column and its method (status, final MSE) beside each row; one whose geometry
    cannot be read is copied as it is."""
    run, records = strip.run, [r for r in strip.run.records if int(r["index"]) == strip.index]
    by_method = {r["method"]: r for r in records}
    methods = sorted(by_method, key=_method_rank) or [
        m for m in METHOD_ORDER if m in (run.config.get("method") or METHOD_ORDER)]
    first = records[0] if records else {}
    strip.dataset = str(first.get("dataset", ""))
    strip.caption = (f"{strip.dataset or 'run'} trial {strip.index}"
                     + (f" (image {first['image_index']}, label {first['label']})" if first else "")
                     + f", run `{run.path}`")
    with Image.open(strip.source) as picture:
        labelled = picture.text.get(LAYOUT_KEY) == LAYOUT_VALUE if hasattr(picture, "text") else False
    if labelled:
        shutil.copyfile(strip.source, out / strip.output)
        return
    image = imread(strip.source)
    height, width = image.shape[:2]
    pad, rows = 2, max(1, len(methods))        # torchvision make_grid: 2 px padding around every tile
    cell = (height - pad) / rows
    cols = round((width - pad) / cell) if cell > 0 else 0
    if cell != int(cell) or cols < 1 or abs(cols * cell + pad - width) > 0.5:
        shutil.copyfile(strip.source, out / strip.output)
        return
    every = int(run.config.get("snapshot_every", 10) or 10)
    scale = max(0.42, 0.012 * cell)            # inches per tile
    fig = Figure(figsize=(cols * scale + 2.2, rows * scale + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([pad + (j + 0.5) * cell - pad / 2 for j in range(cols)], [str(j * every) for j in range(cols)],
                  fontsize=7)
    ax.set_xlabel(f"step (a snapshot every {every}; 0: the random start)", fontsize=8)
    labels = []
    for m in methods:
        r = by_method.get(m)
        text = METHOD_NAMES.get(m, m)
        if r:
            text += f"\n{r['status']}\nMSE {_sci(float(r['mse']))}"
        labels.append(text)
    ax.set_yticks([pad + (i + 0.5) * cell - pad / 2 for i in range(rows)], labels, fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(strip.caption.replace("`", ""), fontsize=8)
    fig.savefig(out / strip.output, dpi=150)


# -- markdown -----------------------------------------------------------------------------------------
def _pct(share) -> str:
    return DASH if share is None or math.isnan(share) else f"{100 * share:.1f}"


def _num(value, fmt: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return format(value, fmt)


def _sci(value: float) -> str:
    return f"{value:.2g}" if math.isfinite(value) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines


NO_STRIPS = "No progress pictures found (`pictures/progress_NNNNN.png` in the run dirs)."
STRIPS_LEFT_OUT = ("Left out of this report (`--no-progress`); each run keeps its own in "
                   "`pictures/progress_NNNNN.png`.")


def markdown(title: str, runs: list[Run], groups, strips: list[Strip], warnings: list[str],
             preface: str = "", no_strips: str = NO_STRIPS) -> str:
    lines = [f"# {title}", ""]
    if preface.strip():  # the author's words (commands, what differs from the paper and why) before the numbers
        lines += [preface.strip(), ""]
    lines += [
             f"{sum(len(r.records) for r in runs)} trial records from {len(runs)} run(s), grouped by data set "
             "(the loader that produced the images), variant and method. Variant: *paper* (the paper protocol "
             "exactly, `experiment=paper_*`), *improved* (that plus a line search, restarts and patience, "
             "`experiment=paper_*_improved`), *reliable* (that with patience 50 and the best iterate kept, "
             "`experiment=paper_*_reliable`), or *custom* (differs from the paper otherwise), followed by the "
             "config keys that differ from the preset (e.g. \"custom: steps=10\"). Runs share a row only when "
             "their configs agree on everything but the seed, the number of trials and where and how they ran; "
             "the paper's numbers stand beside *paper*, *improved* and *reliable* rows only. "
             f"Paper: {paper.SOURCE}.", ""]

    lines += ["## Runs", ""]
    lines += _table(["run dir", "data set", "variant", "records (DLG / iDLG / other)", "dataset.root",
                     "command"], [[
        f"`{run.path}`",
        ", ".join(sorted({str(r["dataset"]) for r in run.records}, key=_dataset_rank)) or DASH,
        run.protocol,
        " / ".join(str(n) for n in _method_counts(run.records)),
        f"`{(run.config.get('dataset') or {}).get('root')}`" if (run.config.get("dataset") or {}).get("root")
        else DASH,
        f"`{run.command}`" if run.command else "(no .hydra/overrides.yaml)",
    ] for run in runs])
    lines.append("")

    lines += ["## Label accuracy (the paper's Table 1)", "",
              "Share of trials whose recovered label is the true one, in percent (correct / trials). "
              f"Paper: {paper.TRIALS:,} trials per data set; {DASH}: the paper has no such data set.", ""]
    header, rows = ["data set"], []
    methods = _all_methods(groups)
    for m in methods:
        header += [f"{METHOD_NAMES.get(m, m)} ours", f"{METHOD_NAMES.get(m, m)} paper"]
    for (dataset, variant), by_method in groups.items():   # the paper's value beside improved rows too
        row = [_row_label(dataset, variant) + (f" ({paper.DATASETS[dataset]})" if dataset in paper.DATASETS else "")]
        for m in methods:
            g = by_method.get(m)
            row.append(f"{_pct(g.summary['label_accuracy'])} ({g.correct}/{g.summary['trials']})" if g else DASH)
            row.append(_pct(paper.label_accuracy(dataset, m) if comparable(variant) else None))
        rows.append(row)
    lines += _table(header, rows) + ["", "CSV: `label_accuracy.csv` (shares in [0, 1]).", ""]

    lines += ["## Fidelity (the paper's Figure 1)", "",
              "Share of trials (percent) with final MSE (all pixels, raw unclamped values) strictly below each "
              "threshold; a diverged or NaN trial counts as a failure. The paper's values are "
              f"{paper.FIDELITY_NOTE}.", "", "![fidelity](fidelity.png)", ""]
    header = ["data set", "method", "source", "trials"] + [f"MSE < {k}" for k in FIDELITY_KEYS]
    rows = []
    for dataset in _datasets(groups):   # per method: our protocols' rows, then the paper's row once
        for m in _all_methods({k: v for k, v in groups.items() if k[0] == dataset}):
            name = METHOD_NAMES.get(m, m)
            for (d, variant), by_method in groups.items():
                if d == dataset and m in by_method:
                    g = by_method[m]
                    rows.append([_row_label(dataset, variant), name, "ours", g.summary["trials"]]
                                + [_pct(g.summary["fidelity"][k]) for k in FIDELITY_KEYS])
            theirs = paper.fidelity(dataset, m)
            if theirs and any(d == dataset and m in by_method and comparable(variant)
                              for (d, variant), by_method in groups.items()):
                rows.append([dataset, name, f"paper ({paper.DATASETS[dataset]})", paper.TRIALS]
                            + [_pct(theirs[k]) for k in FIDELITY_KEYS])
    lines += _table(header, rows) + ["", "CSV: `fidelity.csv` (shares in [0, 1]).", ""]

    lines += ["## Reconstruction progress (the paper's Figure 2)", ""]
    if strips:
        lines += ["Dummy data every few steps from the random start (left) to the step the trial stopped at "
                  "(right), DLG row above iDLG row, shown clamped to [0, 1]; the same image and network for both.",
                  ""]
        for strip in strips:
            lines += [f"![{strip.caption}]({strip.output})", "", f"*{strip.caption}*", ""]
    else:
        lines += [no_strips, ""]

    lines += ["## Convergence", "",
              "Status counts; medians of steps and objective evaluations over converged trials, of PSNR / SSIM "
              "(images clamped to [0, 1]) and MSE over all trials; seconds per trial = a batch's wall time "
              "divided by its trials; restarts = total over the trials (the paper protocol has none; records "
              "from before restarts count 0).", ""]
    converged = convergence_rows(groups)
    lpips = any(r["median_lpips"] is not None for r in converged)   # a column only where some run recorded it
    header = ["data set", "method", "trials", *STATUSES, "steps", "evaluations", "PSNR (dB)", "SSIM",
              *["LPIPS"] * lpips, "MSE", "s / trial", "restarts"]
    rows = [[_row_label(r["dataset"], r["protocol"]), METHOD_NAMES.get(r["method"], r["method"]), r["trials"],
             *(r[s] for s in STATUSES), _num(r["median_steps_to_converge"]),
             _num(r["median_evaluations_to_converge"]), _num(r["median_psnr"], ".1f"), _num(r["median_ssim"], ".3f"),
             *[_num(r["median_lpips"], ".3f")] * lpips,
             _sci(r["median_mse"]) if not math.isnan(r["median_mse"]) else DASH,
             _num(r["median_seconds_per_trial"], ".3g"), r["restarts"]] for r in converged]
    lines += _table(header, rows) + ["", "CSV: `convergence.csv`.", ""]

    lines += ["## Notes", ""]
    lines += [f"- {w}" for w in warnings]
    lines += [f"- Paper numbers: {paper.SOURCE}; fidelity values {paper.FIDELITY_NOTE}. The paper runs "
              f"{paper.TRIALS:,} trials per data set with one random image each; with fewer trials ours carry "
              "sampling error (one trial in n moves a share by 100/n points)."]
    lines += ["", "## Made with", "", *[f"- {item}" for item in provenance()]]
    return "\n".join(lines) + "\n"


def provenance() -> list[str]:
    """When, with which versions and on what machine this report was written (the runs' own machine may
    differ: their records carry seconds, not hardware)."""
    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    packages = ", ".join(f"{name} {v(name)}" for name in ("lightning_idlg", "torch", "torchvision", "lightning",
                                                          "torchmetrics", "hydra-core"))
    return [f"written {datetime.datetime.now().astimezone().isoformat(timespec='minutes')}",
            f"{packages}; Python {platform.python_version()}",
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs ({_cpu_model()})"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU model unknown"


def _method_counts(records: list[dict]) -> list[int]:
    counts = Counter(r["method"] for r in records)
    return [counts.get("dlg", 0), counts.get("idlg", 0), sum(v for k, v in counts.items() if k not in METHOD_ORDER)]


def _all_methods(groups) -> list[str]:
    return sorted({m for by_method in groups.values() for m in by_method}, key=_method_rank)


def notes(runs: list[Run], groups) -> list[str]:
    """Facts a reader needs to weigh the numbers: data provenance and what pooling mixed."""
    found = []
    subset_sets = [d for d in ("cifar100", "lfw") if d in _datasets(groups)]
    if subset_sets:
        names = " / ".join(paper.DATASETS[d] for d in subset_sets)
        found.append(
            f"{names}: the images attacked here are the seeded draws from the files under `dataset.root` listed "
            "in Runs. When that folder holds a subset (e.g. a shared local copy of part of the test split, "
            "which need not be a uniform sample), these are not the paper's samples: compare rates, not "
            "individual trials, and name the rows after the subset actually used.")
    beyond = [p for p in ("improved", "reliable") if any(_base(variant) == p for _, variant in groups)]
    if beyond:
        found.append(f"{' and '.join(beyond).capitalize()} rows come from runs with a line search, restarts or "
                     f"patience (the {' and '.join(f'`experiment=paper_*_{p}`' for p in beyond)} presets): not the "
                     "paper's protocol. The paper's numbers beside them are for comparison; a same-seed "
                     "paper-protocol run is the like-for-like baseline.")
    for run in runs:
        if run.duplicates:
            found.append(f"`{run.path}`: {run.duplicates} line(s) of its trials.jsonl repeat a (method, trial "
                         "index) of the same run (e.g. two runs once wrote into it at the same time); each "
                         "trial is counted once, from its first line.")
    odd = [_row_label(d, v) for d, v in groups if not comparable(v)]
    if odd:
        found.append(f"Not the paper protocol, and not the improved or reliable preset either: {'; '.join(odd)}. "
                     "Each differs from its preset in the config keys its name lists, so the paper's numbers are not shown "
                     "beside it.")
    bare = [run for run in runs if not run.config]
    if bare:
        found.append(f"{len(bare)} run(s) without config.yaml are counted as the paper protocol: "
                     + ", ".join(f"`{run.path}`" for run in bare) + ".")
    for (dataset, variant), by_method in groups.items():
        label = _row_label(dataset, variant)
        for m, g in by_method.items():
            keys = Counter((r.get("seed"), r.get("index")) for r in g.records)
            repeated = sum(n - 1 for n in keys.values() if n > 1)
            if repeated:
                found.append(f"{label} / {METHOD_NAMES.get(m, m)}: {repeated} record(s) repeat a (seed, trial "
                             "index) already counted from another run; pooled as they are.")
        trials = max(g.summary["trials"] for g in by_method.values())
        images = {r.get("image_index") for g in by_method.values() for r in g.records}
        if len(images) < trials:
            found.append(f"{label}: {len(images)} distinct images among {trials} trials per method (a run "
                         "draws images again once its trials exceed the data set, and runs may share images).")
    return found


# -- entry point --------------------------------------------------------------------------------------
def write_report(run_dirs: list[str | Path], out: str | Path, title: str = "DLG / iDLG report",
                 progress_trials: list[int] | None = None, progress_from: list[str | Path] | None = None,
                 report_name: str = "report.md", preface: str = "", by: list[str] | None = None,
                 defenses_only: bool = False) -> Path:
    """Read every trials.jsonl below `run_dirs` and write report.md, the CSVs and the PNGs into `out`.
    `progress_from`: draw progress strips only of the runs at or below these paths ([]: none), e.g. only of
    the built-in images when the others' terms do not allow publishing reconstructions of them."""
    runs = find_runs(run_dirs)
    groups = group_records(runs)
    if not groups:
        raise FileNotFoundError("the trials.jsonl files found hold no records: " + ", ".join(map(str, run_dirs)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    strips = []
    if not defenses_only:  # (a defenses page shares docs/studies/generated/ with results.md: leave its files alone)
        write_csv(out / "label_accuracy.csv", label_accuracy_rows(groups))
        write_csv(out / "fidelity.csv", fidelity_rows(groups))
        write_csv(out / "convergence.csv", convergence_rows(groups))
        plot_fidelity(groups, out / "fidelity.png")
        shown = runs if progress_from is None else [r for r in runs if _under(r.path, progress_from)]
        strips = choose_strips(shown, progress_trials)
        for strip in strips:
            plot_progress(strip, out)
    report = out / report_name
    no_strips = STRIPS_LEFT_OUT if progress_from == [] else NO_STRIPS
    text = markdown(title, runs, groups, strips, notes(runs, groups), preface, no_strips)
    text += "\n".join(_axes_sections(runs, out, by or []))
    if defenses_only:  # docs/studies/generated/defenses.md: the runs, the leakage section, the --by table, how it was made
        parts = text.split("\n## ")[1:]
        order = ("Runs", "Leakage against", "By ", "Made with")
        kept = sorted((p.rstrip("\n") + "\n" for p in parts if p.startswith(order)),
                      key=lambda p: [p.startswith(o) for o in order].index(True))
        text = "\n".join([f"# {title}\n", *([preface.strip() + "\n"] if preface.strip() else []),
                          *("## " + p for p in kept)])
    report.write_text(text)
    return report


def _axes_sections(runs: list[Run], out: Path, by: list[str]) -> list[str]:
    """The attack x victim x checkpoint table (victims.csv), the defense section (where some run had a
    defense: leakage.csv, leakage.png) and the --by table."""
    lines = []
    victims = victim_rows(runs)
    write_csv(out / "victims.csv", victims)
    lines += ["", *victim_section(victims)]
    rows = leakage.leakage_rows(runs)
    if any(r["defense"] != "none" for r in rows):
        write_csv(out / "leakage.csv", rows)
        drawn = leakage.plot_leakage(rows, out / "leakage.png")
        lines += ["", *leakage.markdown_section(rows, "leakage.png" if drawn else None)]
    if by:
        table = leakage.by_rows(runs, by)
        write_csv(out / "by.csv", table)
        lines += ["", *leakage.by_section(table, by)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-idlg-report",
        description="Tables and figures of the iDLG paper (label accuracy, fidelity, progress, convergence) "
                    "from the trials.jsonl of runs or Hydra multirun dirs, with the paper's numbers beside ours.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run dir or a multirun dir; every trials.jsonl below it is read")
    parser.add_argument("--out", help="output folder (default: the RUN_DIR if one is given, else report/)")
    parser.add_argument("--title", default="DLG / iDLG report", help="heading of report.md")
    parser.add_argument("--progress-trial", type=int, action="append", metavar="INDEX", dest="progress_trials",
                        help="trial index whose progress picture to show, per run (repeatable; default: the "
                             "first progress picture of each run)")
    parser.add_argument("--progress-from", action="append", metavar="RUN_DIR", dest="progress_from",
                        help="draw progress pictures only of the runs at or below this path (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress pictures at all")
    parser.add_argument("--report-name", default="report.md", help="file name of the markdown report")
    parser.add_argument("--preface", metavar="FILE", help="markdown put under the title (e.g. commands, notes)")
    parser.add_argument("--defenses-only", action="store_true",
                        help="write only the runs, the leakage-against-defense-strength section and --by tables")
    parser.add_argument("--by", metavar="KEY,KEY", help="also tabulate by these record or config keys, e.g. "
                        "defense,defense.ratio or client.batch_size (rows never pool unlike configs)")
    args = parser.parse_args(argv)
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else "report")
    progress_from = [] if args.no_progress else args.progress_from
    try:
        preface = Path(args.preface).read_text() if args.preface else ""
        by = [key.strip() for key in args.by.split(",") if key.strip()] if args.by else []
        report = write_report(args.run_dirs, out, args.title, args.progress_trials, progress_from, args.report_name,
                              preface, by, args.defenses_only)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


def _under(path: Path, roots: list[str | Path]) -> bool:
    path = Path(path).resolve()
    return any(path == Path(root).resolve() or Path(root).resolve() in path.parents for root in roots)


def _natural(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


if __name__ == "__main__":
    sys.exit(main())
