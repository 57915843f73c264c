"""W&B tracking: a real offline run of the app (`python -m lightning_idlg logger=wandb`), read back from the
run's own files: the `.wandb` record log (history, summary, config, tags) and files/media (panels, table).

wandb 0.31 writes no wandb-summary.json or config.yaml for an offline run; everything is in
run-<id>.wandb, the log `wandb sync` uploads. It is LevelDB's log format (32 KiB blocks of records with a
7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST) after a 7-byte ":W&B" file header, each record a
`wandb.proto.wandb_internal_pb2.Record`; `read_wandb_records` below reads it (wandb ships no reader now).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_idlg.run import tracking
from lightning_idlg.run.pictures import GAP, client_panel_canvas, panel_canvas, to_uint8
from lightning_idlg.records.store import summarize
from tests import cli

def _digits(size: int) -> torch.Tensor:
    from lightning_idlg.case.dataset import digits

    dataset = digits(image_size=size)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def _upscaled(image: torch.Tensor, scale: int) -> torch.Tensor:
    """(C, H, W) floats -> the (3, H*s, W*s) uint8 tile a picture shows."""
    tile = to_uint8(image[None])[0].expand(3, -1, -1)
    return tile.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def _tile(picture: torch.Tensor, canvas, row: int, column: int) -> torch.Tensor:
    (x, y), (h, w) = canvas.origins[row][column], canvas.tile
    return picture[:, y:y + h, x:x + w]


FAST = ["trials=2", "steps=3", "dataset=digits", "dataset.image_size=8", "optimizer.max_iter=2", "threads=1",
        "progress_bar=false", "pictures=false"]


def read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE.../LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def _items(updates) -> dict:
    # nested keys (an image's fields under its key) are joined with ".", W&B's own nesting separator
    return {(".".join(u.nested_key) if u.nested_key else u.key): json.loads(u.value_json) for u in updates}


def load_offline_run(run_dir: Path) -> dict:
    """history rows, summary, config, tags and group of an offline run dir (wandb/offline-run-*)."""
    out = {"history": [], "summary": {}, "config": {}, "tags": [], "group": ""}
    for record in read_wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "run":
            out["config"].update(_items(record.run.config.update))
            out["tags"], out["group"] = list(record.run.tags), record.run.run_group
    return out


def wandb_env(tmp_path: Path, **extra) -> dict:
    """Offline, silent, and every wandb folder inside tmp_path (staging of the table artifact included)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    for key, name in (("WANDB_DIR", "wandb_dir"), ("WANDB_DATA_DIR", "wandb_data"),
                      ("WANDB_CACHE_DIR", "wandb_cache"), ("WANDB_CONFIG_DIR", "wandb_config")):
        env[key] = str(tmp_path / name)
    env.update(WANDB_SILENT="true", NETRC=str(tmp_path / "no_netrc"), **extra)
    return env


