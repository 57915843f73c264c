"""The defense section of the report (lightning_idlg.report.defenses) on hand-made records: rows, the rule that
decides whether a leak stopped, the DLG paper's claims, no pooling of unlike configs, the figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_idlg.report.defenses import defense_point, leakage_rows, markdown_section, plot_leakage, verdicts
from lightning_idlg.report import Run


def record(method, defense, mse, psnr, cosine=1.0, error=0.0, correct=True, fingerprint=None, **params):
    axes = {"defense": defense, **{f"defense.{defense}.{k}": v for k, v in params.items()}}
    r = {"method": method, "index": 0, "dataset": "mnist", "mse": mse, "psnr": psnr, "label_correct": correct,
         "defense_cosine": cosine, "defense_relative_error": error, "axes": axes}
    return {**r, "fingerprint": fingerprint} if fingerprint else r


def test_rows_count_fidelity_psnr_labels_and_the_clients_cost():
    records = [record("idlg", "none", 1e-5, 50.0), record("idlg", "none", 2e-2, 15.0),
               record("idlg", "gaussian", 2e-3, 24.0, cosine=0.9, error=0.4, variance=1e-4),
               record("idlg", "gaussian", 5e-4, 31.0, cosine=0.8, error=0.6, correct=False, variance=1e-4),
               record("idlg", "gaussian", 0.5, 8.0, cosine=0.1, error=3.0, variance=1e-1)]
    rows = leakage_rows([Run(Path("a"), records)])
    assert [(r["defense"], r["strength"], r["trials"]) for r in rows] == [("none", None, 2), ("gaussian", 1e-4, 2),
                                                                           ("gaussian", 1e-1, 1)]
    none, weak, strong = rows
    assert none["fidelity"] == 0.5 and none["psnr"] == 32.5 and none["label_accuracy"] == 1.0
    assert weak["fidelity"] == 0.5 and weak["psnr"] == 27.5 and weak["label_accuracy"] == 0.5
    assert weak["cosine"] == pytest.approx(0.85) and weak["relative_error"] == pytest.approx(0.5)
    found = {(v["strength"], v["verdict"], v["leaked"]) for v in verdicts(rows)}
    assert found == {(1e-4, "confirmed", True), (1e-1, "confirmed", False)}


def test_a_leak_that_does_not_stop_where_the_paper_says_it_does_is_contradicted():
    rows = leakage_rows([Run(Path("a"), [record("dlg", "prune", 1e-4, 40.0, ratio=0.5)])])
    (v,) = verdicts(rows)
    assert v["claim"] == "pruning above about 20% stops it" and v["verdict"] == "contradicted"


def test_unlike_configs_are_never_pooled():
    """Two runs that differ in steps are two rows; two that differ only in seed, trials or threads pool."""
    a = record("idlg", "gaussian", 1e-4, 40.0, variance=1e-3)
    b = record("idlg", "gaussian", 1e-1, 9.0, variance=1e-3)
    rows = leakage_rows([Run(Path("a"), [a], {"steps": 300, "seed": 0}), Run(Path("b"), [b], {"steps": 10, "seed": 0})])
    assert len(rows) == 2 and all(len(r["config"]) == 8 for r in rows) and rows[0]["config"] != rows[1]["config"]
    pooled = leakage_rows([Run(Path("a"), [a], {"steps": 300, "seed": 0, "trials": 5}),
                           Run(Path("b"), [b], {"steps": 300, "seed": 1, "threads": 2})])
    assert len(pooled) == 1 and pooled[0]["trials"] == 2 and pooled[0]["config"] == ""
    assert any(line.endswith("| config |") for line in markdown_section(rows, None))


def test_a_chain_takes_the_strength_of_its_noise_and_dpsgd_reports_epsilon(tmp_path):
    r = {"axes": {"defense": "clip+gaussian", "defense.clip.max_norm": 1.0, "defense.gaussian.variance": 0.01}}
    assert defense_point(r) == ("clip+gaussian", 0.01)
    dp = record("idlg", "dpsgd", 0.1, 10.0, max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.01, rounds=1,
                delta=1e-5)
    rows = leakage_rows([Run(Path("a"), [dp, record("idlg", "none", 1e-6, 60.0)])])
    assert rows[-1]["defense"] == "dpsgd" and 0 < rows[-1]["epsilon"] < 10
    assert plot_leakage(rows, tmp_path / "leak.png") and (tmp_path / "leak.png").stat().st_size > 1000


def test_a_defenses_only_page_leaves_the_results_pages_files_alone(tmp_path):
    import json

    from lightning_idlg.report import write_report
    run = tmp_path / "run"
    run.mkdir()
    rows = [record("idlg", "none", 1e-6, 60.0), record("idlg", "prune", 1e-4, 40.0, ratio=0.5)]
    (run / "trials.jsonl").write_text("".join(json.dumps({**r, "index": i, "label": 1, "predicted_label": 1,
                                                          "status": "converged", "steps": 3, "evaluations": 9,
                                                          "seconds": 0.1, "ssim": 0.9, "distance": 1e-7})
                                              + "\n" for i, r in enumerate(rows)))
    out = tmp_path / "docs"
    out.mkdir()
    (out / "fidelity.png").write_bytes(b"results.md's figure")
    page = write_report([run], out, "Defenses", report_name="defenses.md", defenses_only=True, by=["defense"])
    text = page.read_text()
    assert [line for line in text.splitlines() if line.startswith("## ")] == [
        "## Runs", "## Leakage against defense strength", "## By defense", "## Made with"]
    assert (out / "fidelity.png").read_bytes() == b"results.md's figure" and (out / "leakage.csv").exists()
