"""`lightning-idlg-report`: read the runs, write report.md, the CSVs and the figures (see the package's
docstring for what each holds)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_idlg.report import defenses as leakage  # the defense section
from lightning_idlg.report.figures import choose_strips, plot_fidelity, plot_progress
from lightning_idlg.report.markdown import NO_STRIPS, STRIPS_LEFT_OUT, markdown, notes, victim_section
from lightning_idlg.report.runs import Run, find_runs, group_records
from lightning_idlg.report.tables import convergence_rows, fidelity_rows, label_accuracy_rows, victim_rows, write_csv


# -- entry point --------------------------------------------------------------------------------------
def write_report(run_dirs: list[str | Path], out: str | Path, title: str = "DLG / iDLG report",
                 progress_trials: list[int] | None = None, progress_from: list[str | Path] | None = None,
                 report_name: str = "report.md", preface: str = "", by: list[str] | None = None,
                 defenses_only: bool = False) -> Path:
    """Read every trials.jsonl below `run_dirs` and write report.md, the CSVs and the PNGs into `out`.
    `progress_from`: draw progress strips only of the runs at or below these paths ([]: none), e.g. only of
    the built-in images when the others' terms do not allow publishing reconstructions of them."""
    runs = find_runs(run_dirs)
    groups = group_records(runs)
    if not groups:
        raise FileNotFoundError("the trials.jsonl files found hold no records: " + ", ".join(map(str, run_dirs)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    strips = []
    if not defenses_only:  # (a defenses page shares docs/studies/generated/ with results.md: leave its files alone)
        write_csv(out / "label_accuracy.csv", label_accuracy_rows(groups))
        write_csv(out / "fidelity.csv", fidelity_rows(groups))
        write_csv(out / "convergence.csv", convergence_rows(groups))
        plot_fidelity(groups, out / "fidelity.png")
        shown = runs if progress_from is None else [r for r in runs if _under(r.path, progress_from)]
        strips = choose_strips(shown, progress_trials)
        for strip in strips:
            plot_progress(strip, out)
    report = out / report_name
    no_strips = STRIPS_LEFT_OUT if progress_from == [] else NO_STRIPS
    text = markdown(title, runs, groups, strips, notes(runs, groups), preface, no_strips)
    text += "\n".join(_axes_sections(runs, out, by or []))
    if defenses_only:  # docs/studies/generated/defenses.md: the runs, the leakage section, the --by table, how it was made
        parts = text.split("\n## ")[1:]
        order = ("Runs", "Leakage against", "By ", "Made with")
        kept = sorted((p.rstrip("\n") + "\n" for p in parts if p.startswith(order)),
                      key=lambda p: [p.startswith(o) for o in order].index(True))
        text = "\n".join([f"# {title}\n", *([preface.strip() + "\n"] if preface.strip() else []),
                          *("## " + p for p in kept)])
    report.write_text(text)
    return report


def _axes_sections(runs: list[Run], out: Path, by: list[str]) -> list[str]:
    """The attack x victim x checkpoint table (victims.csv), the defense section (where some run had a
    defense: leakage.csv, leakage.png) and the --by table."""
    lines = []
    victims = victim_rows(runs)
    write_csv(out / "victims.csv", victims)
    lines += ["", *victim_section(victims)]
    rows = leakage.leakage_rows(runs)
    if any(r["defense"] != "none" for r in rows):
        write_csv(out / "leakage.csv", rows)
        drawn = leakage.plot_leakage(rows, out / "leakage.png")
        lines += ["", *leakage.markdown_section(rows, "leakage.png" if drawn else None)]
    if by:
        table = leakage.by_rows(runs, by)
        write_csv(out / "by.csv", table)
        lines += ["", *leakage.by_section(table, by)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-idlg-report",
        description="Tables and figures of the iDLG paper (label accuracy, fidelity, progress, convergence) "
                    "from the trials.jsonl of runs or Hydra multirun dirs, with the paper's numbers beside ours.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run dir or a multirun dir; every trials.jsonl below it is read")
    parser.add_argument("--out", help="output folder (default: the RUN_DIR if one is given, else report/)")
    parser.add_argument("--title", default="DLG / iDLG report", help="heading of report.md")
    parser.add_argument("--progress-trial", type=int, action="append", metavar="INDEX", dest="progress_trials",
                        help="trial index whose progress picture to show, per run (repeatable; default: the "
                             "first progress picture of each run)")
    parser.add_argument("--progress-from", action="append", metavar="RUN_DIR", dest="progress_from",
                        help="draw progress pictures only of the runs at or below this path (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress pictures at all")
    parser.add_argument("--report-name", default="report.md", help="file name of the markdown report")
    parser.add_argument("--preface", metavar="FILE", help="markdown put under the title (e.g. commands, notes)")
    parser.add_argument("--defenses-only", action="store_true",
                        help="write only the runs, the leakage-against-defense-strength section and --by tables")
    parser.add_argument("--by", metavar="KEY,KEY", help="also tabulate by these record or config keys, e.g. "
                        "defense,defense.ratio or client.batch_size (rows never pool unlike configs)")
    args = parser.parse_args(argv)
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else "report")
    progress_from = [] if args.no_progress else args.progress_from
    try:
        preface = Path(args.preface).read_text() if args.preface else ""
        by = [key.strip() for key in args.by.split(",") if key.strip()] if args.by else []
        report = write_report(args.run_dirs, out, args.title, args.progress_trials, progress_from, args.report_name,
                              preface, by, args.defenses_only)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0


def _under(path: Path, roots: list[str | Path]) -> bool:
    path = Path(path).resolve()
    return any(path == Path(root).resolve() or Path(root).resolve() in path.parents for root in roots)
