"""The label study's outputs (lightning-idlg-labels, lightning_idlg/label_restoration.py): labels.csv, the
markdown table and the figure, one row per cell of the grid (data set x victim x client x strategy)."""

from __future__ import annotations

import csv
from pathlib import Path

LABEL_MODES = ("distinct", "repeated", "random")   # how a client's B labels are drawn
INIT_WORDS = {"UniformInit": "untrained, uniform init", "DefaultInit": "untrained, PyTorch init"}
SCORE_NAMES = ("exact", "count_accuracy", "instance_accuracy")
COLUMNS = ("dataset", "model", "activation", "init", "reduction", "client_mode", "defense", "labels",
           "batch_size", "strategy", "distinct_assumed", "clients", *SCORE_NAMES, "seed", "overrides")


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def victim_title(row: dict) -> str:
    """`LeNet (sigmoid), untrained, uniform init` / `ResNet-20, trained (final.pt)`: a row's victim in words."""
    init = str(row.get("init", ""))
    if init.startswith("CheckpointInit"):
        words = f"trained {init[len('CheckpointInit'):]}".strip()
    else:
        words = INIT_WORDS.get(init, init)
    activation = f" ({row['activation']})" if row.get("activation") else ""
    return f"{row['model']}{activation}, {words}" if words else f"{row['model']}{activation}"


def _victim(row: dict) -> tuple:
    return row["dataset"], row["model"], row["activation"], row.get("init", "")


def markdown(rows: list[dict]) -> str:
    """One table per (data set, victim, defense, label draw): strategies x B, cells `instance / exact` accuracy."""
    out = []
    groups = sorted({(*_victim(r), r["defense"], r["labels"]) for r in rows})
    for key in groups:
        cells = [r for r in rows if (*_victim(r), r["defense"], r["labels"]) == key]
        sizes = sorted({r["batch_size"] for r in cells})
        names = list(dict.fromkeys(r["strategy"] for r in cells))
        defense, mode = key[-2:]
        out.append(f"**{key[0]}, {victim_title(cells[0])}, defense {defense}, {mode} labels** "
                   f"({cells[0]['clients']} clients per cell; instance accuracy / exact-multiset accuracy)\n")
        out.append("| strategy | " + " | ".join(f"B={b}" for b in sizes) + " |")
        out.append("|---|" + "---|" * len(sizes))
        for name in names:
            by_b = {r["batch_size"]: r for r in cells if r["strategy"] == name}
            out.append(f"| {name} | " + " | ".join(
                f"{by_b[b]['instance_accuracy']:.3f} / {by_b[b]['exact']:.3f}" if b in by_b else "-" for b in sizes) + " |")
        out.append("")
    return "\n".join(out)


def figure(rows: list[dict]):
    """Instance (solid) and exact-multiset (dashed) accuracy against B: one row of panels per data set and
    victim, one column per label draw, one colour per strategy. A matplotlib Figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    victims = sorted({_victim(r) for r in rows})
    modes = [m for m in LABEL_MODES if any(r["labels"] == m for r in rows)]
    names = list(dict.fromkeys(r["strategy"] for r in rows))
    colours = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    fig, axes = plt.subplots(len(victims), len(modes), figsize=(4.2 * len(modes), 3.2 * len(victims)),
                             squeeze=False, sharex=True, sharey=True)
    for i, victim in enumerate(victims):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            mine = [r for r in rows if _victim(r) == victim and r["labels"] == mode]
            for name in names:
                cells = sorted((r for r in mine if r["strategy"] == name), key=lambda r: r["batch_size"])
                if cells:
                    x = [r["batch_size"] for r in cells]
                    ax.plot(x, [r["instance_accuracy"] for r in cells], "-o", ms=3, color=colours[name], label=name)
                    ax.plot(x, [r["exact"] for r in cells], "--", color=colours[name], alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            title = victim_title(next(r for r in rows if _victim(r) == victim))
            ax.set_title(f"{victim[0]}, {title},\n{mode} labels", fontsize=8)
            if i == len(victims) - 1:
                ax.set_xlabel("client batch size B")
        axes[i][0].set_ylabel("accuracy\n(solid: instance, dashed: exact)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(rows: list[dict], path: Path) -> None:
    """`figure` saved to `path`."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_csv(path: Path) -> list[dict]:
    """Rows of a labels.csv with numbers as numbers (to merge runs into one table or plot)."""
    rows = []
    for row in csv.DictReader(open(path)):
        row["batch_size"], row["clients"] = int(row["batch_size"]), int(row["clients"])
        row.update({s: float(row[s]) for s in SCORE_NAMES})
        rows.append(row)
    return rows


def write_outputs(rows: list[dict], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "labels.csv")
    (out_dir / "labels.md").write_text(markdown(rows))
    plot(rows, out_dir / "labels.png")
