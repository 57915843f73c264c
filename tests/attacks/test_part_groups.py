"""Parts chosen by name: label strategies (configs/label_strategy/, the idlg and ig attacks' nested default;
`labels=NAME` is the app's shortcut for iDLG's), objectives (configs/objective/, every attack's nested
default) and regularizers (configs/regularizer/, appended to the run-wide priors)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from lightning_idlg.app import expand_shortcuts
from lightning_idlg.attacks import labels as L
from tests.conftest import compose_config

OPTIONS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "configs" / "label_strategy").glob("*.yaml"))
CLASSES = {"analytic": L.AnalyticLabel, "learned": L.LearnedLabel, "yin": L.Yin, "llg": L.LLG, "llgplus": L.LLGPlus,
           "bias_corrected": L.BiasCorrected}


def cfg_of(*overrides: str):
    return compose_config(*expand_shortcuts(list(overrides)))


def test_every_option_is_a_strategy_class():
    assert OPTIONS == sorted(CLASSES)


@pytest.mark.parametrize("name", OPTIONS)
def test_labels_shortcut_builds_that_strategy_for_idlg_alone(name):
    cfg = cfg_of("method=both", f"labels={name}")
    assert type(instantiate(cfg.attack.idlg.label_strategy)) is CLASSES[name]
    assert type(instantiate(cfg.attack.dlg.label_strategy)) is L.LearnedLabel  # DLG keeps its learned label


def test_the_default_is_the_papers_rule_and_its_keys_still_override():
    assert dict(cfg_of().attack.idlg.label_strategy) == {"_target_": "lightning_idlg.attacks.labels.AnalyticLabel",
                                                          "rule": "weight_sum"}
    assert cfg_of("attack.idlg.label_strategy.rule=bias").attack.idlg.label_strategy.rule == "bias"
    chosen = cfg_of("labels=llgplus", "attack.idlg.label_strategy.dummies=8").attack.idlg.label_strategy
    assert dict(chosen) == {"_target_": "lightning_idlg.attacks.labels.LLGPlus", "dummies": 8, "seed": 0}  # no rule


def test_another_attack_names_its_node():
    cfg = cfg_of("method=ig", "label_strategy@attack.ig.label_strategy=bias_corrected")
    assert type(instantiate(cfg.attack.ig.label_strategy)) is L.BiasCorrected
    assert expand_shortcuts(["labels=yin", "steps=3"]) == ["label_strategy@attack.idlg.label_strategy=yin", "steps=3"]


# -- objectives and regularizers: groups too --------------------------------------------------------------

def test_each_attack_takes_its_objective_from_the_group():
    cfg = cfg_of("method=both")
    assert dict(cfg.attack.dlg.objective) == dict(cfg.attack.idlg.objective) == {
        "_target_": "lightning_idlg.attacks.objective.SquaredL2"}
    assert dict(cfg_of("method=ig").attack.ig.objective) == {
        "_target_": "lightning_idlg.attacks.objective.CosineSimilarity", "layer_weights": "equal"}


@pytest.mark.parametrize("name,cls", [("squared_l2", "SquaredL2"), ("cosine", "CosineSimilarity"),
                                      ("local_updates", "LocalUpdates")])
def test_every_objective_option_builds(name, cls):
    cfg = cfg_of("method=idlg", f"objective@attack.idlg.objective={name}")
    assert type(instantiate(cfg.attack.idlg.objective)).__name__ == cls


def test_a_regularizer_by_name_is_the_reliable_presets_prior():
    ours = cfg_of("+regularizer@regularizers.tv=tv", "regularizers.tv.weight=3e-8")
    preset = cfg_of("experiment=paper_mnist_reliable")
    assert ours.regularizers == preset.regularizers
    assert ours.attack.idlg.regularizers.tv.weight == 3e-8  # the attacks read the run-wide priors
    assert instantiate(cfg_of("+regularizer@regularizers.bn=bn").regularizers.bn).weight == 0.1
