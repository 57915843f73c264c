"""Label strategies are chosen by name: configs/label_strategy/ is a config group, the iDLG and IG attacks
take theirs as a nested default, and `labels=NAME` is the app's shortcut for iDLG's."""

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
