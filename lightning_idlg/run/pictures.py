"""Pictures of reconstructions, labelled and large enough to look at.

- `trial_NNNNN.png`: ground truth | DLG | iDLG (the methods that ran), each tile labelled (true or
  recovered label, MSE, status), the trial, image and label in the title;
- `progress_NNNNN.png`: one row per method, a snapshot every `snapshot_every` steps from step 0 (the
  random draw) up to the step the trial stopped at (converged, diverged or out of steps), each tile
  labelled with its step (the paper's Figure 2);
- the W&B reconstruction panels (`tracking.log_panel`): ground truth over reconstruction, per trial; for
  clients of B > 1 samples (`tracking.log_client_panels`) one per client: its B private images over the
  reconstructions matched to them.

Tiles are shown clamped to [0, 1], the domain the metrics use (NaN shows black), quantized to 8 bits as
torchvision's `save_image` does (x * 255 + 0.5, truncated), and upscaled by a whole factor, at least
`MIN_SCALE`, with nearest-neighbour sampling (one image pixel stays a square of pixels). Tiles are
converted with torchvision (`to_pil_image`), labels are drawn with PIL. Every picture carries the PNG
text entry `LAYOUT_KEY`, so the report knows it is labelled already (older runs' plain strips it labels
itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin
from omegaconf import DictConfig
from torchvision.transforms.functional import to_pil_image

from lightning_idlg.attacks.result import AttackResult
from lightning_idlg.case.client import PrivateBatch
from lightning_idlg.case.plan import Trial
from lightning_idlg.records import metrics
from lightning_idlg.records.metrics import clamped
from lightning_idlg.records.schema import LAYOUT_KEY, LAYOUT_VALUE, METHOD_NAMES

MIN_SCALE = 4            # upscale at least 4x ...
MIN_TILE = 96            # ... and to at least ~96 pixels a side (8x8 digits: 12x)
MAX_SNAPSHOTS = 12       # a progress row shows at most this many snapshots (evenly chosen, ends kept)
GAP, MARGIN, FONT_SIZE = 6, 8, 12


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) floats -> (N, C, H, W) uint8: clamped to [0, 1], NaN black, x * 255 + 0.5 truncated
    (torchvision's save_image)."""
    return clamped(images).mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def scale_for(height: int, width: int) -> int:
    """The whole upscaling factor for a tile of height x width."""
    return max(MIN_SCALE, math.ceil(MIN_TILE / max(height, width)))


def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, spacing=2)
    return right, bottom


@dataclass
class Canvas:
    """A labelled grid: the picture, each tile's top-left corner (`origins[row][col]`, None for no tile),
    the upscaling factor and a tile's (height, width) in the picture."""

    image: Image.Image
    origins: list[list[tuple[int, int] | None]]
    scale: int
    tile: tuple[int, int]

    def save(self, path: Path) -> None:
        info = PngImagePlugin.PngInfo()
        info.add_text(LAYOUT_KEY, LAYOUT_VALUE)
        self.image.save(path, pnginfo=info)


