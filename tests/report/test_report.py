"""The report command: exact tables from synthetic trial records, multirun pooling, figures, paper numbers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lightning_idlg.records import paper
from lightning_idlg.records.metrics import fidelity
from lightning_idlg.report import main, protocol, write_report
from lightning_idlg.records.store import read_records, summarize


def record(method, index, mse, *, correct=True, status="converged", steps=10, evaluations=200, psnr=30.0,
           ssim=0.5, seconds=1.0, dataset="mnist", seed=0, image_index=None, restarts=None):
    r = {"method": method, "index": index, "image_index": index if image_index is None else image_index,
         "label": 3, "predicted_label": 3 if correct else 4, "label_correct": correct, "mse": mse,
         "psnr": psnr, "ssim": ssim, "distance": 1e-7, "status": status, "steps": steps,
         "evaluations": evaluations, "seconds": seconds, "group_size": 4, "seed": seed, "dataset": dataset}
    if restarts is not None:   # records from before restarts have no such field
        r["restarts"] = restarts
    return r


def write_run(run_dir: Path, records, overrides=None, progress=None, config=None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    if overrides is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if progress is not None:   # a make_grid strip: `rows` methods x `cols` snapshots of size x size tiles
        rows, cols, size = progress
        (run_dir / "pictures").mkdir()
        Image.new("RGB", (cols * (size + 2) + 2, rows * (size + 2) + 2), (90, 140, 200)).save(
            run_dir / "pictures" / "progress_00000.png")
    return run_dir


# DLG: MSE 1e-5, 7e-4, 3e-3, 5e9 -> below 0.01: 3/4, 0.005: 3/4, 0.001: 2/4, 0.0005: 1/4, 0.0001: 1/4
# iDLG: MSE 1e-6, 2e-4, 0.02, NaN -> 2/4 at every threshold down to 0.0005, 1/4 at 0.0001
MNIST = [
    record("dlg", 0, 1e-5, steps=10, evaluations=100, psnr=50.0, ssim=1.0, seconds=1.0),
    record("dlg", 1, 7e-4, steps=20, evaluations=300, psnr=40.0, ssim=0.75, seconds=2.0),
    record("dlg", 2, 3e-3, status="not_converged", steps=300, evaluations=6000, psnr=25.0, ssim=0.25,
           seconds=3.0),
    record("dlg", 3, 5e9, correct=False, status="diverged", steps=5, evaluations=90, psnr=5.0, ssim=0.0,
           seconds=4.0),
    record("idlg", 0, 1e-6, steps=8),
    record("idlg", 1, 2e-4, steps=12),
    record("idlg", 2, 0.02, status="not_converged", steps=300),
    record("idlg", 3, float("nan"), status="diverged", steps=3),
]


def read_csv(path: Path) -> dict[tuple[str, str], dict]:
    with open(path, newline="") as f:
        return {(row["dataset"], row["method"]): row for row in csv.DictReader(f)}


@pytest.fixture
def mnist_report(tmp_path):
    run = write_run(tmp_path / "run", MNIST, overrides=["experiment=paper_mnist", "trials=4"],
                    progress=(2, 4, 28))
    write_report([run], tmp_path / "out")
    return tmp_path / "out"


def test_label_accuracy_table_is_exact(mnist_report):
    rows = read_csv(mnist_report / "label_accuracy.csv")
    assert rows["mnist", "dlg"] == {"dataset": "mnist", "protocol": "paper", "method": "dlg", "trials": "4",
                                    "correct": "3",
                                    "label_accuracy": "0.75", "paper_dataset": "MNIST",
                                    "paper_label_accuracy": "0.899"}
    assert float(rows["mnist", "idlg"]["label_accuracy"]) == 1.0
    assert float(rows["mnist", "idlg"]["paper_label_accuracy"]) == 1.0
    text = (mnist_report / "report.md").read_text()
    assert "| mnist (MNIST) | 75.0 (3/4) | 89.9 | 100.0 (4/4) | 100.0 |" in text


def test_fidelity_table_is_exact(mnist_report):
    rows = read_csv(mnist_report / "fidelity.csv")
    keys = ("0.01", "0.005", "0.001", "0.0005", "0.0001")
    assert [float(rows["mnist", "dlg"][f"mse_below_{k}"]) for k in keys] == [0.75, 0.75, 0.5, 0.25, 0.25]
    assert [float(rows["mnist", "idlg"][f"mse_below_{k}"]) for k in keys] == [0.5, 0.5, 0.5, 0.5, 0.25]
    assert [float(rows["mnist", "dlg"][f"paper_mse_below_{k}"]) for k in keys] == [0.763, 0.763, 0.762, 0.761,
                                                                                   0.76]
    assert rows["mnist", "dlg"]["trials"] == "4"
    text = (mnist_report / "report.md").read_text()
    assert "| mnist | DLG | ours | 4 | 75.0 | 75.0 | 50.0 | 25.0 | 25.0 |" in text
    assert "| mnist | iDLG | ours | 4 | 50.0 | 50.0 | 50.0 | 50.0 | 25.0 |" in text
    assert "| mnist | DLG | paper (MNIST) | 1000 | 76.3 | 76.3 | 76.2 | 76.1 | 76.0 |" in text
    assert "| mnist | iDLG | paper (MNIST) | 1000 | 89.2 | 89.0 | 88.6 | 88.4 | 87.4 |" in text


def test_convergence_table_is_exact(mnist_report):
    row = read_csv(mnist_report / "convergence.csv")["mnist", "dlg"]
    assert {k: row[k] for k in ("trials", "converged", "not_converged", "diverged")} == {
        "trials": "4", "converged": "2", "not_converged": "1", "diverged": "1"}
    assert float(row["median_steps_to_converge"]) == 15.0          # converged trials: 10, 20
    assert float(row["median_evaluations_to_converge"]) == 200.0   # 100, 300
    assert float(row["median_psnr"]) == 32.5                       # all trials: 50, 40, 25, 5
    assert float(row["median_ssim"]) == 0.5                        # 1, 0.75, 0.25, 0
    assert float(row["median_seconds_per_trial"]) == 2.5           # 1, 2, 3, 4
    assert float(row["total_seconds"]) == 10.0
    idlg = read_csv(mnist_report / "convergence.csv")["mnist", "idlg"]
    assert float(idlg["median_steps_to_converge"]) == 10.0
    assert "| mnist | DLG | 4 | 2 | 1 | 1 | 15 | 200 | 32.5 | 0.500 |" in (mnist_report / "report.md").read_text()


def test_report_agrees_with_the_run_summary(mnist_report, tmp_path):
    """One metric definition: the report's numbers are the runs' own summarize() / fidelity()."""
    summary = summarize(read_records(tmp_path / "run" / "trials.jsonl"))
    rows = read_csv(mnist_report / "fidelity.csv")
    for method in ("dlg", "idlg"):
        mses = [r["mse"] for r in MNIST if r["method"] == method]
        for key, share in fidelity(mses).items():
            assert float(rows["mnist", method][f"mse_below_{key}"]) == share == summary[method]["fidelity"][key]


def test_figures_are_valid_pngs(mnist_report):
    pictures = sorted(mnist_report.glob("*.png"))
    assert [p.name for p in pictures] == ["fidelity.png", "progress_00_run_00000.png"]
    for path in pictures:
        assert path.stat().st_size > 0
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
    with Image.open(mnist_report / "progress_00_run_00000.png") as labelled:
        assert labelled.width > 4 * 30 + 2                       # drawn with labels, not copied
    text = (mnist_report / "report.md").read_text()
    assert "![fidelity](fidelity.png)" in text and "(progress_00_run_00000.png)" in text


def test_strip_of_unexpected_geometry_is_copied(tmp_path):
    run = write_run(tmp_path / "run", MNIST, progress=(3, 4, 28))   # 3 rows, but the run has 2 methods
    write_report([run], tmp_path / "out")
    copied = tmp_path / "out" / "progress_00_run_00000.png"
    assert copied.read_bytes() == (run / "pictures" / "progress_00000.png").read_bytes()


def test_progress_pictures_only_from_the_runs_asked_for(tmp_path, monkeypatch):
    """--progress-from: strips of the built-in images only (other data sets' terms forbid publishing
    reconstructions); --no-progress: none. The tables still pool every run."""
    shared = write_run(tmp_path / "mnist", MNIST, progress=(2, 4, 28))
    builtin = write_run(tmp_path / "digits", [record("dlg", 0, 1e-5, dataset="digits"),
                                              record("idlg", 0, 1e-6, dataset="digits")], progress=(2, 4, 28))
    monkeypatch.chdir(tmp_path)
    assert main([str(shared), str(builtin), "--out", "a", "--progress-from", str(builtin)]) == 0
    assert [p.name for p in sorted((tmp_path / "a").glob("progress_*.png"))] == ["progress_00_digits_00000.png"]
    assert sorted(read_csv(tmp_path / "a" / "fidelity.csv")) == [("digits", "dlg"), ("digits", "idlg"),
                                                                  ("mnist", "dlg"), ("mnist", "idlg")]
    (tmp_path / "preface.md").write_text("Commands: `lightning-idlg experiment=paper_mnist`.\n")
    assert main([str(shared), str(builtin), "--out", "b", "--no-progress", "--report-name", "results.md",
                 "--preface", "preface.md"]) == 0
    assert not list((tmp_path / "b").glob("progress_*.png"))
    text = (tmp_path / "b" / "results.md").read_text()
    assert "Left out of this report (`--no-progress`)" in text and "No progress pictures" not in text
    assert text.index("Commands: `lightning-idlg experiment=paper_mnist`.") < text.index("## Runs")
    from importlib.metadata import version
    assert f"torch {version('torch')}" in text.split("## Made with")[1]  # versions, date, machine


def test_multirun_jobs_are_pooled_and_grouped(tmp_path, monkeypatch):
    sweep = tmp_path / "multirun"
    write_run(sweep / "0_seed=0", [record("dlg", i, m, seed=0) for i, m in enumerate((1e-5, 1.0))]
              + [record("idlg", i, 1e-6, seed=0) for i in range(2)], overrides=["dataset=mnist", "seed=0"])
    write_run(sweep / "1_seed=1", [record("dlg", i, m, seed=1, correct=False) for i, m in enumerate((1e-5, 1e-3))]
              + [record("idlg", i, 1e-6, seed=1) for i in range(2)], overrides=["dataset=mnist", "seed=1"])
    digits = write_run(tmp_path / "single", [record("dlg", 0, 0.5, dataset="digits"),
                                             record("idlg", 0, 1e-7, dataset="digits")])
    monkeypatch.chdir(tmp_path)
    assert main([str(sweep), str(digits)]) == 0
    out = tmp_path / "report"                                     # several RUN_DIRs: report/
    rows = read_csv(out / "fidelity.csv")
    assert sorted(rows) == [("digits", "dlg"), ("digits", "idlg"), ("mnist", "dlg"), ("mnist", "idlg")]
    assert rows["mnist", "dlg"]["trials"] == "4"
    assert float(rows["mnist", "dlg"]["mse_below_0.01"]) == 0.75      # 1e-5, 1.0, 1e-5, 1e-3
    assert float(rows["mnist", "dlg"]["mse_below_0.0001"]) == 0.5
    assert rows["digits", "dlg"]["paper_mse_below_0.01"] == ""
    labels = read_csv(out / "label_accuracy.csv")
    assert (labels["mnist", "dlg"]["correct"], labels["mnist", "dlg"]["label_accuracy"]) == ("2", "0.5")
    text = (out / "report.md").read_text()
    assert "| mnist (MNIST) | 50.0 (2/4) | 89.9 | 100.0 (4/4) | 100.0 |" in text
    assert "| digits | 0.0 (0/1) | — | 100.0 (1/1) | — |" not in text   # digits labels are correct
    assert "| digits | 100.0 (1/1) | — | 100.0 (1/1) | — |" in text
    assert "`lightning-idlg dataset=mnist seed=0`" in text and "`lightning-idlg dataset=mnist seed=1`" in text
    assert text.index("0_seed=0") < text.index("1_seed=1")
    assert "(no .hydra/overrides.yaml)" in text                     # the single run has none
    assert "CIFAR-100" not in text.split("## Notes")[1]               # no subset note without cifar100/lfw


def test_subset_datasets_get_a_provenance_note(tmp_path):
    run = write_run(tmp_path / "run", [record(m, i, 1e-6, dataset=d) for i, d in enumerate(("cifar100", "lfw"))
                                       for m in ("dlg", "idlg")])  # one run: each (method, index) once
    text = write_report([run], tmp_path / "out").read_text()
    notes = text.split("## Notes")[1]
    assert "CIFAR-100 / LFW" in notes and "not the paper's samples" in notes
    assert "| cifar100 | DLG | paper (CIFAR-100) | 1000 | 66.3 | 66.2 | 65.5 | 64.7 | 57.6 |" in text
    assert "| lfw | iDLG | paper (LFW) | 1000 | 91.5 | 91.4 | 91.1 | 90.9 | 83.3 |" in text


# the config.yaml keys that tell the protocols apart, as the presets resolve them
PAPER_CONFIG = {"optimizer": {"lr": 1.0, "line_search_fn": None}, "restarts": 0, "patience": None,
                "restart_distance": 0.01, "seed": 0}
IMPROVED_CONFIG = {"optimizer": {"lr": 1.0, "line_search_fn": "strong_wolfe"}, "restarts": 2, "patience": 20,
                   "restart_distance": 0.01, "seed": 0}


def test_protocol_of_a_config():
    assert protocol({}) == protocol(PAPER_CONFIG) == "paper"                  # no config.yaml: as before
    assert protocol({"optimizer": {"lr": 1.0}, "restart_distance": 0.5}) == "paper"   # inert without restarts
    assert protocol(IMPROVED_CONFIG) == "improved"
    for change in ({"optimizer": {"line_search_fn": "strong_wolfe"}}, {"restarts": 1}, {"patience": 5}):
        assert protocol({**PAPER_CONFIG, **change}) == "improved"
    reliable = {**IMPROVED_CONFIG, "patience": 50, "restart_distance": 1e-4, "keep": "best"}
    assert paper.protocol_of(reliable) == ("reliable", {})
    assert paper.protocol_of({**reliable, "restarts": 3}) == ("reliable", {"restarts": 3})
    assert paper.protocol_of({**IMPROVED_CONFIG, "keep": "best"}) == ("improved", {"keep": "best"})
    assert paper.protocol_of({**PAPER_CONFIG, "keep": "best"}) == ("custom", {"keep": "best"})
    assert paper.protocol_of({**IMPROVED_CONFIG, "restart_distance": 1e-5}) == ("improved", {"restart_distance": 1e-5})
    # paper_mnist_reliable also has a total-variation prior and no tolerance: still "reliable" on MNIST only
    mnist = {**reliable, "dataset": {"_target_": "lightning_idlg.case.dataset.mnist"}, "tolerance": None,
             "regularizers": {"tv": {"_target_": "lightning_idlg.attacks.regularizers.TotalVariation", "weight": 3e-8}}}
    assert paper.protocol_of(mnist) == ("reliable", {})
    assert paper.protocol_of({**mnist, "regularizers": {}}) == ("reliable", {"regularizers.tv.weight": None})
    assert paper.protocol_of({**mnist, "dataset": {"_target_": "lightning_idlg.case.dataset.cifar100"}}) == (
        "reliable", {"tolerance": None, "regularizers.tv.weight": 3e-8})
    assert paper.protocol_of({**PAPER_CONFIG, "regularizers": mnist["regularizers"]}) == (
        "custom", {"regularizers.tv.weight": 3e-8})
    # paper_lfw_reliable: 600 steps and a fainter prior; the old LFW preset (300 steps, no prior) differs in both
    lfw = {**reliable, "dataset": {"_target_": "lightning_idlg.case.dataset.lfw"}, "steps": 600,
           "regularizers": {"tv": {"_target_": "lightning_idlg.attacks.regularizers.TotalVariation", "weight": 1e-8}}}
    assert paper.protocol_of(lfw) == ("reliable", {})
    assert paper.protocol_of({**lfw, "steps": 300, "regularizers": {}}) == (
        "reliable", {"steps": 300, "regularizers.tv.weight": None})


def test_the_paper_command_names_the_run_data_set():
    """A variant on LFW or CIFAR-100 points to that data set's paper preset; a built-in one to MNIST's."""
    for loader, name in [("lfw", "lfw"), ("cifar100", "cifar100"), ("mnist", "mnist"), ("digits", "mnist"),
                         ("image_folder", "mnist")]:
        config = {"dataset": {"_target_": f"lightning_idlg.case.dataset.{loader}"}}
        assert paper.paper_command(config) == f"lightning-idlg experiment=paper_{name} dataset.root=/path/to/{name}"
    assert paper.paper_command({}) == "lightning-idlg experiment=paper_mnist dataset.root=/path/to/mnist"


def read_rows(path: Path) -> dict[tuple[str, str, str], dict]:
    with open(path, newline="") as f:
        return {(row["dataset"], row["protocol"], row["method"]): row for row in csv.DictReader(f)}


def test_improved_runs_are_reported_apart_from_the_paper_protocol(tmp_path):
    """Same data set, two protocols: two sets of rows, never pooled; two improved runs pool with each other."""
    # improved, pooled over seeds 0 and 1, all labels right:
    # DLG MSE 1e-6, 2e-5, 4e-4, 0.5 -> below 0.01: 3/4, 0.005: 3/4, 0.001: 3/4, 0.0005: 3/4, 0.0001: 2/4
    # iDLG MSE 1e-7, 1e-7, 3e-5, 6e-4 -> 4/4 down to 0.001, 3/4 at 0.0005 and 0.0001
    # restarts: DLG 0 + 1 + 2 + 2 = 5, iDLG 0 + 2 + 1 + 0 = 3
    write_run(tmp_path / "paper", MNIST, overrides=["experiment=paper_mnist", "trials=4"], config=PAPER_CONFIG)
    write_run(tmp_path / "improved_0", [
        record("dlg", 0, 1e-6, seed=0, restarts=0), record("dlg", 1, 2e-5, seed=0, restarts=1),
        record("idlg", 0, 1e-7, seed=0, restarts=0), record("idlg", 1, 1e-7, seed=0, restarts=2),
    ], overrides=["experiment=paper_mnist_improved", "seed=0"], config=IMPROVED_CONFIG)
    write_run(tmp_path / "improved_1", [
        record("dlg", 0, 4e-4, seed=1, restarts=2, image_index=2),
        record("dlg", 1, 0.5, seed=1, restarts=2, status="not_converged", image_index=3),
        record("idlg", 0, 3e-5, seed=1, restarts=1, image_index=2),
        record("idlg", 1, 6e-4, seed=1, restarts=0, image_index=3),
    ], overrides=["experiment=paper_mnist_improved", "seed=1"], config={**IMPROVED_CONFIG, "seed": 1})
    out = tmp_path / "out"
    text = write_report([tmp_path], out).read_text()

    labels = read_rows(out / "label_accuracy.csv")
    assert sorted(labels) == [("mnist", p, m) for p in ("improved", "paper") for m in ("dlg", "idlg")]
    assert [(r["trials"], r["correct"], r["label_accuracy"]) for r in labels.values()] == [
        ("4", "3", "0.75"), ("4", "4", "1.0"), ("4", "4", "1.0"), ("4", "4", "1.0")]   # paper rows first
    assert labels["mnist", "improved", "dlg"]["paper_label_accuracy"] == "0.899"     # the paper's, to compare
    assert "| mnist (MNIST) | 75.0 (3/4) | 89.9 | 100.0 (4/4) | 100.0 |" in text
    assert "| mnist, improved (MNIST) | 100.0 (4/4) | 89.9 | 100.0 (4/4) | 100.0 |" in text

    fid = read_rows(out / "fidelity.csv")
    keys = ("0.01", "0.005", "0.001", "0.0005", "0.0001")
    assert [float(fid["mnist", "paper", "dlg"][f"mse_below_{k}"]) for k in keys] == [0.75, 0.75, 0.5, 0.25, 0.25]
    assert [float(fid["mnist", "improved", "dlg"][f"mse_below_{k}"]) for k in keys] == [0.75, 0.75, 0.75, 0.75,
                                                                                          0.5]
    assert [float(fid["mnist", "improved", "idlg"][f"mse_below_{k}"]) for k in keys] == [1.0, 1.0, 1.0, 0.75,
                                                                                           0.75]
    assert "| mnist | DLG | ours | 4 | 75.0 | 75.0 | 50.0 | 25.0 | 25.0 |" in text
    assert "| mnist, improved | DLG | ours | 4 | 75.0 | 75.0 | 75.0 | 75.0 | 50.0 |" in text
    assert "| mnist, improved | iDLG | ours | 4 | 100.0 | 100.0 | 100.0 | 75.0 | 75.0 |" in text
    assert text.count("| mnist | DLG | paper (MNIST) | 1000 |") == 1                # the paper's row once

    conv = read_rows(out / "convergence.csv")
    assert {k: conv[k]["restarts"] for k in conv} == {
        ("mnist", "paper", "dlg"): "0", ("mnist", "paper", "idlg"): "0",              # no restarts field: 0
        ("mnist", "improved", "dlg"): "5", ("mnist", "improved", "idlg"): "3"}
    assert (conv["mnist", "improved", "dlg"]["converged"], conv["mnist", "improved", "dlg"]["not_converged"]) == (
        "3", "1")
    assert "| mnist, improved | DLG | 4 | 3 | 1 | 0 |" in text
    assert "| mnist | DLG | 4 | 2 | 1 | 1 | 15 | 200 | 32.5 | 0.500 |" in text

    notes = text.split("## Notes")[1]
    assert "Improved rows" in notes and "differ in" not in notes     # the protocols are not pooled
    assert "| paper | 4 / 4 / 0 |" in text and "| improved | 2 / 2 / 0 |" in text    # the runs table
    with Image.open(out / "fidelity.png") as image:
        assert image.format == "PNG"
        image.verify()


def test_paper_numbers():
    assert paper.LABEL_ACCURACY_PERCENT["mnist"]["dlg"] == 89.9
    assert paper.label_accuracy("mnist", "dlg") == 0.899
    assert paper.label_accuracy("cifar100", "dlg") == 0.833
    assert paper.label_accuracy("lfw", "dlg") == 0.791
    assert all(paper.label_accuracy(d, "idlg") == 1.0 for d in ("mnist", "cifar100", "lfw"))
    assert paper.fidelity("lfw", "idlg") == {"0.01": 0.915, "0.005": 0.914, "0.001": 0.911, "0.0005": 0.909,
                                             "0.0001": 0.833}
    assert tuple(paper.fidelity("mnist", "dlg")) == tuple(fidelity([]))   # keyed like metrics.fidelity
    assert paper.label_accuracy("digits", "dlg") is None and paper.fidelity("faces", "idlg") is None
    assert "2001.02610" in paper.SOURCE and "+-1 point" in paper.FIDELITY_NOTE


def test_cli_defaults_and_errors(tmp_path, capsys):
    run = write_run(tmp_path / "run", MNIST)
    assert main([str(run), "--title", "My report"]) == 0            # one RUN_DIR: written into it
    assert (run / "report.md").read_text().startswith("# My report\n")
    assert {"label_accuracy.csv", "fidelity.csv", "convergence.csv", "fidelity.png"} <= {
        p.name for p in run.iterdir()}
    assert "No progress pictures found" in (run / "report.md").read_text()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no trials.jsonl found" in capsys.readouterr().err
    assert not math.isnan(float(read_csv(run / "fidelity.csv")["mnist", "dlg"]["mse_below_0.01"]))


def composed(*overrides: str) -> dict:
    """config.yaml as a run writes it (resolved), from the real configs."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        return OmegaConf.to_container(compose("config", overrides=list(overrides)), resolve=True)


