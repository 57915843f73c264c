"""The results store: one JSON line per finished trial, a summary per method.

`trials.jsonl` is appended and flushed as each batch of trials finishes, so a crash loses no finished
trial, and a rerun into the same directory skips the (method, index) pairs already there (resume).
`summary.json` is recomputed from all records, so it always describes exactly the trials on disk.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from lightning_idlg.metrics import fidelity, median

TRIALS_FILE = "trials.jsonl"
SUMMARY_FILE = "summary.json"
STATUSES = ("converged", "not_converged", "diverged")


class TrialStore:
    """Append-only per-trial records in `<run_dir>/trials.jsonl`."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / TRIALS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> list[dict]:
        return read_records(self.path)

    def done(self) -> set[tuple[str, int]]:
        """(method, index) pairs already recorded (for resume)."""
        return {(r["method"], int(r["index"])) for r in self.records()}

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in records)
        with open(self.path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


def read_records(path: str | Path) -> list[dict]:
    """Records of a trials.jsonl; a line cut short by a crash mid-write is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per method: trials, label_accuracy, fidelity at the five thresholds, status counts, medians."""
    summary: dict[str, dict] = {}
    for method in sorted({r["method"] for r in records}):
        rows = [r for r in records if r["method"] == method]
        converged = [r for r in rows if r["status"] == "converged"]
        status = Counter(r["status"] for r in rows)
        summary[method] = {
            "trials": len(rows),
            "label_accuracy": sum(bool(r["label_correct"]) for r in rows) / len(rows),
            "fidelity": fidelity([float(r["mse"]) for r in rows]),
            "status": {s: status.get(s, 0) for s in STATUSES},
            "psnr": median([float(r["psnr"]) for r in rows]),
            "ssim": median([float(r["ssim"]) for r in rows]),
            "mse": median([float(r["mse"]) for r in rows]),
            "steps_to_converge": median([float(r["steps"]) for r in converged]),
            "evaluations_to_converge": median([float(r["evaluations"]) for r in converged]),
            "seconds": sum(float(r["seconds"]) for r in rows),
            "evaluations": sum(int(r.get("evaluations", 0)) for r in rows),
            "restarts": sum(int(r.get("restarts", 0)) for r in rows),  # records from before restarts: 0
        }
    return summary


def write_summary(run_dir: str | Path, records: list[dict]) -> dict[str, dict]:
    summary = summarize(records)
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
