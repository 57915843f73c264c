"""The report's figures: fidelity against the MSE threshold (the paper's Figure 1) and reconstruction
progress strips (its Figure 2)."""

from __future__ import annotations

import re
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from PIL import Image

from lightning_idlg.records import paper
from lightning_idlg.records.schema import LAYOUT_KEY, LAYOUT_VALUE, METHOD_NAMES, METHOD_ORDER
from lightning_idlg.records.metrics import FIDELITY_THRESHOLDS
from lightning_idlg.report.format import sci
from lightning_idlg.report.runs import FIDELITY_KEYS, Run, base_variant, comparable, datasets_of, method_rank


COLORS = {"dlg": "tab:blue", "idlg": "tab:orange"}


MARKERS = {"dlg": "o", "idlg": "^"}


# ours by protocol (reliable: dash-dot-dot); the paper's own curves are dashed
LINES = {"paper": "-", "improved": "-.", "reliable": (0, (5, 1, 1, 1, 1, 1)), "custom": ":"}


# -- figures ------------------------------------------------------------------------------------------
def plot_fidelity(groups, path: Path) -> None:
    """One panel per data set: share of trials with MSE < t against t (log axis, 1e-2 down to 1e-4, as
    in the paper's Figure 1), ours solid (improved: dash-dot, reliable: dash-dot-dot, custom: dotted), the
    paper's dashed, drawn only where a row of the panel is the paper protocol or the improved or reliable
    preset."""
    datasets = datasets_of(groups)
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
                ax.plot(FIDELITY_THRESHOLDS, ours, linestyle=LINES.get(base_variant(variant), ":"),
                        marker=MARKERS.get(method, "o"), color=COLORS.get(method),
                        markersize=7 if method == "dlg" else 5,   # DLG's larger marker stays visible under iDLG's
                        label=f"{name} ({source}, n={g.summary['trials']})")
        for method in sorted(set(methods), key=method_rank):   # once per method, beside comparable rows only
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
    methods = sorted(by_method, key=method_rank) or [
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
            text += f"\n{r['status']}\nMSE {sci(float(r['mse']))}"
        labels.append(text)
    ax.set_yticks([pad + (i + 0.5) * cell - pad / 2 for i in range(rows)], labels, fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(strip.caption.replace("`", ""), fontsize=8)
    fig.savefig(out / strip.output, dpi=150)