def test_presets_are_the_protocols_the_report_names():
    """paper.PROTOCOL is what experiment=paper_* sets, key by key (none missing), and the quick defaults of
    config.yaml do not leak into the presets; the `_improved` presets are PROTOCOL + IMPROVED."""
    for name in ("paper_mnist", "paper_cifar100", "paper_lfw"):
        config = composed(f"experiment={name}")
        flat = paper.flatten(config)
        assert {k: flat[k] for k in paper.PROTOCOL} == paper.PROTOCOL, name
        assert paper.protocol_of(config) == ("paper", {}) and protocol(config) == "paper"
        assert paper.protocol_of(composed(f"experiment={name}_improved")) == ("improved", {})
        assert paper.protocol_of(composed(f"experiment={name}", "steps=10")) == ("custom", {"steps": 10})
    default = composed()   # the quick look: improved stopping, 100 steps, no restarts
    assert paper.protocol_of(default) == ("improved", {"steps": 100, "restarts": 0})
    assert set(paper.differences(default)) == {"steps", "optimizer.line_search_fn", "patience"}
    assert paper.protocol_of(composed("experiment=paper_mnist", "method=dlg", "attack.dlg.stopping.divergence_bound=5")) == (
        "paper", {})                                      # not a protocol key (but never pooled: below)


