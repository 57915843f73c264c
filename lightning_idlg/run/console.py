"""What a run prints: the per-method summary table (stdout, and the run's log file)."""

from __future__ import annotations

import logging
import math

from rich import box
from rich.console import Console
from rich.table import Table


def short_key(key: str) -> str:
    """A differing key for the console: its last part, or its last two where the last says little."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "_target_" and len(parts) > 1 else parts[-1]


SUMMARY_COLUMNS = ("method", "trials", "label", "<1e-2", "<1e-3", "<1e-4", "conv", "div", "PSNR", "SSIM", "steps")


SUMMARY_NOTE = ("label: label accuracy; <t: share of trials with MSE < t",
                "conv, div: converged, diverged; PSNR, SSIM, steps (to converge): medians")


SUMMARY_TITLE = "lightning_idlg summary"


file_log = logging.getLogger("lightning_idlg.logfile")  # the run's log file only (configs/hydra/job_logging)


def summary_columns(summary: dict[str, dict]) -> tuple[str, ...]:
    """SUMMARY_COLUMNS, with LPIPS after SSIM where a method has it (metrics.lpips=...)."""
    if not any("lpips" in s for s in summary.values()):
        return SUMMARY_COLUMNS
    at = SUMMARY_COLUMNS.index("SSIM") + 1
    return (*SUMMARY_COLUMNS[:at], "LPIPS", *SUMMARY_COLUMNS[at:])


def summary_note(summary: dict[str, dict]) -> tuple[str, ...]:
    if "LPIPS" not in summary_columns(summary):
        return SUMMARY_NOTE
    return tuple(line.replace("SSIM, ", "SSIM, LPIPS, ") for line in SUMMARY_NOTE)


def summary_rows(summary: dict[str, dict]) -> list[list[str]]:
    lpips = "LPIPS" in summary_columns(summary)
    rows = []
    for method, s in summary.items():
        f = s["fidelity"]
        rows.append([method, str(s["trials"]), f"{s['label_accuracy']:.3f}", f"{f['0.01']:.3f}", f"{f['0.001']:.3f}",
                     f"{f['0.0001']:.3f}", str(s["status"]["converged"]), str(s["status"]["diverged"]),
                     f"{s['psnr']:.1f}", f"{s['ssim']:.3f}", *([f"{s.get('lpips', math.nan):.3f}"] * lpips),
                     f"{s['steps_to_converge']:.0f}"])
    return rows


def summary_text(summary: dict[str, dict]) -> str:
    """The summary as plain text, 80 columns at most (also in the log file, and without a terminal)."""
    columns = summary_columns(summary)
    rows = [list(columns), *summary_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([SUMMARY_TITLE, *lines, *summary_note(summary)])


def print_summary(summary: dict[str, dict], console: Console) -> None:
    """The per-method summary on stdout: a table on a terminal, plain text otherwise (a pipe, a SLURM log);
    both fit 80 columns. The plain text also goes to the run's log file."""
    text = summary_text(summary)
    file_log.info("%s", text)
    if not console.is_terminal:
        console.file.write(text + "\n")
        console.file.flush()
        return
    table = Table(title=SUMMARY_TITLE, caption="\n".join(summary_note(summary)), box=box.SIMPLE_HEAD, padding=(0, 1),
                  collapse_padding=True, pad_edge=False, show_edge=False, title_justify="left",
                  caption_justify="left")  # 74 columns for 1,000 trials
    for column in summary_columns(summary):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)
