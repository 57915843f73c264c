"""A run dir that cannot lie: one run at a time (a lock), and only records of one config (a fingerprint).

- `RunDirLock`: an advisory `fcntl.flock` on `<run_dir>/.lock`, taken by the process that runs `run()` for
  the run's whole life. The kernel drops it when that process dies (also by kill -9), so it never sticks.
  A second run into the same dir stops at once with one line naming the holder (pid, host, start time).
  The ranks of a `trainer=ddp` run never take it: they run inside their parent's run (and a forked rank
  shares the parent's lock). Hydra multirun jobs each have their own dir, so they never meet.
- `settings` / `fingerprint`: what changes a method's records is the resolved config minus `EXCLUDE`
  (run dir, progress, logging, threads, device placement, `trials`, which may grow, and the other attacks,
  which may be added later), plus the data set's size. Its sha256 (12 hex digits) is stored per method in
  `fingerprint.json` with the settings themselves, and in every record (`results.TrialStore` stamps it).
  `open_run_dir` refuses a rerun whose fingerprint differs from the one the dir's records were made with,
  naming the keys that differ, unless `resume=force` (then the new records carry the new fingerprint and
  fingerprint.json lists it under `forced`). `config.yaml` is written only for a config that made (or
  will make) the dir's records.

`dataset.root` and `dataset.download` are excluded: the same data set may move or be fetched once. A
different data set under a new root is still caught when its size differs (`dataset.size` is part of
the settings, and it also fixes which images the seed picks); same loader, same size, different files
is not detectable without hashing every image, which a rerun should not pay for.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_idlg.errors import ConfigError
from lightning_idlg.records.schema import FINGERPRINT_EXCLUDE
from lightning_idlg.records.moved import modernize, modernize_config

LOCK_FILE = ".lock"
FINGERPRINT_FILE = "fingerprint.json"
CONFIG_FILE = "config.yaml"
EXCLUDE = FINGERPRINT_EXCLUDE  # the keys a fingerprint leaves out (records/schema.py says why)
RESUME_MODES = ("auto", "force")
# keys added after run dirs with records existed, with the value that changes no record: at that value they
# are left out of the settings, so those run dirs still resume (metrics.lpips=alex adds `lpips` to records:
# it counts, and a rerun with it into a dir of records without it is refused)
OFF_VALUES = {"metrics.lpips": (False, None), "regularizers": ({},), "keep": ("last",),
              "attack.dlg.stopping.keep": ("last",), "attack.idlg.stopping.keep": ("last",)}


# -- lock ---------------------------------------------------------------------------------------------------
_HELD: dict[Path, int] = {}  # lock file -> how many RunDirLock blocks of this process hold it (re-entrant)


class RunDirLock:
    """`with RunDirLock(run_dir):` the run dir is this process's until the block ends (or it dies).
    Re-entrant within a process (the app takes it before its heavy imports, `experiment.run` again)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir).resolve() / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunDirLock":
        if _HELD.get(self.path):
            _HELD[self.path] += 1
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(f"run dir {self.path.parent} is in use by another run ({holder}); wait for it to "
                              "finish or choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode())
        os.fsync(fd)
        self.fd = fd
        _HELD[self.path] = 1
        return self

    def __exit__(self, *exc) -> None:
        _HELD[self.path] -= 1
        if self.fd is not None:  # the outermost block
            _HELD.pop(self.path)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder has not written its pid yet"


# -- fingerprint --------------------------------------------------------------------------------------------
def settings(cfg: DictConfig, method: str, dataset_size: int | None = None) -> dict:
    """The flat, resolved settings (`optimizer.lr`: 1.0, ...) that make `method`'s records: the config minus
    EXCLUDE and minus the other methods' sections, plus `dataset.size`. Keys are resolved one by one, so
    an excluded key that only resolves inside the Hydra app (`${hydra:...}`) is never touched."""
    flat: dict = {}
    _flatten(cfg, "", flat, skip={f"attack.{m}" for m in _attacks(cfg) if m != method}
                                 | {f"method.{m}" for m in cfg.get("method") or {} if m != method})
    for key, off in OFF_VALUES.items():
        if key in flat and flat[key] in off:
            del flat[key]
    if dataset_size is not None:
        flat["dataset.size"] = int(dataset_size)
    return dict(sorted(flat.items()))


def _attacks(cfg: DictConfig) -> list[str]:
    """The config's attacks (configs/attack/*; a config.yaml from before attacks were parts: `method`)."""
    section = cfg.get("attack") if cfg.get("attack") is not None else cfg.get("method")
    return list(section or {})


def _flatten(node, prefix: str, out: dict, skip: set[str]) -> None:
    for key in node:
        name = f"{prefix}{key}"
        if name in EXCLUDE or name in skip:
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            if len(value) == 0:
                out[name] = {}
            _flatten(value, name + ".", out, skip)
        elif isinstance(value, ListConfig):
            out[name] = OmegaConf.to_container(value, resolve=True)
        else:
            out[name] = value


def fingerprint(flat: dict) -> str:
    text = json.dumps(flat, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def differing(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every key whose value differs ("absent" where a side lacks it)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "absent"), new.get(key, "absent")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def read_fingerprints(run_dir: str | Path) -> dict:
    path = Path(run_dir) / FINGERPRINT_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"{path} is not valid JSON; restore it or start a new hydra.run.dir") from None


def current_stamp(run_dir: str | Path) -> dict[str, str]:
    """method -> the fingerprint that records appended now carry (see results.TrialStore)."""
    return read_fingerprints(run_dir).get("current", {})


def open_run_dir(cfg: DictConfig, run_dir: str | Path, dataset_size: int, recorded: set[str],
                 files: dict[str, str] | None = None) -> None:
    """Check the run's config against what made the dir's records (`recorded`: the methods with records);
    refuse a difference unless `resume=force`; then write fingerprint.json, `files` (e.g. .hydra/*.yaml)
    and, if it describes the records, config.yaml. Call with the dir's lock held."""
    run_dir = Path(run_dir)
    resume = cfg.get("resume", "auto")
    methods = _attacks(cfg)
    mine = {m: settings(cfg, m, dataset_size) for m in methods}
    book = read_fingerprints(run_dir)
    known, renamed = _modern_methods(book.get("methods", {}))
    renamed = {**book.get("renamed", {}), **renamed}
    if not book and recorded and (run_dir / CONFIG_FILE).exists():
        # a run dir from before fingerprints: its config.yaml made its records (the data set's size unknown)
        old = OmegaConf.load(run_dir / CONFIG_FILE)
        modernize_config(old)
        for m in recorded & set(_attacks(old)):
            theirs = settings(old, m)
            if m in mine and {k: v for k, v in mine[m].items() if k != "dataset.size"} == theirs:
                theirs = mine[m]
            known[m] = {"fingerprint": fingerprint(theirs), "settings": theirs}
    forced = list(book.get("forced", []))
    stamp = {}
    for m in methods:
        ours = fingerprint(mine[m])
        stamp[m] = ours
        if m not in recorded or m not in known:  # no records of m to contradict (or none known): ours
            known[m] = {"fingerprint": ours, "settings": mine[m]}
            continue
        if known[m]["fingerprint"] == ours:
            continue
        diff = differing(known[m]["settings"], mine[m])
        if resume != "force":
            shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise ConfigError(f"run dir {run_dir} holds {m} records made with other settings ({shown}); "
                              "rerun with those settings, start a new dir (hydra.run.dir=...), or append "
                              "anyway with resume=force")
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        forced.append({"method": m, "fingerprint": ours, "at": when, "differs": diff, "settings": mine[m]})
    before = int(book.get("trials", 0)) if recorded else 0  # the most trials a config.yaml here described
    covers = set(methods) >= recorded and cfg.trials >= before
    consistent = all(known[m]["fingerprint"] == stamp[m] for m in methods)
    write_config = not (run_dir / CONFIG_FILE).exists() or (consistent and covers and not forced)
    book = {"methods": known, "current": stamp, "trials": max(int(cfg.trials), before), "excluded": list(EXCLUDE)}
    if forced:
        book["forced"] = forced
    if renamed:  # records stamped before modules moved carry these fingerprints: old -> new
        book["renamed"] = renamed
    _write_json(run_dir / FINGERPRINT_FILE, book)
    if write_config:
        _write_text(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    for name, text in (files or {}).items():
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        _write_text(run_dir / name, text)


def _modern_methods(methods: dict) -> tuple[dict, dict[str, str]]:
    """fingerprint.json's `methods` with moved module paths in their settings replaced (records.moved), and
    old fingerprint -> new for each entry that changed."""
    known, renamed = {}, {}
    for m, entry in methods.items():
        modern = modernize(entry["settings"])
        if modern != entry["settings"]:
            entry = {"fingerprint": fingerprint(modern), "settings": modern}
            renamed[methods[m]["fingerprint"]] = entry["fingerprint"]
        known[m] = entry
    return known, renamed


def _write_json(path: Path, data) -> None:
    _write_text(path, json.dumps(data, indent=2, allow_nan=False, default=str) + "\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # a kill mid-write leaves the old file, never half of one