def test_short_runs_are_not_the_paper_protocol_and_settings_never_pool(tmp_path):
    """experiment=paper_mnist steps=10 is "custom: steps=10", a row of its own without the paper's numbers
    beside it; runs that differ in any result-changing key get rows of their own, named by that key;
    seed, trials, threads and devices do not split a row."""
    four = [record(m, i, 1e-6, seed=s) for m in ("dlg", "idlg") for i in range(2) for s in (0,)]
    write_run(tmp_path / "paper", four, config=composed("experiment=paper_mnist"))
    write_run(tmp_path / "paper_again", [dict(r, seed=1) for r in four],
              config=composed("experiment=paper_mnist", "seed=1", "trials=2", "threads=1", "trainer=ddp"))
    write_run(tmp_path / "short", four, config=composed("experiment=paper_mnist", "steps=10"))
    write_run(tmp_path / "short_train", four, config=composed("experiment=paper_mnist", "steps=10",
                                                              "dataset.train=true"))
    out = tmp_path / "out"
    text = write_report([tmp_path], out).read_text()
    rows = read_rows(out / "fidelity.csv")
    assert sorted(rows) == sorted((
        ("mnist", variant, m) for m in ("dlg", "idlg")
        for variant in ("paper", "custom: steps=10; dataset.train=True", "custom: steps=10; dataset.train=False")))
    assert rows["mnist", "paper", "dlg"]["trials"] == "4"                       # two seeds pooled
    assert rows["mnist", "custom: steps=10; dataset.train=True", "dlg"]["trials"] == "2"
    assert rows["mnist", "paper", "dlg"]["paper_mse_below_0.01"] == "0.763"
    assert rows["mnist", "custom: steps=10; dataset.train=True", "dlg"]["paper_mse_below_0.01"] == ""
    labels = read_rows(out / "label_accuracy.csv")
    assert labels["mnist", "custom: steps=10; dataset.train=False", "dlg"]["paper_label_accuracy"] == ""
    assert "| mnist, custom: steps=10; dataset.train=False | DLG | ours | 2 |" in text
    assert text.count("| mnist | DLG | paper (MNIST) | 1000 |") == 1
    notes = text.split("## Notes")[1]
    assert "Not the paper protocol, and not the improved or reliable preset either: mnist, custom: steps=10" in notes
    assert "| `" + str(tmp_path / "short") + "` | mnist | custom: steps=10 |" in text   # the runs table


