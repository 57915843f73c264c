"""Leakage against defense strength: the report's defense section (docs/studies/generated/defenses.md).

For each data set, defense, strength and attack: the share of trials reconstructed to MSE < 1e-3, the
median PSNR and the label accuracy (what still leaks), beside the defense's cost to the client: the
cosine similarity of the defended gradient to the true one and its relative error, averaged over the
trials (records' `defense_cosine`, `defense_relative_error`). The DLG paper's claims (Zhu et al. 2019,
Sec. 5) are set beside the numbers with a verdict by a stated rule.

Records know their defense from `axes` (experiment.record_axes): `defense` is the chain's name
("none", "gaussian", "clip+prune"), `defense.<name>.<key>` its parameters. A group pools records only
where everything but the seed and the run placement is equal: rows are keyed by the run's fingerprint
where records carry one, else by the run dir's config.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lightning_idlg.records.metrics import median
from lightning_idlg.report.runs import config_key, drop_config_where_unique

# the parameter that sets each defense's strength (configs/defense/*.yaml); fp16, int8: none
STRENGTH = {"gaussian": "variance", "laplace": "variance", "prune": "ratio", "topk": "keep", "clip": "max_norm",
            "dpsgd": "noise_multiplier"}
LEAK_FIDELITY, LEAK_PSNR = 0.05, 20.0  # the rule: a defense "stops the leak" when fidelity < 5% and PSNR < 20 dB
# (Sec. 5 of the DLG paper: defense, strengths the claim is about, what it says, whether a leak is claimed)
CLAIMS = (
    ("gaussian", (1e-4,), "Gaussian noise of variance 1e-4 does not stop the leak", True),
    ("gaussian", (1e-2, 1e-1), "Gaussian noise of variance 1e-2 and above stops it", False),
    ("laplace", (1e-4,), "Laplacian noise of variance 1e-4 does not stop the leak", True),
    ("laplace", (1e-2, 1e-1), "Laplacian noise of variance 1e-2 and above stops it", False),
    ("fp16", (None,), "half precision does not protect", True),
    ("prune", (0.01, 0.1), "pruning up to ~10-20% of the gradient does not stop the leak", True),
    ("prune", (0.3, 0.5, 0.7), "pruning above about 20% stops it", False),
)


@dataclass(frozen=True)
class Point:
    """One row: a data set, a defense at one strength, an attack, and one result-changing config."""

    dataset: str
    defense: str
    strength: float | None
    method: str
    config: str          # fingerprint of everything else (never pooled across)


def defense_point(record: dict) -> tuple[str, float | None]:
    """(defense name, strength) of a record; a chain's strength is its last strength-carrying part's."""
    axes = record.get("axes") or {}
    name = str(axes.get("defense", "none"))
    strength = None
    for part in name.split("+"):
        key = STRENGTH.get(part)
        if key is not None and f"defense.{part}.{key}" in axes:
            strength = float(axes[f"defense.{part}.{key}"])
    return name, strength


def leakage_rows(runs) -> list[dict]:
    """One row per Point with records: trials, fidelity (MSE < 1e-3), median PSNR, label accuracy, mean
    cosine and relative error of the defended gradient, and DP-SGD's epsilon where it applies."""
    groups: dict[Point, list[dict]] = defaultdict(list)
    for run in runs:
        for record in run.records:
            name, strength = defense_point(record)
            parts = name.split("+")
            dropped = {"defense"} | {f"defense.{p}.{STRENGTH[p]}" for p in parts if p in STRENGTH}
            config = config_key(record, run.config, dropped)
            groups[Point(str(record.get("dataset")), name, strength, record["method"], config)].append(record)
    rows = []
    for point, records in sorted(groups.items(), key=lambda kv: _rank(kv[0])):
        rows.append({
            "dataset": point.dataset, "defense": point.defense, "strength": point.strength, "method": point.method,
            "config": point.config, **_leak(records),
            "cosine": _mean([r.get("defense_cosine") for r in records]),
            "relative_error": _mean([r.get("defense_relative_error") for r in records]),
            "epsilon": _epsilon(records[0]) if "dpsgd" in point.defense else None,
        })
    drop_config_where_unique(rows, ("dataset", "defense", "strength", "method"))
    return rows


def _leak(records: list[dict]) -> dict:
    """What leaks over `records`: trials, share with MSE < 1e-3, median PSNR, label accuracy."""
    n = len(records)
    return {"trials": n, "fidelity": sum(1 for r in records if float(r["mse"]) < 1e-3) / n,
            "psnr": median([float(r["psnr"]) for r in records]),
            "label_accuracy": sum(bool(r["label_correct"]) for r in records) / n}