@pytest.mark.slow
def test_offline_wandb_run_holds_curves_panels_table_summary_config(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_idlg", "logger=wandb", "logger.image_every=2", "logger.image_trials=2",
           f"hydra.run.dir={run_dir}", *FAST]
    done = cli.run(cmd, env=wandb_env(tmp_path, WANDB_MODE="offline"), capture_output=True, text=True,
                   timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")  # save_dir is the Hydra run dir
    run = load_offline_run(wandb_run)
    records = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]

    # per-step curves, on one step axis that continues from the DLG batch into the iDLG batch
    curves = [h for h in run["history"] if "idlg/mse" in h or "dlg/mse" in h]
    for method, steps in (("dlg", [1, 2, 3]), ("idlg", [4, 5, 6])):
        rows = [h for h in curves if f"{method}/distance" in h]
        assert [h["trainer/global_step"] for h in rows] == steps
        assert all({f"{method}/{k}" for k in ("mse", "psnr", "active_trials")} <= set(h) for h in rows)

    # image panels, PNG files under files/media/images/<method>/: at the batch's step 2 (image_every=2) and
    # at its last step, 3
    panels = [h for h in run["history"] if "idlg/reconstructions._type" in h or "dlg/reconstructions._type" in h]
    assert [h["trainer/global_step"] for h in panels] == [2, 3, 5, 6]
    truth = _digits(8)[[r["image_index"] for r in records if r["method"] == "dlg"]]
    for h in panels:
        key = "dlg" if "dlg/reconstructions.path" in h else "idlg"
        assert h[f"{key}/reconstructions._type"] == "image-file"
        # the panel as W&B stored it: 8-bit RGB over the full range, the ground-truth row equal to the
        # private images (quantized as save_image does, upscaled by nearest neighbour) where the layout
        # of the same panel puts them
        attack_step = h["trainer/global_step"] - (0 if key == "dlg" else 3)
        with Image.open(wandb_run / "files" / h[f"{key}/reconstructions.path"]) as stored:
            panel = torch.from_numpy(np.array(stored.convert("RGB"))).permute(2, 0, 1)
        assert stored.mode == "RGB" and panel.dtype == torch.uint8 and int(panel.max()) == 255
        assert (h[f"{key}/reconstructions.width"], h[f"{key}/reconstructions.height"]) == stored.size
        canvas = panel_canvas(key, attack_step, truth, truth, [0, 1])
        assert canvas.image.size == stored.size and canvas.scale >= 4
        for column in range(2):
            assert torch.equal(_tile(panel, canvas, 0, column), _upscaled(truth[column], canvas.scale))
        assert h[f"{key}/reconstructions.caption"].startswith(f"{key} at step {attack_step} of its batch")

    # the per-trial table: one row per trial and method, as in trials.jsonl
    (table_row,) = [h for h in run["history"] if h.get("trials._type") == "table-file"]
    table = json.loads((wandb_run / "files" / table_row["trials.path"]).read_text())
    assert table["columns"] == list(tracking.TABLE_COLUMNS)
    assert sorted((r[0], r[1]) for r in table["data"]) == sorted((r["method"], r["index"]) for r in records)
    by_key = {(r["method"], r["index"]): r for r in records}
    for row in table["data"]:
        record = by_key[row[0], row[1]]
        assert row[2:4] == [record["label"], record["predicted_label"]] and row[7:] == [record["status"],
                                                                                      record["steps"]]
        assert row[4] == pytest.approx(record["mse"])

    # run.summary: label accuracy, fidelity at the five thresholds, status counts, median steps
    summary = json.loads((run_dir / "summary.json").read_text())
    for method in ("dlg", "idlg"):
        assert run["summary"][f"{method}/label_accuracy"] == summary[method]["label_accuracy"]
        for t in ("1e-02", "5e-03", "1e-03", "5e-04", "1e-04"):
            assert run["summary"][f"{method}/fidelity/{t}"] == summary[method]["fidelity"][str(float(t))]
        for status in ("converged", "not_converged", "diverged"):
            assert run["summary"][f"{method}/status/{status}"] == summary[method]["status"][status]
        assert f"{method}/steps_to_converge" in run["summary"]

    # the resolved config, and the tags
    assert run["config"]["trials"] == 2 and run["config"]["optimizer"]["max_iter"] == 2
    assert run["config"]["logger"]["save_dir"] == str(run_dir)
    assert run["tags"] == ["dlg", "idlg", "digits"] and run["group"] == ""


def test_auto_mode_is_offline_without_api_key(tmp_path, monkeypatch):
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert tracking.resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.resolve_mode("auto") == "disabled"  # the environment's choice wins
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.resolve_mode("auto") == "online"
    assert tracking.resolve_mode("offline") == "offline"
    with pytest.raises(ValueError, match="logger.mode='cloud' is not known; valid: auto, online"):
        tracking.resolve_mode("cloud")