def test_a_paper_preset_run_alone_is_never_compared_when_short(tmp_path):
    """The issue's case: one run of experiment=paper_mnist steps=10; its curve is dotted and the paper's
    300-step curves are not drawn (no row of the panel is comparable)."""
    write_run(tmp_path / "short", MNIST, config=composed("experiment=paper_mnist", "steps=10"))
    text = write_report([tmp_path / "short"], tmp_path / "out").read_text()
    assert "| mnist, custom: steps=10 | DLG | ours | 4 |" in text
    assert "paper (MNIST)" not in text.split("## Fidelity")[1].split("## Reconstruction")[0]
    assert "| mnist, custom: steps=10 (MNIST) | 75.0 (3/4) | — | 100.0 (4/4) | — |" in text


def test_labelled_strips_are_copied_as_they_are(tmp_path):
    from lightning_idlg.run.pictures import LAYOUT_KEY, LAYOUT_VALUE
    from PIL import PngImagePlugin

    run = write_run(tmp_path / "run", MNIST, progress=(2, 4, 28))   # geometry a plain strip would have
    info = PngImagePlugin.PngInfo()
    info.add_text(LAYOUT_KEY, LAYOUT_VALUE)
    Image.new("RGB", (4 * 30 + 2, 2 * 30 + 2), (90, 140, 200)).save(run / "pictures" / "progress_00000.png",
                                                                    pnginfo=info)
    write_report([run], tmp_path / "out")
    assert (tmp_path / "out" / "progress_00_run_00000.png").read_bytes() == (
        run / "pictures" / "progress_00000.png").read_bytes()


