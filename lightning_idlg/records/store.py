"""The results store: one JSON line per finished trial, a summary per method.

`trials.jsonl` is appended and flushed as each batch of trials finishes, so a crash loses no finished
trial, and a rerun into the same directory skips the (method, index) pairs already there (resume).
`summary.json` is recomputed from all records, so it always describes exactly the trials on disk.

Records are unique by (method, index) when read (`unique`: the first line of a pair counts), whatever the
file holds, and the summary says how many duplicate lines it ignored (`duplicate_lines_ignored`). Every
record carries the fingerprint of the settings that made it (`rundir`), stamped here as it is appended.

Strict JSON only (`allow_nan=False`), so JavaScript's JSON.parse and dashboards read every file: in
trials.jsonl a non-finite float is the string "NaN", "Infinity" or "-Infinity" (lossless: `float()` reads
it back, and `read_records` does); in summary.json it is null ("no number": e.g. steps_to_converge when no
trial converged).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from lightning_idlg.records.metrics import fidelity, median
from lightning_idlg.records.rundir import current_stamp
from lightning_idlg.records.schema import (METHOD_ORDER, RANK_FILE_GLOB, STATUSES, SUMMARY_FILE,
                                           TRIALS_FILE)

NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class TrialStore:
    """Append-only per-trial records in `<run_dir>/trials.jsonl`. `records()`: every line (`summarize` and
    `done` count each (method, index) once).

    `stamp`: method -> fingerprint merged into each appended record as `fingerprint`; None: the run dir's
    current one (fingerprint.json, written by `rundir.open_run_dir` before any record)."""

    def __init__(self, run_dir: str | Path, stamp: dict[str, str] | None = None):
        self.path = Path(run_dir) / TRIALS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stamp = current_stamp(run_dir) if stamp is None else stamp

    def records(self) -> list[dict]:
        return read_records(self.path)

    def done(self) -> set[tuple[str, int]]:
        """(method, index) pairs already recorded (for resume)."""
        return {(r["method"], int(r["index"])) for r in self.records()}

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(dumps(self._stamped(r)) + "\n" for r in records)
        with open(self.path, "a") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


    def _stamped(self, record: dict) -> dict:
        if "fingerprint" in record or record.get("method") not in self.stamp:
            return record  # merged from a rank file: stamped by its rank already
        return {**record, "fingerprint": self.stamp[record["method"]]}


def dumps(record: dict) -> str:
    """One strict-JSON line: non-finite floats as "NaN" / "Infinity" / "-Infinity"."""
    return json.dumps({k: _spelled(v) for k, v in record.items()}, allow_nan=False)


def _spelled(value):
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def unique(records: list[dict]) -> tuple[list[dict], int]:
    """The first record of each (method, index), in file order, and how many later duplicates were dropped."""
    seen, out = set(), []
    for record in records:
        key = (record.get("method"), int(record.get("index", -1)))
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out, len(records) - len(out)


def read_records(path: str | Path) -> list[dict]:
    """Every record line of a trials.jsonl (duplicates too: see `unique`); a line cut short by a crash
    mid-write is skipped. "NaN" / "Infinity" / "-Infinity" (and bare NaN of older files) come back as floats."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append({k: NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()})
    return records


def summarize(records: list[dict], duplicates: Counter | None = None) -> dict[str, dict]:
    """Per method: trials, label_accuracy, fidelity at the five thresholds, status counts, medians (`lpips`
    only where records have it), and
    `duplicate_lines_ignored` (from `duplicates`, per method). `records` are counted as given: records of
    one run dir go through `unique` first (`write_summary`, the report), pooled runs may share indices."""
    duplicates = duplicates or Counter()
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
            "duplicate_lines_ignored": duplicates.get(method, 0),
        }
        lpips = [float(r["lpips"]) for r in rows if "lpips" in r]
        if lpips:  # metrics.lpips=...: the median over the records that have it (a run without it: no key)
            summary[method]["lpips"] = median(lpips)
    return summary


def write_summary(run_dir: str | Path, records: list[dict]) -> dict[str, dict]:
    """summary.json of one run dir's records: each (method, index) once, the duplicate lines counted."""
    kept, _ = unique(records)
    summary = summarize(kept, Counter(r["method"] for r in records) - Counter(r["method"] for r in kept))
    (Path(run_dir) / SUMMARY_FILE).write_text(json.dumps(finite_or_null(summary), indent=2, allow_nan=False) + "\n")
    return summary


def finite_or_null(value):
    """`value` with every non-finite float replaced by None (JSON null), for strict JSON outputs."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value




class RankStore(TrialStore):
    """One rank's records, `trials.rank{rank}.jsonl`, until rank 0 merges them into trials.jsonl."""

    def __init__(self, run_dir: str | Path, rank: int):
        super().__init__(run_dir)
        self.path = Path(run_dir) / f"trials.rank{rank}.jsonl"


def recorded(run_dir: str | Path) -> set[tuple[str, int]]:
    """(method, index) pairs on disk, after merging leftover rank files into trials.jsonl (resume)."""
    merge_rank_files(run_dir)
    return TrialStore(run_dir).done()


def merge_rank_files(run_dir: str | Path) -> int:
    """Append the records of trials.rank*.jsonl that trials.jsonl lacks (sorted by trial), fsync, then
    delete the rank files. Safe to repeat: a crash between the append and the delete duplicates nothing.
    Returns how many records were added."""
    run_dir = Path(run_dir)
    store = TrialStore(run_dir)
    _end_with_newline(store.path)  # a line torn by a crash must not swallow the next record
    files = sorted(run_dir.glob(RANK_FILE_GLOB))
    if not files:
        return 0
    done = store.done()
    new = []
    for path in files:
        for record in read_records(path):  # a torn last line (killed mid-write) is skipped
            key = (record["method"], int(record["index"]))
            if key not in done:
                done.add(key)
                new.append(record)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    new.sort(key=lambda r: (int(r["index"]), order.get(r["method"], len(order))))
    if new:
        store.append(new)
    for path in files:
        path.unlink()
    return len(new)


def _end_with_newline(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())
