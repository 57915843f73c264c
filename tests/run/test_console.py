"""What a person sees: the console at 80 columns and without a terminal, the run's log file, the progress
bars' counts as the attack moves."""

from __future__ import annotations

import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from rich.progress import Progress

from lightning_idlg.run.console import print_summary, summary_text
from lightning_idlg.run.monitor import AttackProgress
from lightning_idlg.records.store import summarize
from tests.conftest import run_app


def app(*args: str, cwd, **env) -> subprocess.CompletedProcess:
    return run_app(*args, cwd=cwd, COLUMNS="80", **env)


@pytest.mark.slow
def test_console_fits_80_columns_and_the_log_file_holds_it(tmp_path):
    """Piped (no terminal), logger=csv: plain lines of at most 80 characters, nothing cut short with an
    ellipsis, the run dir at the start and the end, the one-line pointer to the paper protocol; the log
    file holds the same lines; no Lightning warning leaks."""
    out = tmp_path / "run"
    done = app("trials=2", "steps=3", "dataset.image_size=8", "logger=csv", f"hydra.run.dir={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"run dir: {out}" and lines[-1] == f"outputs: {out}"
    assert all(len(line) <= 80 for line in lines[1:-1]), max(lines[1:-1], key=len)   # but the tmp path
    assert "…" not in done.stdout and "┃" not in done.stdout
    assert "lightning_idlg summary" in lines and any(line.startswith("dlg ") for line in lines)
    assert "Paper: lightning-idlg experiment=paper_mnist dataset.root=/path/to/mnist" in lines
    log = (out / "lightning-idlg.log").read_text()
    for line in lines:
        assert line in log, line
    assert "log_every_n_steps" not in done.stderr and "Warning" not in done.stderr, done.stderr[-2000:]


def test_summary_text_fits_80_columns():
    records = [{"method": m, "label_correct": True, "mse": 1e-7, "psnr": float("inf"), "ssim": 1.0,
                "status": "converged", "steps": 123, "evaluations": 99999, "seconds": 1.0}
               for m in ("dlg", "idlg") for _ in range(1000)]
    text = summary_text(summarize(records))
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "idlg      1000  1.000  1.000  1.000  1.000  1000    0   inf  1.000    123" in text.splitlines()


def test_summary_on_a_terminal_is_a_table_within_80_columns():
    from rich.console import Console

    console = Console(width=80, record=True, force_terminal=True, file=open(os.devnull, "w"))
    records = [{"method": "idlg", "label_correct": True, "mse": 1e-7, "psnr": 61.2, "ssim": 0.999,
                "status": "converged", "steps": 12, "evaluations": 240, "seconds": 1.0}] * 8
    print_summary(summarize(records), console)
    shown = console.export_text()
    assert max(len(line) for line in shown.splitlines()) <= 80 and "…" not in shown
    assert "<1e-3" in shown and "idlg" in shown and "61.2" in shown


def test_progress_counts_move_with_the_attack_state():
    """The method bar counts trials done (converged, diverged or stopped) among the batch's rows that are
    its own, on top of earlier batches; the steps bar shows the step and the active trials' median D."""
    progress = Progress(disable=True)
    method_task = progress.add_task("idlg", total=40, completed=32, info="")
    steps_task = progress.add_task("steps", total=100, info="")
    watch = AttackProgress(progress, method_task, steps_task, steps=100, rows=[0, 1, 2, 3], done=32, converged=30)
    module = SimpleNamespace(method="idlg", distance=torch.tensor([1e-7, 2e-3, 4e-3, 8e-3, 1.0]),
                             converged=torch.tensor([True, False, False, False, False]),
                             diverged=torch.tensor([False, True, False, False, False]),
                             stopped=torch.zeros(5, dtype=torch.bool))
    watch.on_train_start(SimpleNamespace(), module)
    watch.on_train_batch_end(SimpleNamespace(global_step=17, max_steps=100), module, None, None, 16)
    method, steps = progress.tasks
    assert (method.completed, method.fields["info"]) == (34, "31 converged, 2 active")
    assert steps.completed == 17 and steps.description == "idlg steps"
    assert steps.fields["info"] == "median D 8.0e-03"     # rows 2, 3, 4 active: 4e-3, 8e-3, 1.0
    watch.on_train_batch_end(SimpleNamespace(global_step=150, max_steps=300), module, None, None, 149)
    assert progress.tasks[1].total == 300                  # a restarted trial runs past `steps`
    watch.on_train_end(SimpleNamespace(global_step=160), module)
    assert (progress.tasks[1].completed, progress.tasks[1].total) == (160, 160)   # ended early: no ETA left