# -- attack x victim x checkpoint -----------------------------------------------------------------------
LENET = {"_target_": "lightning_idlg.case.model.LeNet", "_partial_": True, "activation": "sigmoid", "width": 12}
UNIFORM = {"_target_": "lightning_idlg.case.model.UniformInit", "scale": 0.5}


def victim_config(seed, factory=LENET, init=UNIFORM):
    return {"seed": seed, "steps": 300, "model": {"factory": factory, "init": init}}


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def with_lpips(r, value):
    return {**r, "lpips": value} if value is not None else r


def test_victim_table_groups_by_attack_victim_and_checkpoint(tmp_path):
    # LeNet, uniform, DLG: two runs differing only in the seed pool: MSE 1e-4, 2e-3, 5e-4 -> 2 of 3 below 1e-3;
    # PSNR 40, 20, 30 -> 30; SSIM 0.9, 0.3, 0.6 -> 0.6; LPIPS 0.1, 0.5, 0.2 -> 0.2
    write_run(tmp_path / "a0", [with_lpips(record("dlg", 0, 1e-4, psnr=40.0, ssim=0.9), 0.1),
                                with_lpips(record("dlg", 1, 2e-3, psnr=20.0, ssim=0.3), 0.5)],
              config=victim_config(0))
    write_run(tmp_path / "a1", [with_lpips(record("dlg", 0, 5e-4, psnr=30.0, ssim=0.6, seed=1), 0.2)],
              config=victim_config(1))
    # the same LeNet from a saved checkpoint, iDLG, no LPIPS recorded: PSNR 10, 14 -> 12; SSIM 0.2, 0.4 -> 0.3
    write_run(tmp_path / "b", [record("idlg", 0, 1e-2, psnr=10.0, ssim=0.2), record("idlg", 1, 1e-5, psnr=14.0, ssim=0.4)],
              config=victim_config(0, init={"_target_": "lightning_idlg.case.model.CheckpointInit",
                                            "path": "/models/lenet_trained.pt"}))
    # an own victim (model=custom) with PyTorch's init, LPIPS on one trial of two
    resnet = {"_target_": "lightning_idlg.case.model.custom", "_partial_": True, "target": "zoo.ResNet20", "depth": 20}
    write_run(tmp_path / "c", [with_lpips(record("dlg", 0, 0.5, psnr=9.0, ssim=0.1), 0.7),
                               record("dlg", 1, 0.2, psnr=13.0, ssim=0.3)],
              config=victim_config(0, factory=resnet, init={"_target_": "lightning_idlg.case.model.DefaultInit"}))
    out = write_report([tmp_path], tmp_path / "report")
    rows = {(r["attack"], r["victim"], r["checkpoint"]): r for r in csv_rows(tmp_path / "report" / "victims.csv")}
    assert set(rows) == {("dlg", "LeNet (activation=sigmoid, width=12)", "uniform (scale=0.5)"),
                         ("idlg", "LeNet (activation=sigmoid, width=12)", "lenet_trained.pt"),
                         ("dlg", "ResNet20 (depth=20)", "default")}
    lenet = rows["dlg", "LeNet (activation=sigmoid, width=12)", "uniform (scale=0.5)"]
    assert (int(lenet["trials"]), int(lenet["successes"]), lenet["config"]) == (3, 2, "")
    assert [float(lenet[k]) for k in ("median_psnr", "median_ssim", "median_lpips")] == [30.0, 0.6, 0.2]
    saved = rows["idlg", "LeNet (activation=sigmoid, width=12)", "lenet_trained.pt"]
    assert (int(saved["successes"]), float(saved["median_psnr"]), float(saved["median_ssim"])) == pytest.approx((1, 12.0, 0.3))
    assert saved["median_lpips"] == "" and saved["lpips_trials"] == "0"
    resnet_row = rows["dlg", "ResNet20 (depth=20)", "default"]
    assert (float(resnet_row["median_psnr"]), float(resnet_row["median_lpips"]), resnet_row["lpips_trials"]) == (11.0, 0.7, "1")
    text = out.read_text()
    assert "| mnist | DLG | LeNet (activation=sigmoid, width=12) | uniform (scale=0.5) | 3 | 2/3 | 30.0 | 0.600 | 0.200 |" in text
    assert "| mnist | iDLG | LeNet (activation=sigmoid, width=12) | lenet_trained.pt | 2 | 1/2 | 12.0 | 0.300 | — |" in text
    assert "| mnist | DLG | ResNet20 (depth=20) | default | 2 | 0/2 | 11.0 | 0.200 | 0.700 (1) |" in text