def verdicts(rows: list[dict]) -> list[dict]:
    """Each DLG-paper claim against our rows: per data set and attack, whether the leak stopped (fidelity
    < 5% and median PSNR < 20 dB) at the strengths the claim names, and whether that is what it says."""
    out = []
    for defense, strengths, text, leaks in CLAIMS:
        for row in rows:
            if row["defense"] != defense or row["strength"] not in strengths:
                continue
            leaked = row["fidelity"] >= LEAK_FIDELITY or row["psnr"] >= LEAK_PSNR
            out.append({**row, "claim": text, "leaked": leaked,
                        "verdict": "confirmed" if leaked == leaks else "contradicted"})
    return out


def plot_leakage(rows: list[dict], path: Path) -> bool:
    """Fidelity at 1e-3 (top) and median PSNR (bottom) against strength, one column per defense that has a
    strength, a line per data set and attack (the undefended value dotted). False when nothing to draw."""
    import matplotlib
    import matplotlib.lines

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defenses = [d for d in dict.fromkeys(r["defense"] for r in rows) if d in STRENGTH]
    if not defenses:
        return False
    figure, axes = plt.subplots(2, len(defenses), figsize=(3.2 * len(defenses), 5.6), squeeze=False)
    baseline = {(r["dataset"], r["method"]): r for r in rows if r["defense"] == "none"}
    # one colour per data set and attack in every panel (and its undefended value dotted in that colour)
    lines_of = sorted({(r["dataset"], r["method"]) for r in rows})
    colours = {key: f"C{i % 10}" for i, key in enumerate(lines_of)}
    for col, defense in enumerate(defenses):
        lines = defaultdict(list)
        for r in rows:
            if r["defense"] == defense and r["strength"] is not None:
                lines[r["dataset"], r["method"]].append(r)
        for (dataset, method), points in sorted(lines.items()):
            points.sort(key=lambda r: r["strength"])
            x = [r["strength"] for r in points]
            for row, key in ((0, "fidelity"), (1, "psnr")):
                axes[row, col].plot(x, [r[key] for r in points], marker="o", ms=3, color=colours[dataset, method],
                                    linestyle="-" if method == "idlg" else "--")
                if (dataset, method) in baseline:
                    axes[row, col].axhline(baseline[dataset, method][key], color=colours[dataset, method], lw=0.6,
                                           ls=":")
        for row, label in ((0, "fidelity (MSE < 1e-3)"), (1, "median PSNR (dB)")):
            axes[row, col].set_xscale("log" if defense in ("gaussian", "laplace", "dpsgd") else "linear")
            axes[row, col].set_xlabel(f"{defense}.{STRENGTH[defense]}")
            axes[row, col].grid(alpha=0.3)
            if col == 0:
                axes[row, col].set_ylabel(label)
        axes[0, col].set_title(defense)
        axes[0, col].set_ylim(-0.03, 1.03)
    handles = [matplotlib.lines.Line2D([], [], color=colours[d, m], marker="o", ms=3,
                                       linestyle="-" if m == "idlg" else "--", label=f"{d} {m}") for d, m in lines_of]
    figure.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def markdown_section(rows: list[dict], figure: str | None) -> list[str]:
    """The section's markdown: the table, the figure, the claims with verdicts."""
    if not any(r["defense"] != "none" for r in rows):
        return []
    lines = ["## Leakage against defense strength", "",
             "Per data set, defense, strength and attack: the share of trials reconstructed to MSE < 1e-3, the median "
             "PSNR and the label accuracy (what leaks), and the client's cost: cosine similarity of the defended "
             "gradient to the true one and its relative error ||g' - g|| / ||g||, averaged over the trials.", ""]
    show_config = any(r.get("config") for r in rows)
    header = ["data set", "defense", "strength", "attack", "trials", "MSE < 1e-3", "PSNR (dB)", "label",
              "cosine", "rel. error", "epsilon"] + (["config"] if show_config else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["dataset"], r["defense"], _fmt(r["strength"]), r["method"], str(r["trials"]),
                 f"{100 * r['fidelity']:.1f}%", _fmt(r["psnr"], ".1f"), f"{100 * r['label_accuracy']:.1f}%",
                 _fmt(r["cosine"], ".4f"), _fmt(r["relative_error"], ".3g"), _fmt(r["epsilon"], ".3g")]
        lines.append("| " + " | ".join(cells + ([r.get("config", "")] if show_config else [])) + " |")
    if figure:
        lines += ["", f"![leakage against defense strength]({figure})"]
    found = verdicts(rows)
    if found:
        lines += ["", "### The DLG paper's claims",
                  f"A defense stops the leak where fidelity < {LEAK_FIDELITY:.0%} and median PSNR < {LEAK_PSNR:g} dB.",
                  "", "| claim | data set | attack | strength | MSE < 1e-3 | PSNR (dB) | leak | verdict |",
                  "|---|---|---|---|---|---|---|---|"]
        for v in found:
            lines.append(f"| {v['claim']} | {v['dataset']} | {v['method']} | {_fmt(v['strength'])} | "
                         f"{100 * v['fidelity']:.1f}% | {_fmt(v['psnr'], '.1f')} | {'yes' if v['leaked'] else 'no'} | "
                         f"{v['verdict']} |")
    return lines + [""]


