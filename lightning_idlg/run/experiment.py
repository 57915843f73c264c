"""One experiment end to end: plan the trials, share each group's gradients, fit the attacks, evaluate, record.

Data flows one way: data set -> victims + private batch -> client (`Client.share`, its defense included) ->
attack (`GradientInversion`, sees only the `SharedGradient`) -> metrics against the private batch -> records.
The run builds its parts once (run/parts.py); the loops take (context, parts, groups) and read as the flow:
plan -> share a group -> fit -> evaluate -> store.append.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from lightning_idlg.attacks.result import AttackResult
from lightning_idlg.case.client import PrivateBatch
from lightning_idlg.case.plan import Trial, plan_batches, plan_trials
from lightning_idlg.case.share import ClientSide
from lightning_idlg.errors import ConfigError, positive_int
from lightning_idlg.records import paper
from lightning_idlg.records.evaluate import Evaluation
from lightning_idlg.records.rundir import RunDirLock, open_run_dir
from lightning_idlg.records.schema import CONVERGED, DIVERGED, NOT_CONVERGED, TRIALS_FILE
from lightning_idlg.records.store import RankStore, TrialStore, merge_rank_files, recorded, write_summary
from lightning_idlg.run import tracking
from lightning_idlg.run.console import print_summary, short_key
from lightning_idlg.run.continuous import SlotMonitor, Stream, StreamProgress
from lightning_idlg.run.monitor import AttackProgress, ReconstructionMonitor
from lightning_idlg.run.parts import Parts
from lightning_idlg.run.pictures import TrialPictures
from lightning_idlg.run.ranks import launch_ranks, single_device_args, trials_per_group, world_size
from lightning_idlg.run.validation import check_image_size, validate_settings

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> Parts:
    """Every setting checked and every part built, before any data is loaded; returns the parts."""
    positive_int("trials", cfg.trials)
    positive_int("steps", cfg.steps)
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    k = cfg.trials_per_group
    if not (k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1)):
        raise ConfigError(f"trials_per_group must be 'auto' or a positive integer, got {k!r}")
    if not cfg.get("attack"):
        raise ConfigError("attack is empty; valid: attack=dlg, attack=idlg, attack=both (or method=...)")
    validate_settings(cfg)  # every other setting, and the device
    return Parts.build(cfg)


def attack_names(cfg: DictConfig) -> list[str]:
    """The run's attacks in config order (attack=both: dlg, then idlg); each is a `method` in the records."""
    return list(cfg.attack)


