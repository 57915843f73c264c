"""report.md: one function per section (runs, label accuracy, fidelity, progress, convergence, notes, how it
was made), each returning its lines; `markdown` joins them."""

from __future__ import annotations

import datetime
import math
import os
import platform
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from lightning_idlg.records import paper
from lightning_idlg.records.schema import METHOD_NAMES, STATUSES
from lightning_idlg.report.figures import Strip
from lightning_idlg.report.format import DASH, num, pct, sci, table
from lightning_idlg.report.runs import FIDELITY_KEYS, Run, all_methods, base_variant, comparable, dataset_rank, datasets_of, method_counts, row_label
from lightning_idlg.report.tables import convergence_rows


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
             *table(header + ["config"] * show_config, [[
                 r["dataset"], METHOD_NAMES.get(r["attack"], r["attack"]), r["victim"], r["checkpoint"], r["trials"],
                 f"{r['successes']}/{r['trials']}", num(r["median_psnr"], ".1f"), num(r["median_ssim"], ".3f"),
                 num(r["median_lpips"], ".3f") + (f" ({r['lpips_trials']})"
                                                  if 0 < r["lpips_trials"] < r["trials"] else ""),
                 *([r["config"]] * show_config)] for r in rows]),
             "", "CSV: `victims.csv`.", ""]
    return lines


NO_STRIPS = "No progress pictures found (`pictures/progress_NNNNN.png` in the run dirs)."


STRIPS_LEFT_OUT = ("Left out of this report (`--no-progress`); each run keeps its own in "
                   "`pictures/progress_NNNNN.png`.")


def markdown(title: str, runs: list[Run], groups, strips: list[Strip], warnings: list[str],
             preface: str = "", no_strips: str = NO_STRIPS) -> str:
    """report.md: the title, the author's preface (commands, what differs from the paper and why), then a
    section each."""
    lines = [f"# {title}", ""]
    if preface.strip():
        lines += [preface.strip(), ""]
    for section in (intro_section(runs), runs_section(runs), label_section(groups), fidelity_section(groups),
                    progress_section(strips, no_strips), convergence_section(groups), notes_section(warnings)):
        lines += section
    return "\n".join(lines) + "\n"


def intro_section(runs: list[Run]) -> list[str]:
    """What the rows are: how records are grouped, the variants, when runs pool."""
    lines: list[str] = []
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
    return lines


def runs_section(runs: list[Run]) -> list[str]:
    """## Runs: every run dir with its data set, variant, record counts, data root and command."""
    lines: list[str] = []
    lines += ["## Runs", ""]
    lines += table(["run dir", "data set", "variant", "records (DLG / iDLG / other)", "dataset.root",
                     "command"], [[
        f"`{run.path}`",
        ", ".join(sorted({str(r["dataset"]) for r in run.records}, key=dataset_rank)) or DASH,
        run.protocol,
        " / ".join(str(n) for n in method_counts(run.records)),
        f"`{(run.config.get('dataset') or {}).get('root')}`" if (run.config.get("dataset") or {}).get("root")
        else DASH,
        f"`{run.command}`" if run.command else "(no .hydra/overrides.yaml)",
    ] for run in runs])
    lines.append("")
    return lines


def label_section(groups) -> list[str]:
    """## Label accuracy (the paper's Table 1), ours beside the paper's."""
    lines: list[str] = []
    lines += ["## Label accuracy (the paper's Table 1)", "",
              "Share of trials whose recovered label is the true one, in percent (correct / trials). "
              f"Paper: {paper.TRIALS:,} trials per data set; {DASH}: the paper has no such data set.", ""]
    header, rows = ["data set"], []
    methods = all_methods(groups)
    for m in methods:
        header += [f"{METHOD_NAMES.get(m, m)} ours", f"{METHOD_NAMES.get(m, m)} paper"]
    for (dataset, variant), by_method in groups.items():   # the paper's value beside improved rows too
        row = [row_label(dataset, variant) + (f" ({paper.DATASETS[dataset]})" if dataset in paper.DATASETS else "")]
        for m in methods:
            g = by_method.get(m)
            row.append(f"{pct(g.summary['label_accuracy'])} ({g.correct}/{g.summary['trials']})" if g else DASH)
            row.append(pct(paper.label_accuracy(dataset, m) if comparable(variant) else None))
        rows.append(row)
    lines += table(header, rows) + ["", "CSV: `label_accuracy.csv` (shares in [0, 1]).", ""]
    return lines


