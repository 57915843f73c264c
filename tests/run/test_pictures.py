"""Per-run pictures: labelled, upscaled by nearest neighbour, progress strips that end where the trial did."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lightning_idlg.run.pictures import (LAYOUT_KEY, LAYOUT_VALUE, MAX_SNAPSHOTS, Outcome, progress_canvas,
                                     progress_snapshots, to_uint8, trial_canvas)


def outcome(method: str, steps: int, every: int = 10, last: int = 300) -> Outcome:
    g = torch.Generator().manual_seed(steps)
    snaps = [(s, torch.rand(1, 8, 8, generator=g)) for s in range(0, last + 1, every)]
    return Outcome(method, torch.rand(1, 8, 8, generator=g), 3, 1e-7, "converged", steps, snaps)


def test_a_progress_strip_ends_at_the_step_the_trial_stopped():
    """A trial that converged at step 37 shows steps 0, 10, 20, 30 and its final picture at 37 (the attack
    fills the later snapshot slots with that final picture: those are not shown again)."""
    o = outcome("idlg", 37)
    shown = progress_snapshots(o)
    assert [step for step, _ in shown] == [0, 10, 20, 30, 37] and shown[-1][1] is o.dummy
    long = progress_snapshots(outcome("dlg", 300))   # 31 snapshots: at most MAX_SNAPSHOTS, ends kept
    assert len(long) == MAX_SNAPSHOTS and long[0][0] == 0 and long[-1][0] == 300


def test_pictures_are_upscaled_nearest_and_labelled(tmp_path):
    truth = torch.rand(1, 8, 8)
    outcomes = [outcome("dlg", 300), outcome("idlg", 37)]
    canvas = trial_canvas(5, 123, 3, truth, outcomes)
    canvas.save(tmp_path / "trial.png")
    with Image.open(tmp_path / "trial.png") as stored:
        assert stored.text == {LAYOUT_KEY: LAYOUT_VALUE} and stored.mode == "RGB"
        picture = torch.from_numpy(np.array(stored)).permute(2, 0, 1)
    assert canvas.scale >= 4 and canvas.tile == (8 * canvas.scale, 8 * canvas.scale)
    for column, image in enumerate([truth, outcomes[0].dummy, outcomes[1].dummy]):
        (x, y), (h, w) = canvas.origins[0][column], canvas.tile
        expected = to_uint8(image[None])[0].expand(3, -1, -1)
        expected = expected.repeat_interleave(canvas.scale, 1).repeat_interleave(canvas.scale, 2)
        assert torch.equal(picture[:, y:y + h, x:x + w], expected)
    strip = progress_canvas(5, 123, 3, outcomes)
    assert [len(row) for row in strip.origins] == [MAX_SNAPSHOTS, 5]    # DLG ran to 300, iDLG stopped at 37