def test_flat_summary_names_and_metric_value():
    records = [{"method": "idlg", "label_correct": True, "mse": m, "psnr": 30.0, "ssim": 0.9, "status": s,
                "steps": 4, "evaluations": 40, "seconds": 1.0}
               for m, s in ((1e-5, "converged"), (2e-3, "not_converged"), (math.nan, "diverged"))]
    flat = tracking.flat_summary(summarize(records))
    assert flat["idlg/fidelity/1e-03"] == pytest.approx(1 / 3)
    assert flat["idlg/fidelity/5e-03"] == pytest.approx(2 / 3)
    assert flat["idlg/status/diverged"] == 1 and flat["idlg/steps_to_converge"] == 4
    assert "idlg/median_psnr" in flat and "idlg/psnr" not in flat  # the curve keeps the plain name
    assert not any("." in name for name in flat)  # W&B would read a dot as nesting
    assert list(flat) == tracking.metric_names(["idlg"])
    assert tracking.metric_value(summarize(records), "idlg/label_accuracy") == 1.0
    with pytest.raises(tracking.MetricNameError, match=r"optimized_metric='idlg/fidelity/0.001' is not in the"):
        tracking.metric_value(summarize(records), "idlg/fidelity/0.001")


def test_spawned_ranks_keep_the_multirun_group(monkeypatch):
    """trainer=ddp in a multirun: the ranks are fresh interpreters without Hydra's state, so the parent puts
    the multirun's group into their config (else rank 0 would log an ungrouped run)."""
    from omegaconf import OmegaConf

    from lightning_idlg.run.ranks import rank_config

    monkeypatch.setattr(tracking, "multirun_group", lambda: "2026-01-01-12-00-00")
    cfg = OmegaConf.create({"logger": {"_target_": "lightning_idlg.run.tracking.WandbTracker", "group": None},
                            "trials": "${steps}", "steps": 3})
    plain = rank_config(cfg)
    assert plain.logger.group == "2026-01-01-12-00-00" and plain.trials == 3
    cfg.logger.group = "mine"  # a group the user set wins
    assert rank_config(cfg).logger.group == "mine"
    assert rank_config(OmegaConf.create({"logger": None})).logger is None  # logger=none: nothing to group


class _CapturingWandb(tracking.WandbLogger):
    """A WandbLogger that keeps what it is asked to log (no W&B run)."""

    def __init__(self):  # noqa: D107 - no super().__init__: nothing of W&B is started
        self.image_every, self.image_trials, self.logged = 1, 3, []

    def log_metrics(self, metrics, step=None):
        self.logged.append((metrics, step))


def test_panel_holds_the_reconstruction_in_0_255():
    """The panel W&B gets is the 8-bit picture of the reconstruction: its PNG, read back, holds
    round(255 x clamp(x', 0, 1)) in every pixel of each tile (NaN black), labelled method, step, trials."""
    generator = torch.Generator().manual_seed(0)
    truth = torch.rand(4, 1, 8, 8, generator=generator)
    dummy = 1.6 * torch.rand(4, 1, 8, 8, generator=generator) - 0.3   # some below 0, some above 1
    dummy[1, 0, 2, 3] = float("nan")
    logger = _CapturingWandb()
    tracking.log_panel(logger, "idlg", truth, dummy, step=57, attack_step=7, trials=[32, 33, 34, 35])
    ((metrics, step),) = logger.logged
    image = metrics["idlg/reconstructions"]
    assert step == 57 and image._caption.startswith("idlg at step 7 of its batch (chart step 57)")
    assert "trials 32, 33, 34" in image._caption
    with Image.open(image._path) as stored:
        assert stored.format == "PNG" and stored.mode == "RGB"
        panel = torch.from_numpy(np.array(stored)).permute(2, 0, 1)
    canvas = panel_canvas("idlg", 7, truth[:3], dummy[:3], [32, 33, 34])
    assert canvas.scale >= 4 and stored.size == canvas.image.size
    for column in range(3):
        assert torch.equal(_tile(panel, canvas, 0, column), _upscaled(truth[column], canvas.scale))
        tile = _tile(panel, canvas, 1, column)
        assert torch.equal(tile, _upscaled(dummy[column], canvas.scale))
        expected = torch.nan_to_num(dummy[column, 0]).clamp(0, 1).mul(255).add(0.5).floor()
        assert torch.equal(tile[0, ::canvas.scale, ::canvas.scale].float(), expected)   # independent of to_uint8
    assert int(_tile(panel, canvas, 1, 1)[0, 2 * canvas.scale, 3 * canvas.scale]) == 0    # NaN: black
    assert int(panel.max()) == 255 and int(panel.min()) == 0


