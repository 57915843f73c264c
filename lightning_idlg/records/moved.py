"""Module paths that moved: `_target_` paths are stored data (a run dir's config.yaml and fingerprint.json,
a user's own YAML files and overrides), so the modules that moved into the stage folders (2026-12-08)
keep their old names here, old -> new. A config is modernized where it enters (the apps, the Python
API) and a stored one where it is read (resume, the report), so a run dir made before the move resumes,
is recognized as the paper protocol, and pools with new runs of the same config."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

MOVED = {f"lightning_idlg.{old}": f"lightning_idlg.{new}" for old, new in {
    "data": "case.dataset", "safe_pickle": "case.safe_pickle", "victim": "case.model",
    "architectures": "case.architectures", "client": "case.client", "fedavg": "case.fedavg",
    "defenses": "case.defense",
    "inversion": "attacks.inversion", "dummy": "attacks.dummy", "labels": "attacks.labels",
    "objective": "attacks.objective", "regularizers": "attacks.regularizers", "optim": "attacks.optimizer",
    "stopping": "attacks.stopping",
    "metrics": "records.metrics", "label_metrics": "records.label_metrics", "paper": "records.paper",
    "results": "records.store", "rundir": "records.rundir",
    "experiment": "run.experiment", "continuous": "run.continuous", "monitor": "run.monitor",
    "tracking": "run.tracking", "validation": "run.validation", "pictures": "run.pictures",
    "leakage": "report.defenses",
}.items()}
# names that moved out of a module as well as the module itself: the new module of each
MOVED_NAMES = {
    "lightning_idlg.fedavg.LocalUpdates": "lightning_idlg.attacks.local_updates.LocalUpdates",
}


def modern_path(path: str) -> str:
    """`path` (a dotted import path) with its moved module, or name, replaced; other strings unchanged."""
    if not path.startswith("lightning_idlg."):
        return path
    if path in MOVED_NAMES:
        return MOVED_NAMES[path]
    parts = path.split(".")
    for end in range(len(parts), 1, -1):
        head = ".".join(parts[:end])
        if head in MOVED:
            return ".".join([MOVED[head], *parts[end:]])
    return path


def modernize(value: Any) -> Any:
    """A plain value (dict, list, str, ...) with every moved path in its strings replaced."""
    if isinstance(value, str):
        return modern_path(value)
    if isinstance(value, dict):
        return {k: modernize(v) for k, v in value.items()}
    if isinstance(value, list):
        return [modernize(v) for v in value]
    return value


def modernize_config(cfg: DictConfig) -> list[str]:
    """Replace moved paths in `cfg`'s `_target_` (and `target`, a custom victim's) values in place; returns
    `old -> new` for each replacement, for the one warning a run gives."""
    changed: list[str] = []

    def visit(node) -> None:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
        for key, value in list(items):
            if isinstance(value, (DictConfig, ListConfig)):
                visit(value)
            elif key in ("_target_", "target") and isinstance(value, str) and modern_path(value) != value:
                node[key] = modern_path(value)
                changed.append(f"{value} -> {node[key]}")

    with_flag = OmegaConf.is_readonly(cfg)
    OmegaConf.set_readonly(cfg, False)
    visit(cfg)
    OmegaConf.set_readonly(cfg, with_flag)
    return changed
