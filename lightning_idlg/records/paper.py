"""The iDLG paper's reported numbers, as data, so reports can print them beside ours.

Source: Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients", arXiv 2001.02610 (2020):
Table 1 (label accuracy) and Figure 1 (share of trials with MSE below each threshold; read off the plot,
about +-1 point). 1,000 trials per data set, the reference protocol (untrained sigmoid LeNet, U(-0.5, 0.5)
weights, L-BFGS lr 1, 300 steps). Values are kept in percent, as printed; the functions return shares in
[0, 1], the unit of `lightning_idlg.records.store.summarize`.

Keys are our loader names (a trial record's `dataset` field): the paper has MNIST, CIFAR-100 and LFW only.
"""

from __future__ import annotations

from lightning_idlg.records.metrics import fidelity as _fidelity

FIDELITY_KEYS = tuple(_fidelity([]))   # "0.01", ..., "0.0001": the keys of summary['fidelity']

SOURCE = ('Zhao, Mopuri, Bilen, "iDLG: Improved Deep Leakage from Gradients", arXiv 2001.02610 (2020): '
          "Table 1 (label accuracy), Figure 1 (fidelity)")
FIDELITY_NOTE = "read off the plot, about +-1 point"
TRIALS = 1000   # per data set

#: loader name -> the paper's name for the data set
DATASETS = {"mnist": "MNIST", "cifar100": "CIFAR-100", "lfw": "LFW"}

#: Table 1, percent of trials whose label is recovered
LABEL_ACCURACY_PERCENT = {
    "mnist": {"dlg": 89.9, "idlg": 100.0},
    "cifar100": {"dlg": 83.3, "idlg": 100.0},
    "lfw": {"dlg": 79.1, "idlg": 100.0},
}

#: Figure 1, percent of trials with MSE < t, for t in FIDELITY_THRESHOLDS (0.01, 0.005, 0.001, 0.0005, 0.0001)
FIDELITY_PERCENT = {
    "mnist": {"dlg": (76.3, 76.3, 76.2, 76.1, 76.0), "idlg": (89.2, 89.0, 88.6, 88.4, 87.4)},
    "cifar100": {"dlg": (66.3, 66.2, 65.5, 64.7, 57.6), "idlg": (83.6, 83.4, 82.8, 81.2, 70.8)},
    "lfw": {"dlg": (52.3, 51.8, 51.5, 51.3, 47.4), "idlg": (91.5, 91.4, 91.1, 90.9, 83.3)},
}


def _share(percent: float) -> float:
    return round(percent / 100.0, 6)


def label_accuracy(dataset: str, method: str) -> float | None:
    """The paper's label accuracy as a share in [0, 1]; None where the paper has no such number."""
    percent = LABEL_ACCURACY_PERCENT.get(dataset, {}).get(method)
    return None if percent is None else _share(percent)


def fidelity(dataset: str, method: str) -> dict[str, float] | None:
    """{"0.01": share, ...} keyed like `lightning_idlg.records.metrics.fidelity`; None where the paper has none."""
    percents = FIDELITY_PERCENT.get(dataset, {}).get(method)
    if percents is None:
        return None
    return {key: _share(p) for key, p in zip(FIDELITY_KEYS, percents)}