def _stored(image) -> torch.Tensor:
    with Image.open(image._path) as stored:
        assert stored.format == "PNG" and stored.mode == "RGB"
        return torch.from_numpy(np.array(stored)).permute(2, 0, 1)


def test_client_panels_put_each_reconstruction_under_its_matched_private_image():
    """B = 3: one panel per client (`idlg/client_<trial>`), 2 rows x 3 columns: the private images on top,
    under private image j the reconstruction metrics.match assigns to it (here: the dummy batch holds the
    private images in another order, plus noise), labelled with its MSE to that image."""
    generator = torch.Generator().manual_seed(1)
    truth = torch.rand(2, 3, 1, 8, 8, generator=generator)
    orders = torch.tensor([[2, 0, 1], [1, 2, 0]])             # dummy position i holds private image orders[k, i]
    noise = 0.01 * torch.randn(2, 3, 1, 8, 8, generator=generator)
    dummy = torch.stack([truth[k, orders[k]] for k in range(2)]) + noise
    logger = _CapturingWandb()                                 # image_trials=3 > the 2 clients: both get one
    tracking.log_client_panels(logger, "idlg", truth, dummy, step=40, attack_step=4, trials=[6, 9])
    ((metrics, step),) = logger.logged
    assert step == 40 and sorted(metrics) == ["idlg/client_6", "idlg/client_9"]
    for k, trial in enumerate((6, 9)):
        image = metrics[f"idlg/client_{trial}"]
        assert image._caption.startswith(f"idlg, client of trial {trial}, at step 4 of its batch (chart step 40)")
        panel = _stored(image)
        position = orders[k].argsort()                       # where private image j sits in the dummy batch
        errors = [float(((dummy[k, position[j]] - truth[k, j]) ** 2).mean()) for j in range(3)]
        canvas = client_panel_canvas("idlg", 4, trial, truth[k], dummy[k, position], errors)
        # the layout: 2 rows of 3 tiles of 8 x scale pixels, one GAP apart in a row, rows aligned
        assert len(canvas.origins) == 2 and [len(row) for row in canvas.origins] == [3, 3]
        th, tw = canvas.tile
        assert (th, tw) == (8 * canvas.scale, 8 * canvas.scale) and canvas.scale >= 4
        xs = [[x for x, _ in row] for row in canvas.origins]
        assert xs[0] == xs[1] and xs[0][1] - xs[0][0] == xs[0][2] - xs[0][1] >= tw + GAP
        assert canvas.origins[1][0][1] >= canvas.origins[0][0][1] + th + GAP
        assert tuple(panel.shape[1:]) == (canvas.image.size[1], canvas.image.size[0])
        assert panel.shape[2] >= xs[0][2] + tw and panel.shape[1] >= canvas.origins[1][0][1] + th
        for j in range(3):
            assert torch.equal(_tile(panel, canvas, 0, j), _upscaled(truth[k, j], canvas.scale))
            assert torch.equal(_tile(panel, canvas, 1, j), _upscaled(dummy[k, position[j]], canvas.scale))
            assert errors[j] < 1e-3                              # the right one: noise only
    # the same panel from the reconstructions in the order they came would differ: matching matters
    assert not torch.equal(_tile(panel, canvas, 1, 0), _upscaled(dummy[1, 0], canvas.scale))