def test_victim_table_keeps_apart_runs_that_differ_elsewhere_and_reads_axes_without_a_config(tmp_path):
    write_run(tmp_path / "a", [record("dlg", 0, 1e-4)], config=victim_config(0))
    write_run(tmp_path / "b", [record("dlg", 0, 1e-4)], config={**victim_config(0), "steps": 10})
    axes = {"model": "MLP", "model.factory.activation": "relu", "model.factory.hidden": [64], "model.init": "DefaultInit"}
    write_run(tmp_path / "c", [{**record("dlg", 0, 1e-4), "axes": axes}])
    legacy = {"seed": 0, "steps": 300, "model": {"factory": LENET, "init": "uniform", "init_scale": 0.5}}
    write_run(tmp_path / "d", [record("dlg", 1, 1e-2)], config=legacy)   # a config.yaml from before init nodes
    write_report([tmp_path], tmp_path / "report")
    rows = csv_rows(tmp_path / "report" / "victims.csv")
    lenet = [r for r in rows if r["victim"].startswith("LeNet")]
    assert len(lenet) == 2 and len({r["config"] for r in lenet}) == 2 and all(r["config"] for r in lenet)
    assert {r["checkpoint"] for r in lenet} == {"uniform (scale=0.5)"}
    assert sorted(int(r["trials"]) for r in lenet) == [1, 2]   # the legacy run pools with the 300-step one
    (mlp,) = [r for r in rows if r["victim"].startswith("MLP")]
    assert (mlp["victim"], mlp["checkpoint"]) == ("MLP (activation=relu, hidden=[64])", "default")


def test_convergence_shows_median_lpips_only_where_recorded(tmp_path):
    write_run(tmp_path / "a", [with_lpips(record("dlg", i, 1e-4), v) for i, v in enumerate((0.3, 0.1, 0.2))])
    write_run(tmp_path / "b", [record("idlg", 0, 1e-4)])
    out = write_report([tmp_path], tmp_path / "report")
    conv = {r["method"]: r for r in csv_rows(tmp_path / "report" / "convergence.csv")}
    assert float(conv["dlg"]["median_lpips"]) == 0.2 and conv["idlg"]["median_lpips"] == ""
    assert "| PSNR (dB) | SSIM | LPIPS | MSE |" in out.read_text()
