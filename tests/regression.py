"""Fixed small runs of the app, and a script that writes their records: `python tests/regression.py OUT.json`
writes them with whatever engine is installed. For a before/after check of a change on one machine (a
refactoring must leave records bitwise equal): run it on both commits there and compare the two files.
Records are not stored in the repository: the paper protocol is chaotic and another CPU's kernels give
other trajectories (tests/run/test_regression.py checks the engine against tests/reference.py instead). The
shared settings (PAPER, COMMON, write_folder) are used by that test too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FIELDS = ("method", "index", "image_index", "label", "predicted_label", "status", "steps", "evaluations",
          "restarts", "mse", "psnr", "ssim", "distance")
# the paper's optimizer and stopping, which were the app's defaults when the records were stored
COMMON = ("threads=1", "progress_bar=false", "pictures=false")
PAPER = ("optimizer=lbfgs", "patience=null", "restarts=0")
CASES = {
    # the paper protocol on the built-in digits (LeNet, 1x28x28, 10 classes)
    "digits_paper": ("trials=4", "steps=12"),
    # 3x32x32 images, 20 classes: the CIFAR shape, the rank-one head route with 768 features
    "folder_paper": ("dataset=image_folder", "dataset.root={folder}", "trials=4", "steps=8"),
    # the improved stopping rules: strong-Wolfe, patience, restarts
    "digits_improved": ("trials=4", "steps=12", "optimizer.line_search_fn=strong_wolfe", "patience=4",
                        "restarts=1"),
    # float64 all the way: the exact head route (no rank-one factoring)
    "digits_float64": ("trials=2", "steps=6", "trainer.precision=64-true"),
}


def write_folder(root: Path, classes: int = 20, per_class: int = 2) -> Path:
    """Deterministic 32x32 RGB PNGs (smooth random fields, like photographs more than noise)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            coarse = rng.random((8, 8, 3))
            image = np.kron(coarse, np.ones((4, 4, 1)))
            Image.fromarray((image * 255).astype(np.uint8)).save(root / f"class{c:02d}" / f"{i}.png")
    return root


def run_case(name: str, work: Path) -> list[dict]:
    folder = write_folder(work / "folder")
    out = work / name
    args = [a.format(folder=folder) for a in (*PAPER, *CASES[name])]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "lightning_idlg", *args, *COMMON, f"hydra.run.dir={out}"],
                          env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    return sorted(({k: r[k] for k in FIELDS} for r in rows), key=lambda r: (r["method"], r["index"]))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        stored = {name: run_case(name, Path(tmp)) for name in CASES}
    Path(sys.argv[1]).write_text(json.dumps(stored, indent=1) + "\n")