# -- the protocol, as config values ---------------------------------------------------------------------
#: What experiment=paper_* sets, as dotted config keys (tests/apps/test_app.py checks the presets against it):
#: untrained sigmoid LeNet with U(-0.5, 0.5) weights, L-BFGS lr 1 with PyTorch's defaults and no line
#: search, 300 steps, stop at D < 1e-6, no patience, no restarts, iDLG's label from the reference script's rule.
PROTOCOL = {
    "steps": 300,
    "tolerance": 1e-6,
    "patience": None,
    "restarts": 0,
    "keep": "last",
    "optimizer._target_": "lightning_idlg.attacks.optimizer.BatchedLBFGS",
    "optimizer.lr": 1.0,
    "optimizer.max_iter": 20,
    "optimizer.max_eval": None,
    "optimizer.history_size": 100,
    "optimizer.tolerance_grad": 1e-7,
    "optimizer.tolerance_change": 1e-9,
    "optimizer.line_search_fn": None,
    "attack.idlg.label_strategy.rule": "weight_sum",
    "attack.dlg.label_strategy._target_": "lightning_idlg.attacks.labels.LearnedLabel",
    "attack.idlg.label_strategy._target_": "lightning_idlg.attacks.labels.AnalyticLabel",
    "attack.dlg.objective._target_": "lightning_idlg.attacks.objective.SquaredL2",
    "attack.idlg.objective._target_": "lightning_idlg.attacks.objective.SquaredL2",
    "model.factory._target_": "lightning_idlg.case.model.LeNet",
    "model.factory.activation": "sigmoid",
    "model.factory.width": 12,
    "model.init._target_": "lightning_idlg.case.model.UniformInit",
    "model.init.scale": 0.5,
    "client.batch_size": 1,
    "client.reduction": "mean",
    "defense": "none",
}
#: The same settings as a config.yaml from before attacks were assembled from parts names them.
LEGACY = {"method.idlg.label_rule": "weight_sum", "model.init": "uniform", "model.init_scale": 0.5}
#: What experiment=paper_*_improved adds to it.
IMPROVED = {"optimizer.line_search_fn": "strong_wolfe", "patience": 20, "restarts": 2, "restart_distance": 1e-2}
#: What experiment=paper_*_reliable changes in that (docs/studies/generated/presets/presets.md).
RELIABLE = {"patience": 50, "restart_distance": 1e-4, "keep": "best"}
#: ... and what the MNIST and LFW presets set beside it (a faint total-variation prior; on MNIST no tolerance,
#: on LFW 600 steps), by the data set's loader
RELIABLE_MNIST = {"tolerance": None, "regularizers.tv.weight": 3e-8}
RELIABLE_LFW = {"steps": 600, "regularizers.tv.weight": 1e-8}
RELIABLE_DATA = {"lightning_idlg.case.dataset.mnist": RELIABLE_MNIST, "lightning_idlg.case.dataset.lfw": RELIABLE_LFW}


def paper_command(config: dict) -> str:
    """The command that runs the paper protocol on the run's data set where the paper has it (MNIST,
    CIFAR-100, LFW), else on MNIST: what a quick look or a variant points to."""
    loader = str(flatten(config).get("dataset._target_", "")).rpartition(".")[2]
    name = loader if loader in DATASETS else "mnist"
    return f"lightning-idlg experiment=paper_{name} dataset.root=/path/to/{name}"


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """{"optimizer": {"lr": 1.0}} -> {"optimizer.lr": 1.0}; lists stay values. The client's defenses also
    as one value, `defense`: "none" or their names in order ("clip+gaussian")."""
    flat = {}
    if not prefix and isinstance((config or {}).get("defense"), dict):
        flat["defense"] = "+".join(config["defense"]) or "none"
    for key, value in (config or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _improved(flat: dict) -> bool:
    return (flat.get("optimizer.line_search_fn") is not None or bool(flat.get("restarts"))
            or flat.get("patience") is not None)


def protocol_of(config: dict) -> tuple[str, dict[str, object]]:
    """("paper" | "improved" | "reliable" | "custom", the keys that differ from that protocol's preset values).

    "improved": the run uses what the `_improved` presets add (a line search, restarts or patience);
    "reliable": that with the best iterate kept and the patience of the `_reliable` presets;
    "custom": none of these, but it differs from the paper in steps, tolerance, optimizer, label rule or
    model; "paper": neither. A key the config lacks counts as the preset's (a run without config.yaml
    is "paper", as before there were variants); iDLG's label rule counts only where iDLG ran."""
    flat = flatten(config)
    if not _improved(flat):
        found = differences(config, PROTOCOL)
        return ("custom" if found else "paper"), found
    if flat.get("keep") == RELIABLE["keep"] and flat.get("patience") == RELIABLE["patience"]:
        reference = {**PROTOCOL, **IMPROVED, **RELIABLE, **RELIABLE_DATA.get(flat.get("dataset._target_"), {})}
        return "reliable", differences(config, reference)
    return "improved", differences(config, {**PROTOCOL, **IMPROVED})


def differences(config: dict, reference: dict[str, object] = PROTOCOL) -> dict[str, object]:
    """The keys of `reference` whose value in `config` differs (missing keys count as equal; a method's
    keys only where that method ran), with the config's values."""
    flat = flatten(config)
    found = {}
    for key, value in {**reference, **(LEGACY if reference is PROTOCOL else {})}.items():
        section = key.split(".")[0]
        ran = config.get(section) if section in ("method", "attack") else None
        if isinstance(ran, dict) and key.split(".")[1] not in ran:
            continue
        if key in flat and flat[key] != value:
            found[key] = flat[key]
    # a prior on the dummy (the run-wide `regularizers` shortcut of dlg and idlg; none in the paper) other than
    # the reference's
    found.update({k: v for k, v in flat.items()
                  if k.startswith("regularizers.") and not k.endswith("._target_") and reference.get(k) != v})
    found.update({k: None for k in reference if k.startswith("regularizers.") and k not in flat})
    return found
