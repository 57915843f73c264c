"""What a run dir holds and the names its records use, defined once: the file names, the attacks' order and
display names, the trial statuses, and the config keys that never change what a trial measures."""

from __future__ import annotations

from lightning_idlg.attacks import stopping

TRIALS_FILE = "trials.jsonl"             # one record per (method, trial), appended as groups finish
RANK_FILE_GLOB = "trials.rank*.jsonl"    # a rank's records until rank 0 merges them (run/ranks.py)
SUMMARY_FILE = "summary.json"

METHOD_ORDER = ("dlg", "idlg")           # rows of a summary, a report table, a picture, a progress strip
METHOD_NAMES = {"dlg": "DLG", "idlg": "iDLG"}

# how a trial ended: the attack's stopping rules name it (attacks/stopping.py), a record says it
CONVERGED, NOT_CONVERGED, DIVERGED, STATUSES = (stopping.CONVERGED, stopping.NOT_CONVERGED, stopping.DIVERGED,
                                                stopping.STATUSES)

# A picture written by this package says so in its PNG text (pictures.py), so a report may relabel it.
LAYOUT_KEY, LAYOUT_VALUE = "lightning_idlg", "labelled"

# Config keys (a key or a prefix of keys) that never change what a trial's attack computes: where the run
# goes, how it shows progress and logs, how its work is placed and threaded (trials_per_group, continuous
# batching and the trainer's device keys move a record by float32 rounding only), how many trials it plans
# (a rerun may add some), and where the data lie.
PLACEMENT = (
    "hydra", "trials", "progress_bar", "progress_trials", "snapshot_every", "pictures", "threads",
    "logger", "optimized_metric", "trials_per_group", "continuous_batching",
    "trainer.accelerator", "trainer.devices", "trainer.strategy", "trainer.num_nodes",
    "trainer.enable_checkpointing", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.num_sanity_val_steps",
    "dataset.root", "dataset.download",
)
# A run dir's fingerprint (records/rundir.py) leaves out those and `resume` (how a rerun treats the dir).
# The seed and `metrics` stay in: a rerun with another seed would record other trials under the same
# indices, and metrics.lpips adds numbers to records.
FINGERPRINT_EXCLUDE = (*PLACEMENT, "resume")
# Runs the report pools may also differ in their seed (which sample of trials) and in `metrics`
# (evaluation only: it adds numbers to records and changes none).
POOLING_EXCLUDE = (*PLACEMENT, "resume", "seed", "metrics")