def run(cfg: DictConfig, run_dir: str | Path, files: dict[str, str] | None = None) -> dict[str, dict]:
    """Run the experiment `cfg` into `run_dir` (resuming what is there); returns the summary. `files`: path
    (relative to run_dir) -> text, written once the dir is this run's (the app's .hydra/ files)."""
    parts = validate(cfg)
    world = world_size(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    run_dir = Path(run_dir)
    with RunDirLock(run_dir):  # one run per dir; ranks of this run never take it (they run inside it)
        dataset = instantiate(cfg.dataset)
        check_image_size("the data set's image size", min(dataset.shape[1:]))
        done = recorded(run_dir)  # also what an interrupted multi-rank run left in its rank files
        # refuses a config other than the one the records were made with; then config.yaml, fingerprint.json
        open_run_dir(cfg, run_dir, len(dataset), {m for m, _ in done}, files)
        groups = _plan(cfg, run_dir, len(dataset), done, world, parts.methods)
        # every image an attack will read, decoded once now: a bad file fails in seconds, not hours in
        dataset.check([i for group in groups for t in group for i in t.images])
        (run_dir / "pictures").mkdir(exist_ok=True)
        ranks = min(world, len(groups))  # no idle ranks; nothing (left) to do: no processes to start
        if ranks <= 1:
            return attack_and_record(cfg, parts, run_dir, dataset, groups, done)
        return launch_ranks(cfg, ranks, _rank_main, str(run_dir), groups, done)


def _plan(cfg: DictConfig, run_dir: Path, dataset_size: int, done: set[tuple[str, int]], world: int,
          methods: list[str]) -> list[list[Trial]]:
    """The fixed groups of K planned trials that hold a trial still to attack (plan_batches)."""
    trials = plan_trials(cfg, dataset_size)
    pending = [t for t in trials if any((m, t.index) not in done for m in methods)]
    if len(pending) < len(trials):
        per_method = ", ".join(f"{m} {sum((m, t.index) in done for t in trials)}" for m in methods)
        log.info("resuming: %s of %d trials already recorded in %s", per_method, len(trials), run_dir / TRIALS_FILE)
    return plan_batches(trials, trials_per_group(cfg, len(trials), world), done, methods)


def _rank_main(fabric, cfg: DictConfig, run_dir: str, groups: list[list[Trial]],
               done: set[tuple[str, int]]) -> dict[str, dict] | None:
    """One rank (run/ranks.py starts it): its own parts, its share of the groups (r, r+N, ...), its rank
    file; rank 0 merges and summarizes."""
    rank, world = fabric.global_rank, fabric.world_size
    return attack_and_record(cfg, Parts.build(cfg), Path(run_dir), instantiate(cfg.dataset), groups[rank::world],
                             done, rank, world, fabric.device, fabric.barrier)


# -- one process's share ------------------------------------------------------------------------------------

@dataclass
class Bars:
    """The progress bars: per method its trials done of this rank's share, converged so far; and the steps."""

    progress: Progress
    tasks: dict
    counts: dict[str, int]
    converged: dict[str, int]
    steps_task: object

    def advance(self, method: str, statuses: list[str]) -> None:
        self.counts[method] += len(statuses)
        self.converged[method] += statuses.count(CONVERGED)
        self.progress.update(self.tasks[method], completed=self.counts[method],
                             info=f"{self.converged[method]} converged")


@dataclass
class Context:
    """What one process attacks with and where it records: its run dir, rank and world, what is recorded
    already (`done`), its store (trials.jsonl, or its rank file), logger, Trainer settings and bars."""

    run_dir: Path
    rank: int
    world: int
    done: set[tuple[str, int]]
    store: TrialStore
    logger: object
    trainer_args: dict
    steps: int
    trials: int
    continuous: bool
    progress: Progress
    bars: Bars | None = None
    step_offset: int = 0  # steps logged so far (the logger's x axis runs on over groups)

    @classmethod
    def open(cls, cfg: DictConfig, run_dir: Path, rank: int, world: int, device, done) -> "Context":
        store = TrialStore(run_dir) if world == 1 else RankStore(run_dir, rank)
        # curves and panels come from one logger: rank 0's (its own groups); the others log nothing
        logger = instantiate(cfg.logger) if cfg.get("logger") and rank == 0 else None
        columns = (TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
                   TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        show = cfg.get("progress_bar", True) and rank == 0
        progress = Progress(*columns, console=Console(stderr=True), disable=not show)
        return cls(run_dir, rank, world, done, store, logger, single_device_args(cfg, device), int(cfg.steps),
                   int(cfg.trials), bool(cfg.get("continuous_batching")), progress)

    def open_bars(self, groups: list[list[Trial]], methods: list[str]) -> Bars:
        """One bar per method: its trials done out of `trials` (this rank's share with several ranks)."""
        planned = [t for g in groups for t in g]
        extra = self.trials - len(planned) if self.world == 1 else 0  # trials recorded for every method already
        mine = set(range(self.trials)) if self.world == 1 else {t.index for t in planned}
        converged = _converged_counts(self.run_dir, methods, mine, self.done)
        counts = {m: extra + sum((m, t.index) in self.done for t in planned) for m in methods}
        tasks = {m: self.progress.add_task(m if self.world == 1 else f"{m} (rank 0 of {self.world})",
                                           total=extra + len(planned), completed=counts[m],
                                           info=f"{converged[m]} converged") for m in methods}
        steps_task = self.progress.add_task("steps", total=self.steps, info="")
        return Bars(self.progress, tasks, counts, converged, steps_task)

    def tell(self, method: str, todo: list[Trial], statuses: list[str], seconds: float) -> None:
        log.info("%s%s: trials %d-%d done (%d converged, %d not converged, %d diverged) in %.1f s",
                 f"rank {self.rank}: " if self.world > 1 else "", method, todo[0].index, todo[-1].index,
                 statuses.count(CONVERGED), statuses.count(NOT_CONVERGED), statuses.count(DIVERGED), seconds)


@dataclass
class Recording:
    """Where finished trials go: evaluated into records and appended to the store, counted on the bars,
    drawn into pictures/ (the continuous Stream's Recorder too)."""

    store: TrialStore
    evaluation: Evaluation
    pictures_of: TrialPictures
    bars: Bars

    def record(self, method: str, group: list[Trial], private: PrivateBatch, result: AttackResult, cost,
               group_size: int | None = None, todo: list[Trial] | None = None) -> list[str]:
        """Append the records of `todo` (default: the whole group); returns their statuses."""
        todo = group if todo is None else todo
        self.store.append(self.evaluation.records(result, private, group, todo, cost, group_size))
        wanted = {t.index for t in todo}
        statuses = [result.status[row] for row, t in enumerate(group) if t.index in wanted]
        self.bars.advance(method, statuses)
        return statuses

    def pictures(self, group: list[Trial], private: PrivateBatch, results: dict[str, AttackResult]) -> None:
        self.pictures_of.save(group, private, results)


def attack_and_record(cfg: DictConfig, parts: Parts, run_dir: Path, dataset, groups: list[list[Trial]],
                      done: set[tuple[str, int]], rank: int = 0, world: int = 1, device: torch.device | None = None,
                      barrier=None) -> dict[str, dict] | None:
    """Attack `groups` and record each group as it finishes; then (rank 0) the summary of all records.

    One process (world 1): records go straight to trials.jsonl. A rank of several: to its own
    trials.rank{rank}.jsonl; after `barrier` (every rank's records are on disk) rank 0 merges them."""
    ctx = Context.open(cfg, run_dir, rank, world, device, done)
    if rank == 0:
        log.info("run dir: %s", run_dir)
    clients = parts.client_side(dataset)
    # Memory stays flat in the number of trials only if each group is freed before the next: its Trainer and
    # attack module reference each other, so their tensors (the K trials' L-BFGS history alone is
    # 2 x K x 100 x pixels floats: 80 MB for K = 32 at 3x32x32) go only with Python's cyclic collector,
    # whose full passes get rarer as the heap grows (RSS grew by ~0.65 MB a trial after 2,500 trials of
    # steps=1 without this). So: collect after every group; freezing what is alive now (torch, Lightning,
    # the data) first keeps that collection to the group's own objects (milliseconds, not ~0.2 s).
    gc.freeze()
    try:
        with ctx.progress:
            ctx.bars = ctx.open_bars(groups, parts.methods)
            recording = Recording(ctx.store, parts.evaluation, TrialPictures.from_config(cfg, run_dir), ctx.bars)
            loop = _attack_streams if ctx.continuous else _attack_groups
            loop(ctx, parts, clients, recording, groups)
    finally:
        gc.unfreeze()
    if ctx.logger is not None:
        ctx.logger.finalize("success")
    if barrier is not None:
        barrier()
    return _summarize(cfg, ctx) if rank == 0 else None


def _summarize(cfg: DictConfig, ctx: Context) -> dict[str, dict]:
    """Rank 0, after every rank: merge the rank files, write summary.json, log and print the results."""
    merge_rank_files(ctx.run_dir)
    store = TrialStore(ctx.run_dir)
    summary = write_summary(ctx.run_dir, store.records())
    tracking.log_run_results(ctx.logger, store.records(), summary, ctx.run_dir, ctx.step_offset)
    print_summary(summary, Console())  # the result goes to stdout; progress went to stderr
    config = OmegaConf.to_container(cfg, resolve=True)
    differences = paper.differences(config)
    if differences and set(cfg.attack) & {"dlg", "idlg"}:  # a quick look or a variant of the paper's attacks:
        # say how to run the paper's own protocol (another attack, e.g. ig, has no paper preset here)
        log.info("Not the paper protocol: %s differ%s.", ", ".join(short_key(k) for k in differences),
                 "s" if len(differences) == 1 else "")
        log.info("Paper: %s", paper.paper_command(config))
    log.info("outputs: %s", ctx.run_dir)  # trials.jsonl, summary.json, pictures/, the log (outputs/README.md)
    return summary


# -- the loops ----------------------------------------------------------------------------------------------

def _attack_groups(ctx: Context, parts: Parts, clients: ClientSide, recording: Recording,
                   groups: list[list[Trial]]) -> None:
    """Fixed groups: share a group, fit each attack on its pending trials, evaluate and append, draw."""
    for group in groups:
        private, shared, cost = clients.share(group)
        results = {}
        for method, attack in parts.attacks.items():
            todo = [t for t in group if (method, t.index) not in ctx.done]
            if not todo:
                continue
            rows = [row for row, t in enumerate(group) if (method, t.index) not in ctx.done]
            # callbacks made in the call: Lightning binds the module's `log` to each callback, so one kept
            # in a variable here would keep this group's module (and its L-BFGS history) alive
            result, used = attack.run(shared, group, ctx.logger,
                                      [ReconstructionMonitor(private.images.flatten(0, 1), ctx.step_offset,
                                                             trial_indices=_per_image(private)),
                                       AttackProgress(ctx.progress, ctx.bars.tasks[method], ctx.bars.steps_task,
                                                      ctx.steps, rows, ctx.bars.counts[method],
                                                      ctx.bars.converged[method])],
                                      ctx.trainer_args)
            ctx.step_offset += used
            results[method] = result
            statuses = recording.record(method, group, private, result, cost, todo=todo)
            ctx.tell(method, todo, statuses, result.seconds)
        recording.pictures(group, private, results)
        del private, shared, results  # on disk now: nothing of a finished group outlives it
        gc.collect()  # see attack_and_record


def _attack_streams(ctx: Context, parts: Parts, clients: ClientSide, recording: Recording,
                    groups: list[list[Trial]]) -> None:
    """continuous_batching=true: each attack runs this rank's pending trials through K slots, each refilled as
    its trial ends (run/continuous.py)."""
    trials = [t for group in groups for t in group]
    slots = max(len(group) for group in groups)
    wanted = {t.index: {m for m in parts.methods if (m, t.index) not in ctx.done} for t in trials}
    results: dict[int, dict] = {}  # a trial's results until every attack it waits for has ended (its picture)
    for method, attack in parts.attacks.items():
        todo = [t for t in trials if (method, t.index) not in ctx.done]
        if not todo:
            continue
        stream = Stream(method, todo, slots, clients, recording, wanted, results, attack.progress_trials)
        shared = stream.initial()
        truth = torch.stack([stream.truth(t.index) for t in stream.first])
        module, trainer = attack.fit(shared, stream.first, ctx.logger,
                                     [SlotMonitor(stream, ctx.step_offset, truth),
                                      StreamProgress(ctx.progress, ctx.bars.steps_task, ctx.steps)],
                                     ctx.trainer_args, refill=stream.refill, on_finish=stream.finish,
                                     tokens=[t.index for t in stream.first], queued=stream.queued)
        ctx.step_offset += trainer.global_step
        statuses = stream.statuses
        log.info("%s%s: %d trials done through %d slots (%d converged, %d not converged, %d diverged) in %.1f s",
                 f"rank {ctx.rank}: " if ctx.world > 1 else "", method, len(todo), len(stream.first),
                 statuses.count(CONVERGED), statuses.count(NOT_CONVERGED), statuses.count(DIVERGED), module.seconds)
        del module, trainer, stream, shared
        gc.collect()  # see attack_and_record


def _per_image(private: PrivateBatch) -> list[int]:
    """The trial index of every private image, flattened (K, B) -> K * B (panel labels)."""
    return [index for index in private.indices for _ in range(private.images.shape[1])]


def _converged_counts(run_dir: Path, methods: list[str], indices: set[int], done) -> dict[str, int]:
    """Converged trials per method among the recorded ones of `indices` (a resumed run's bars start there)."""
    counts = dict.fromkeys(methods, 0)
    if done:
        for record in TrialStore(run_dir).records():
            if record["method"] in counts and record["status"] == CONVERGED and int(record["index"]) in indices:
                counts[record["method"]] += 1
    return counts