def labelled_grid(rows: list[list[torch.Tensor | None]], row_labels: list[str], tile_labels: list[list[str]],
                  title: str = "", col_labels: list[str] | None = None) -> Canvas:
    """Tiles (C, H, W) in rows (a row may be shorter, or hold None: no tile there), a label left of each
    row, one under each tile, optional labels over the columns, a title on top."""
    tiles = [t for row in rows for t in row if t is not None]
    c, h, w = tiles[0].shape
    scale = scale_for(h, w)
    th, tw = h * scale, w * scale
    pixels = iter(to_uint8(torch.stack([t.float() for t in tiles])))
    font, probe = _font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_size(probe, text, font)[0] for text in row_labels) if row_labels else 0
    below = max([_text_size(probe, text, font)[1] for row in tile_labels for text in row] + [0])
    cols = max(len(row) for row in rows)
    cell_w = max([tw] + [_text_size(probe, text, font)[0] for row in tile_labels for text in row]
                 + [_text_size(probe, text, font)[0] for text in col_labels or []])
    title_h = _text_size(probe, title, font)[1] + GAP if title else 0
    head_h = max([_text_size(probe, text, font)[1] for text in col_labels or []] + [0])
    head_h += GAP if head_h else 0
    row_h = max(th + (below + 2 if below else 0), max([_text_size(probe, t, font)[1] for t in row_labels] + [0]))
    left = MARGIN + label_w + (GAP if label_w else 0)
    width = max(left + cols * cell_w + (cols - 1) * GAP + MARGIN, 2 * MARGIN + _text_size(probe, title, font)[0])
    height = MARGIN + title_h + head_h + len(rows) * row_h + (len(rows) - 1) * GAP + MARGIN
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((MARGIN, MARGIN), title, fill="black", font=font)
    top = MARGIN + title_h
    for j, text in enumerate(col_labels or []):
        x = left + j * (cell_w + GAP) + (cell_w - _text_size(probe, text, font)[0]) // 2
        draw.text((x, top), text, fill="black", font=font)
    top += head_h
    origins: list[list[tuple[int, int] | None]] = []
    for i, row in enumerate(rows):
        y = top + i * (row_h + GAP)
        if i < len(row_labels):
            draw.multiline_text((MARGIN, y + max(0, (th - _text_size(probe, row_labels[i], font)[1]) // 2)),
                                row_labels[i], fill="black", font=font, spacing=2)
        origins.append([])
        for j, tile in enumerate(row):
            if tile is None:
                origins[-1].append(None)
                continue
            x = left + j * (cell_w + GAP) + (cell_w - tw) // 2
            picture = to_pil_image(next(pixels)).convert("RGB").resize((tw, th), Image.Resampling.NEAREST)
            image.paste(picture, (x, y))
            origins[-1].append((x, y))
            text = tile_labels[i][j] if i < len(tile_labels) and j < len(tile_labels[i]) else ""
            if text:
                tx = left + j * (cell_w + GAP) + (cell_w - _text_size(probe, text, font)[0]) // 2
                draw.multiline_text((tx, y + th + 2), text, fill="black", font=font, spacing=2, align="center")
    return Canvas(image, origins, scale, (th, tw))


def _sci(value: float) -> str:
    return f"{value:.1e}" if math.isfinite(value) else str(value)


@dataclass
class Outcome:
    """What a picture says about one method's attack on one trial."""

    method: str
    dummy: torch.Tensor            # (C, H, W), the final reconstruction
    label: int                     # the recovered label
    mse: float
    status: str
    steps: int                     # the step the trial stopped at
    snapshots: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, dummy), from step 0

    @property
    def name(self) -> str:
        return METHOD_NAMES.get(self.method, self.method)


def trial_canvas(index: int, image_index: int, label: int, truth: torch.Tensor, outcomes: list[Outcome]) -> Canvas:
    """Ground truth beside each method's final reconstruction."""
    row = [truth, *(o.dummy for o in outcomes)]
    labels = [f"label {label}", *(f"label {o.label}\nMSE {_sci(o.mse)}\n{o.status.replace('_', ' ')}"
                                  for o in outcomes)]
    return labelled_grid([row], [], [labels], f"trial {index} (image {image_index}, label {label})",
                         ["ground truth", *(o.name for o in outcomes)])


def progress_snapshots(outcome: Outcome, limit: int = MAX_SNAPSHOTS) -> list[tuple[int, torch.Tensor]]:
    """The snapshots before the step the trial stopped at, then its final reconstruction at that step;
    at most `limit`, evenly spread, the first and the last kept."""
    shown = [(step, snap) for step, snap in outcome.snapshots if step < outcome.steps]
    shown.append((outcome.steps, outcome.dummy))
    if len(shown) > limit:
        picks = sorted({round(i * (len(shown) - 1) / (limit - 1)) for i in range(limit)})
        shown = [shown[i] for i in picks]
    return shown


def progress_canvas(index: int, image_index: int, label: int, outcomes: list[Outcome]) -> Canvas:
    """One row per method, from the random start to where the trial stopped."""
    rows, tile_labels, row_labels = [], [], []
    for o in outcomes:
        shown = progress_snapshots(o)
        rows.append([snap for _, snap in shown])
        tile_labels.append([f"step {step}" for step, _ in shown])
        when = "at" if o.status == "converged" else "stopped at"
        row_labels.append(f"{o.name}\n{o.status.replace('_', ' ')}\n{when} step {o.steps}\nMSE {_sci(o.mse)}")
    return labelled_grid(rows, row_labels, tile_labels, f"trial {index} (image {image_index}, label {label}): "
                         "reconstruction from the random start (step 0) to the step it stopped at")


def save_trial_picture(path: Path, index: int, image_index: int, label: int, truth: torch.Tensor,
                       outcomes: list[Outcome]) -> None:
    trial_canvas(index, image_index, label, truth, outcomes).save(path)


def save_progress_strip(path: Path, index: int, image_index: int, label: int, outcomes: list[Outcome]) -> None:
    progress_canvas(index, image_index, label, outcomes).save(path)


def panel_canvas(method: str, step: int, truth: torch.Tensor, dummy: torch.Tensor, trials: list[int]) -> Canvas:
    """A W&B panel: ground truth (top row) over the reconstruction at `step` (bottom row), one column per
    trial, labelled with the trial index."""
    name = METHOD_NAMES.get(method, method)
    return labelled_grid([list(truth), list(dummy)], ["ground\ntruth", f"{name}\nstep {step}"], [],
                         f"{name} reconstruction at step {step}", [f"trial {i}" for i in trials])


def client_panel_canvas(method: str, step: int, trial: int, truth: torch.Tensor, matched: torch.Tensor,
                        errors: list[float]) -> Canvas:
    """A W&B panel for one client of B samples: its private images (top row) over the reconstructions at
    `step` matched to them (bottom row, column j: the reconstruction assigned to private image j), each
    reconstruction labelled with its MSE `errors[j]` to that image."""
    name = METHOD_NAMES.get(method, method)
    return labelled_grid([list(truth), list(matched)], ["private", f"{name}\nstep {step}"],
                         [[], [f"MSE {_sci(e)}" for e in errors]],
                         f"{name} at step {step}, client of trial {trial}", [f"image {j}" for j in range(len(truth))])


@dataclass(frozen=True)
class TrialPictures:
    """The run's pictures/ folder: trial_NNNNN.png per trial (a client batch: trial_NNNNN_sJ.png per private
    image J, beside the reconstructions matched to it) and the progress strips of the first
    `progress_trials` trials (for a client batch, of its first reconstruction); nothing where not `enabled`."""

    folder: Path
    enabled: bool
    progress_trials: int

    @classmethod
    def from_config(cls, cfg: DictConfig, run_dir: Path) -> "TrialPictures":
        return cls(Path(run_dir) / "pictures", bool(cfg.get("pictures", True)), int(cfg.progress_trials))

    def save(self, group: list[Trial], private: PrivateBatch, results: dict[str, AttackResult]) -> None:
        if not results or not self.enabled:
            return
        orders = {m: metrics.match(r.dummy, private.images) for m, r in results.items()}
        b = private.images.shape[1]
        for row, trial in enumerate(group):
            for j in range(b):  # a client batch: a picture per private image, beside its matched reconstructions
                truth, label = private.images[row, j], int(private.labels[row, j])
                outcomes = [_outcome(m, r, row, int(orders[m][row, j]), truth) for m, r in results.items()]
                name = f"trial_{trial.index:05d}.png" if b == 1 else f"trial_{trial.index:05d}_s{j}.png"
                save_trial_picture(self.folder / name, trial.index, trial.images[j], label, truth, outcomes)
                if j == 0 and trial.index < self.progress_trials and all(o.snapshots for o in outcomes):
                    save_progress_strip(self.folder / f"progress_{trial.index:05d}.png", trial.index,
                                        trial.images[0], label, outcomes)


def _outcome(method: str, result: AttackResult, row: int, matched: int, truth: torch.Tensor) -> Outcome:
    """What a picture shows of one attack's reconstruction `matched` of trial `row`."""
    snapshots = sorted((step, snaps[row, matched]) for step, snaps in result.snapshots.items() if row < len(snaps))
    mse = float(metrics.mse(result.dummy[row, matched][None], truth[None])[0])
    return Outcome(method, result.dummy[row, matched], int(result.predicted_label[row, matched]), mse,
                   result.status[row], int(result.steps[row]), snapshots)