@pytest.mark.slow
def test_offline_wandb_run_of_a_b3_client_logs_one_panel_per_client(tmp_path):
    """DLG on clients of B = 3 digits: at the panel steps (2, and the last, 3) each of the 2 clients gets
    `dlg/client_<trial>`, a picture of its 3 private images over its 3 matched reconstructions."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_idlg", "logger=wandb", "logger.image_every=2", "logger.image_trials=2",
           "method=dlg", "client.batch_size=3", f"hydra.run.dir={run_dir}", *FAST]
    done = cli.run(cmd, env=wandb_env(tmp_path, WANDB_MODE="offline"), capture_output=True, text=True,
                   timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    run = load_offline_run(wandb_run)
    records = {r["index"]: r for r in map(json.loads, (run_dir / "trials.jsonl").read_text().splitlines())}
    digits = _digits(8)
    panels = [h for h in run["history"] if "dlg/client_0._type" in h]
    assert [h["trainer/global_step"] for h in panels] == [2, 3]
    assert not any("dlg/reconstructions._type" in h for h in run["history"])  # B > 1: per client only
    for h in panels:
        for trial in (0, 1):
            key = f"dlg/client_{trial}"
            assert h[f"{key}._type"] == "image-file"
            truth = digits[records[trial]["image_index"]]                      # the client's 3 images
            with Image.open(wandb_run / "files" / h[f"{key}.path"]) as stored:
                panel = torch.from_numpy(np.array(stored.convert("RGB"))).permute(2, 0, 1)
            # the layout of a B = 3 panel at this step (tile labels are narrower than the 96-pixel tiles)
            canvas = client_panel_canvas("dlg", h["trainer/global_step"], trial, truth, truth, [0.0] * 3)
            assert (h[f"{key}.width"], h[f"{key}.height"]) == canvas.image.size
            assert [len(row) for row in canvas.origins] == [3, 3]
            for j in range(3):
                assert torch.equal(_tile(panel, canvas, 0, j), _upscaled(truth[j], canvas.scale))


@pytest.mark.slow
def test_offline_wandb_label_restoration_logs_table_and_plot(tmp_path):
    """lightning-idlg-labels logger=wandb: the W&B run holds the per-cell table (labels.csv's columns and
    rows) and labels.png, the config, and the strategies and data set as tags."""
    from lightning_idlg.report.labels import COLUMNS

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lightning_idlg.label_restoration", "logger=wandb", "clients=6", "clients_per_group=3",
           "batch_sizes=[1,2]", "labels=[distinct,repeated]", f"hydra.run.dir={run_dir}"]
    done = cli.run(cmd, env=wandb_env(tmp_path, WANDB_MODE="offline"), capture_output=True, text=True,
                   timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    run = load_offline_run(wandb_run)
    (row,) = [h for h in run["history"] if h.get(f"{tracking.LABEL_TABLE}._type") == "table-file"]
    table = json.loads((wandb_run / "files" / row[f"{tracking.LABEL_TABLE}.path"]).read_text())
    csv_rows = [line.split(",") for line in (run_dir / "labels.csv").read_text().splitlines()[1:]]
    assert table["columns"] == list(COLUMNS)
    # 2 draws x (B = 1: 5 strategies, B = 2: 4, iDLG is B = 1 only) = 18 cells, as in labels.csv
    assert len(table["data"]) == len(csv_rows) == 18
    at = {c: i for i, c in enumerate(COLUMNS)}
    for got, want in zip(table["data"], csv_rows):
        assert [got[at[c]] for c in ("dataset", "model", "labels", "strategy")] == [want[at[c]] for c in
                                                                                  ("dataset", "model", "labels", "strategy")]
        assert got[at["batch_size"]] == int(want[at["batch_size"]]) and got[at["clients"]] == 6
        for score in ("exact", "count_accuracy", "instance_accuracy"):
            assert got[at[score]] == pytest.approx(float(want[at[score]]), abs=5e-5)
    assert {tuple(r[at[c]] for c in ("labels", "batch_size", "strategy")) for r in table["data"]} >= \
        {("distinct", 1, "iDLG"), ("repeated", 2, "LLGPlus")}
    (plot,) = [h for h in run["history"] if h.get(f"{tracking.LABEL_PLOT}._type") == "image-file"]
    with Image.open(run_dir / "labels.png") as png:
        assert (plot[f"{tracking.LABEL_PLOT}.width"], plot[f"{tracking.LABEL_PLOT}.height"]) == png.size
    assert run["config"]["clients"] == 6 and run["config"]["batch_sizes"] == [1, 2]
    assert run["tags"] == ["iDLG", "Yin", "LLG", "LLGPlus", "bias-corrected", "digits"]
