"""`lightning-idlg-report`: the paper's tables and figures from the per-trial records of finished runs.

    lightning-idlg-report RUN_DIR [RUN_DIR ...] [--out DIR] [--title TEXT] [--progress-trial N ...]

Every `trials.jsonl` below each argument is read (one run, or a whole Hydra multirun dir). Records are
grouped by data set (the record's `dataset` field, the loader name), variant and method. The variant comes
from the run's config.yaml (`paper.protocol_of`): "paper" when it is the paper protocol exactly (steps,
tolerance, optimizer, label rule, victim as `experiment=paper_*` sets them), "improved" when it is that
plus what the `_improved` presets add (a line search, restarts, patience), "reliable" when it is that with
what the `_reliable` presets change (patience 50, the best iterate kept), each followed by the keys that
differ from that preset ("improved: steps=100"); a run that differs from the paper otherwise is "custom:
steps=10". Runs are pooled into one row only when their configs agree on everything but the seed and
where and how they ran (`PLACEMENT`); where configs of the same variant differ, the differing keys are
added to the row's name. The paper's numbers stand beside "paper", "improved" and "reliable" rows only. The
numbers come from `records.store.summarize` and `records.metrics.fidelity`, the definitions the runs' own `summary.json` use.
Written into `--out`:

- `report.md`: runs and their commands, then the tables and figures below, with the paper's numbers beside
  ours where the paper has the data set (MNIST, CIFAR-100, LFW);
- `label_accuracy.csv`: the paper's Table 1;
- `fidelity.csv`, `fidelity.png`: share of trials with MSE below each threshold (the paper's Figure 1);
- `convergence.csv`: status counts, total restarts and medians (steps, evaluations, PSNR, SSIM, LPIPS where
  recorded, MSE, seconds per trial);
- `victims.csv`: per attack, victim (model and settings) and checkpoint (init or saved weights): successes and
  median PSNR, SSIM, LPIPS;
- `progress_*.png`: reconstruction strips with step labels, DLG row above iDLG (the paper's Figure 2).
"""

from lightning_idlg.report.cli import main, write_report
from lightning_idlg.report.runs import Group, Run, find_runs, group_records, protocol, setting, variant_name

__all__ = ["Group", "Run", "find_runs", "group_records", "main", "protocol", "setting", "variant_name", "write_report"]
