"""The report's input: the run dirs found below its arguments, what each says about how it was made
(config.yaml, overrides), and the records pooled into groups of one (data set, variant, method). Runs are
pooled only when their configs agree on everything but the seed and where and how they ran (`PLACEMENT`)."""

from __future__ import annotations

from collections import Counter
import hashlib
import json
import re
import shlex
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lightning_idlg.records import paper
from lightning_idlg.records.metrics import median
from lightning_idlg.records.moved import modernize
from lightning_idlg.records.schema import METHOD_ORDER, POOLING_EXCLUDE, TRIALS_FILE
from lightning_idlg.records.store import read_records, summarize, unique


DATASET_ORDER = ("mnist", "cifar100", "lfw", "digits", "faces", "image_folder")


PROTOCOLS = ("paper", "improved", "reliable", "custom")   # row order within a data set


FIDELITY_KEYS = paper.FIDELITY_KEYS      # "0.01" ... "0.0001", the keys of summarize()["fidelity"]


PLACEMENT = POOLING_EXCLUDE  # keys in which pooled runs may differ (records/schema.py says why)


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
    return name + (": " + ", ".join(f"{k}={value_text(v)}" for k, v in differences.items()) if differences else "")


def value_text(value) -> str:
    return "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def setting(config: dict) -> dict[str, str]:
    """The config keys that change what a trial measures (all but PLACEMENT), flat, values as text."""
    return {k: value_text(v) for k, v in paper.flatten(config).items()
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
    config = modernize(_read_yaml(run_dir / "config.yaml") or {})  # a run dir from before modules moved
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
        for method in sorted({r["method"] for r in run.records}, key=method_rank):
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
        for method in sorted(records_of[key], key=method_rank):
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


def dataset_rank(name: str):
    return (DATASET_ORDER.index(name) if name in DATASET_ORDER else len(DATASET_ORDER), name)


def _key_rank(key: tuple[str, str]):
    dataset, variant = key
    base = base_variant(variant)
    return (dataset_rank(dataset), PROTOCOLS.index(base) if base in PROTOCOLS else len(PROTOCOLS), variant)


def base_variant(variant: str) -> str:
    """The protocol a variant name starts with: "custom: steps=10" -> "custom"."""
    return variant.split(":")[0].split(";")[0]


def row_label(dataset: str, variant: str) -> str:
    """The data set as a table row names it: paper-protocol rows by the data set alone, as before."""
    return dataset if variant == "paper" else f"{dataset}, {variant}"


def datasets_of(groups) -> list[str]:
    return list(dict.fromkeys(dataset for dataset, _ in groups))


def method_rank(name: str):
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


def method_counts(records: list[dict]) -> list[int]:
    counts = Counter(r["method"] for r in records)
    return [counts.get("dlg", 0), counts.get("idlg", 0), sum(v for k, v in counts.items() if k not in METHOD_ORDER)]


def all_methods(groups) -> list[str]:
    return sorted({m for by_method in groups.values() for m in by_method}, key=method_rank)


def _natural(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def config_key(record: dict, run_config: dict, dropped: set[str]) -> str:
    """What else made the record: its run's result-changing settings (report.setting: all but seed, trials
    and run placement), less the row's own keys `dropped` and the run's other attacks, hashed. Records
    pool only where this agrees."""
    method = record["method"]
    kept = {k: v for k, v in setting(run_config).items()
            if k not in dropped and not (k.startswith(("attack.", "method.")) and k.split(".")[1] != method)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def drop_config_where_unique(rows: list[dict], keys: tuple[str, ...]) -> None:
    """The config column only matters where rows agreeing on `keys` have several configs."""
    counts = defaultdict(set)
    for r in rows:
        counts[tuple(r[k] for k in keys)].add(r["config"])
    for r in rows:
        if len(counts[tuple(r[k] for k in keys)]) == 1:
            r["config"] = ""