def fidelity_section(groups) -> list[str]:
    """## Fidelity (the paper's Figure 1): shares below each MSE threshold, ours and the paper's."""
    lines: list[str] = []
    lines += ["## Fidelity (the paper's Figure 1)", "",
              "Share of trials (percent) with final MSE (all pixels, raw unclamped values) strictly below each "
              "threshold; a diverged or NaN trial counts as a failure. The paper's values are "
              f"{paper.FIDELITY_NOTE}.", "", "![fidelity](fidelity.png)", ""]
    header = ["data set", "method", "source", "trials"] + [f"MSE < {k}" for k in FIDELITY_KEYS]
    rows = []
    for dataset in datasets_of(groups):   # per method: our protocols' rows, then the paper's row once
        for m in all_methods({k: v for k, v in groups.items() if k[0] == dataset}):
            name = METHOD_NAMES.get(m, m)
            for (d, variant), by_method in groups.items():
                if d == dataset and m in by_method:
                    g = by_method[m]
                    rows.append([row_label(dataset, variant), name, "ours", g.summary["trials"]]
                                + [pct(g.summary["fidelity"][k]) for k in FIDELITY_KEYS])
            theirs = paper.fidelity(dataset, m)
            if theirs and any(d == dataset and m in by_method and comparable(variant)
                              for (d, variant), by_method in groups.items()):
                rows.append([dataset, name, f"paper ({paper.DATASETS[dataset]})", paper.TRIALS]
                            + [pct(theirs[k]) for k in FIDELITY_KEYS])
    lines += table(header, rows) + ["", "CSV: `fidelity.csv` (shares in [0, 1]).", ""]
    return lines


def progress_section(strips: list[Strip], no_strips: str) -> list[str]:
    """## Reconstruction progress (the paper's Figure 2): the strips, or why there are none."""
    lines: list[str] = []
    lines += ["## Reconstruction progress (the paper's Figure 2)", ""]
    if strips:
        lines += ["Dummy data every few steps from the random start (left) to the step the trial stopped at "
                  "(right), DLG row above iDLG row, shown clamped to [0, 1]; the same image and network for both.",
                  ""]
        for strip in strips:
            lines += [f"![{strip.caption}]({strip.output})", "", f"*{strip.caption}*", ""]
    else:
        lines += [no_strips, ""]
    return lines


def convergence_section(groups) -> list[str]:
    """## Convergence: status counts, medians of costs and quality, restarts."""
    lines: list[str] = []
    lines += ["## Convergence", "",
              "Status counts; medians of steps and objective evaluations over converged trials, of PSNR / SSIM "
              "(images clamped to [0, 1]) and MSE over all trials; seconds per trial = a batch's wall time "
              "divided by its trials; restarts = total over the trials (the paper protocol has none; records "
              "from before restarts count 0).", ""]
    converged = convergence_rows(groups)
    lpips = any(r["median_lpips"] is not None for r in converged)   # a column only where some run recorded it
    header = ["data set", "method", "trials", *STATUSES, "steps", "evaluations", "PSNR (dB)", "SSIM",
              *["LPIPS"] * lpips, "MSE", "s / trial", "restarts"]
    rows = [[row_label(r["dataset"], r["protocol"]), METHOD_NAMES.get(r["method"], r["method"]), r["trials"],
             *(r[s] for s in STATUSES), num(r["median_steps_to_converge"]),
             num(r["median_evaluations_to_converge"]), num(r["median_psnr"], ".1f"), num(r["median_ssim"], ".3f"),
             *[num(r["median_lpips"], ".3f")] * lpips,
             sci(r["median_mse"]) if not math.isnan(r["median_mse"]) else DASH,
             num(r["median_seconds_per_trial"], ".3g"), r["restarts"]] for r in converged]
    lines += table(header, rows) + ["", "CSV: `convergence.csv`.", ""]
    return lines


def notes_section(warnings: list[str]) -> list[str]:
    """## Notes (what a reader needs to weigh the numbers) and ## Made with."""
    lines: list[str] = []
    lines += ["## Notes", ""]
    lines += [f"- {w}" for w in warnings]
    lines += [f"- Paper numbers: {paper.SOURCE}; fidelity values {paper.FIDELITY_NOTE}. The paper runs "
              f"{paper.TRIALS:,} trials per data set with one random image each; with fewer trials ours carry "
              "sampling error (one trial in n moves a share by 100/n points)."]
    lines += ["", "## Made with", "", *[f"- {item}" for item in provenance()]]
    return lines


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


def notes(runs: list[Run], groups) -> list[str]:
    """Facts a reader needs to weigh the numbers: data provenance and what pooling mixed."""
    found = []
    subset_sets = [d for d in ("cifar100", "lfw") if d in datasets_of(groups)]
    if subset_sets:
        names = " / ".join(paper.DATASETS[d] for d in subset_sets)
        found.append(
            f"{names}: the images attacked here are the seeded draws from the files under `dataset.root` listed "
            "in Runs. When that folder holds a subset (e.g. a shared local copy of part of the test split, "
            "which need not be a uniform sample), these are not the paper's samples: compare rates, not "
            "individual trials, and name the rows after the subset actually used.")
    beyond = [p for p in ("improved", "reliable") if any(base_variant(variant) == p for _, variant in groups)]
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
    odd = [row_label(d, v) for d, v in groups if not comparable(v)]
    if odd:
        found.append(f"Not the paper protocol, and not the improved or reliable preset either: {'; '.join(odd)}. "
                     "Each differs from its preset in the config keys its name lists, so the paper's numbers are not shown "
                     "beside it.")
    bare = [run for run in runs if not run.config]
    if bare:
        found.append(f"{len(bare)} run(s) without config.yaml are counted as the paper protocol: "
                     + ", ".join(f"`{run.path}`" for run in bare) + ".")
    for (dataset, variant), by_method in groups.items():
        label = row_label(dataset, variant)
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