def _epsilon(record: dict) -> float | None:
    from lightning_idlg.case.defense import DPSGD

    axes = record.get("axes") or {}
    keys = ("max_grad_norm", "noise_multiplier", "reduction", "sample_rate", "rounds", "delta")
    params = {k: axes[f"defense.dpsgd.{k}"] for k in keys if f"defense.dpsgd.{k}" in axes}
    value = DPSGD(**params).epsilon()
    return value if math.isfinite(value) else None


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _rank(point: Point):
    order = ("none", "gaussian", "laplace", "fp16", "int8", "prune", "topk", "clip", "dpsgd")
    first = point.defense.split("+")[0]
    return (point.dataset, order.index(first) if first in order else len(order), point.defense,
            -1 if point.strength is None else point.strength, point.method, point.config)


def _fmt(value, spec: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return format(value, spec)


# -- any axes: lightning-idlg-report --by KEY,KEY ------------------------------------------------------------
def lookup(key: str, record: dict, flat_config: dict) -> tuple[str, object]:
    """(full key, value) of a --by key for a record: the record's own field, its `axes`, then its run's
    config; a short defense key finds its defense's (`defense.ratio` -> `defense.prune.ratio`). Value None
    where it has none."""
    axes = record.get("axes") or {}
    for source in (record, axes, flat_config):
        if key in source:
            return key, source[key]
    if key.startswith("defense.") and key.count(".") == 1:
        for name, value in axes.items():
            if name.startswith("defense.") and name.endswith("." + key.split(".")[1]):
                return name, value
    return key, None


def by_rows(runs, keys: list[str]) -> list[dict]:
    """One row per data set, value of each key in `keys`, attack and remaining config: trials, fidelity at
    1e-3, median PSNR, label accuracy. A `config` hash tells rows apart whose keys agree but whose other
    settings differ (they are never pooled)."""
    from lightning_idlg.records import paper

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        flat = paper.flatten(run.config)
        for record in run.records:
            found = [lookup(k, record, flat) for k in keys]
            values = tuple(value for _, value in found)
            groups[str(record.get("dataset")), values, record["method"],
                   config_key(record, run.config, {name for name, _ in found})].append(record)
    rows = []
    for (dataset, values, method, config), records in sorted(groups.items(), key=lambda kv: str(kv[0])):
        rows.append({"dataset": dataset, **dict(zip(keys, values)), "method": method, "config": config,
                     **_leak(records)})
    drop_config_where_unique(rows, ("dataset", *keys, "method"))
    return rows


def by_section(rows: list[dict], keys: list[str]) -> list[str]:
    if not rows:
        return []
    show_config = any(r["config"] for r in rows)
    header = ["data set", *keys, "attack", "trials", "MSE < 1e-3", "PSNR (dB)", "label"] + (["config"] * show_config)
    lines = [f"## By {', '.join(keys)}", "",
             "Rows pool records whose settings agree on everything but the seed, the number of trials and where "
             "they ran; a `config` hash tells apart rows whose keys agree but whose other settings differ.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["dataset"], *(_fmt(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys), r["method"],
                 str(r["trials"]), f"{100 * r['fidelity']:.1f}%", _fmt(r["psnr"], ".1f"),
                 f"{100 * r['label_accuracy']:.1f}%"]
        lines.append("| " + " | ".join(cells + ([r["config"]] if show_config else [])) + " |")
    return lines + [""]
