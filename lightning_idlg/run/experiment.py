"""One experiment: pick trials, run the client and the attacks batch by batch, evaluate, record.

Data flows one way: data set -> victims + private batch -> client (`Client.share`, its defense included) -> attack
(`GradientInversion`, sees only the `SharedGradient`) -> metrics against the private batch -> records.
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing
import os
import pickle
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich import box
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from lightning_idlg.records import metrics

from lightning_idlg.records import paper

from lightning_idlg.run import tracking
from lightning_idlg.attacks.inversion import AttackResult, GradientInversion
from lightning_idlg.case.client import Client, PrivateBatch, share_one_network, stack_victims
from lightning_idlg.run.continuous import SlotMonitor, Stream, StreamProgress
from lightning_idlg.case.defense import Defense, compose
from lightning_idlg.case.dataset import pick_trials
from lightning_idlg.errors import ConfigError
from lightning_idlg.run.monitor import AttackProgress, ReconstructionMonitor
from lightning_idlg.run.pictures import Outcome, save_progress_strip, save_trial_picture
from lightning_idlg.records.store import TrialStore, read_records, write_summary
from lightning_idlg.records.rundir import RunDirLock, open_run_dir
from lightning_idlg.run.validation import check_image_size, validate_settings
from lightning_idlg.case.model import make_victim

log = logging.getLogger(__name__)
METHOD_ORDER = ("dlg", "idlg")
# K = 32 on a CPU core: measured time per trial-evaluation (1 thread, 10 L-BFGS steps, all trials active) for
# K = 8 / 16 / 32 / 64: digits 1x28x28: 1.24 / 0.95 / 0.74 / 0.70 ms; the paper's 3x32x32, 100 classes:
# 2.99 / 2.54 / 2.10 / 2.48 ms. 32 is the best or within 5% of it; beyond, the L-BFGS history (2 x K x 100 x
# pixels floats) grows for nothing, and a larger batch waits longer for its slowest trial.
CPU_TRIALS_PER_GROUP = 32
GPU_TRIALS_PER_GROUP = 512


@dataclass(frozen=True)
class Trial:
    """One attacked image: its position in the experiment and what is drawn from the seed for it."""

    index: int
    images: tuple[int, ...]  # the client's B private images (data set indices)
    victim_seed: int
    dummy_seed: int

    @property
    def defense_seed(self) -> int:  # the client's defense draws (noise) for this trial
        return derive_seed(self.victim_seed, self.index, 2)


def derive_seed(seed: int, index: int, stream: int) -> int:
    """Independent seed per (experiment seed, trial, stream) so a trial's draws never depend on which
    batch, device or rank it runs in."""
    return ((seed * 1_000_003 + index) * 16 + stream) % (2**63)


def validate(cfg: DictConfig) -> None:
    for key in ("trials", "steps"):
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if not isinstance(cfg.seed, int):
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    k = cfg.trials_per_group
    if not (k == "auto" or (isinstance(k, int) and k >= 1)):
        raise ConfigError(f"trials_per_group must be 'auto' or a positive integer, got {k!r}")
    if not cfg.get("attack"):
        raise ConfigError("attack is empty; valid: attack=dlg, attack=idlg, attack=both (or method=...)")
    validate_settings(cfg)  # every other setting, and the device, before any data is loaded
    _build_parts(cfg)


def _build_parts(cfg: DictConfig) -> None:
    """Build every part once before any data is loaded, so a bad setting of the client, a defense, the
    victim's init or an attack's parts fails in one line at once; label strategies check the client batch."""
    nodes = [cfg.client, cfg.model.init, *(cfg.get("defense") or {}).values()]
    for node in cfg.attack.values():
        nodes += [node[part] for part in ("label_strategy", "stopping", "dummy", "objective") if node.get(part)]
    for node in nodes:
        try:
            part = instantiate(node)
        except InstantiationException as err:
            if isinstance(err.__cause__, ConfigError):
                raise err.__cause__ from None
            raise
        if hasattr(part, "check") and hasattr(part, "learned"):  # a label strategy
            part.check(int(cfg.client.batch_size))


def attack_names(cfg: DictConfig) -> list[str]:
    """The run's attacks in config order (attack=both: dlg, then idlg); each is a `method` in the records."""
    return list(cfg.attack)


def _on_gpu(cfg: DictConfig) -> bool:
    return str(cfg.trainer.get("accelerator", "cpu")) in ("gpu", "cuda") or (
        cfg.trainer.get("accelerator") == "auto" and torch.cuda.is_available())


def trials_per_group(cfg: DictConfig, planned: int, world: int = 1) -> int:
    """K; `auto`: the device's constant, but no more than an even share of the planned trials per rank.
    Of the planned trials, not the pending ones: the group a trial runs in must not depend on what a
    resumed run has left to do (see `plan_batches`)."""
    if cfg.trials_per_group != "auto":
        return int(cfg.trials_per_group)
    base = GPU_TRIALS_PER_GROUP if _on_gpu(cfg) else CPU_TRIALS_PER_GROUP
    return max(1, min(math.ceil(planned / world), base))


def world_size(cfg: DictConfig) -> int:
    """How many ranks attack at once: one process per device of `trainer.devices` (1: this process alone).

    With `trainer=ddp` (devices N > 1) the ranks share out the trials and never synchronize a gradient;
    `strategy` may be `ddp`, `ddp_spawn` or `auto`, which all mean exactly that here; they differ only in
    how the ranks start (`start_method`)."""
    devices = cfg.trainer.get("devices", 1)
    if devices in ("auto", -1, "-1"):
        n = max(1, torch.cuda.device_count()) if _on_gpu(cfg) else 1
    elif isinstance(devices, str) and "," in devices:  # Lightning's "0,1" (GPU indices)
        n = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, (int, str)) and not isinstance(devices, bool) and str(devices).strip().isdigit():
        n = int(devices)
    elif OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):  # [0, 2]: GPU indices
        n = len(devices)
    else:
        raise ConfigError(f"trainer.devices must be a positive integer, a list of device indices or 'auto', "
                          f"got {devices!r}")
    if n < 1:
        raise ConfigError(f"trainer.devices must be at least 1, got {devices!r}")
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if n > 1 and strategy not in RANK_STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r} cannot share out trials over {n} devices; valid: "
                          + ", ".join(RANK_STRATEGIES))
    if n > 1 and int(cfg.trainer.get("num_nodes", 1)) != 1:
        raise ConfigError("trainer.num_nodes must be 1 (one machine); for a cluster, run one job per machine "
                          "with hydra/launcher=slurm")
    return n


def plan_trials(cfg: DictConfig, dataset_size: int) -> list[Trial]:
    """Trial i attacks the client holding images i*B .. i*B + B-1 of one seeded draw (B = 1: the paper's
    one random image per trial)."""
    b = int(cfg.client.batch_size)
    images = pick_trials(dataset_size, cfg.trials * b, cfg.seed)
    return [Trial(i, tuple(images[i * b:(i + 1) * b]), derive_seed(cfg.seed, i, 0), derive_seed(cfg.seed, i, 1))
            for i in range(cfg.trials)]


def plan_batches(trials: list[Trial], k: int, done: set[tuple[str, int]], methods: list[str]) -> list[list[Trial]]:
    """The attack batches: fixed chunks of K planned trials, those with any (method, index) not recorded.

    A chunk with a pending trial runs whole (only its pending records are appended), so a trial always
    runs beside the same trials as in an uninterrupted run and its record is that run's, bit for bit: the
    objective's summation order depends on K (objective._HeadDistance), so a resumed trial re-batched
    with whatever else was pending differed (MSE 6.33678 vs 6.33802, 42 vs 40 evaluations)."""
    chunks = [trials[start:start + k] for start in range(0, len(trials), k)]
    return [c for c in chunks if any((m, t.index) not in done for t in c for m in methods)]


def run(cfg: DictConfig, run_dir: str | Path, files: dict[str, str] | None = None) -> dict[str, dict]:
    """Run the experiment `cfg` into `run_dir` (resuming what is there); returns the summary. `files`: path
    (relative to run_dir) -> text, written once the dir is this run's (the app's .hydra/ files)."""
    validate(cfg)
    world = world_size(cfg)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    run_dir = Path(run_dir)
    with RunDirLock(run_dir):  # one run per dir; ranks of this run never take it (they run inside it)
        dataset = instantiate(cfg.dataset)
        check_image_size("the data set's image size", min(dataset.shape[1:]))
        methods = attack_names(cfg)
        done = recorded(run_dir)  # also what an interrupted multi-rank run left in its rank files
        # refuses a config other than the one the records were made with; then config.yaml, fingerprint.json
        open_run_dir(cfg, run_dir, len(dataset), {m for m, _ in done}, files)
        trials = plan_trials(cfg, len(dataset))
        pending = [t for t in trials if any((m, t.index) not in done for m in methods)]
        if len(pending) < len(trials):
            per_method = ", ".join(f"{m} {sum((m, t.index) in done for t in trials)}" for m in methods)
            log.info("resuming: %s of %d trials already recorded in %s", per_method, len(trials),
                     run_dir / TRIALS_FILE)
        batches = plan_batches(trials, trials_per_group(cfg, len(trials), world), done, methods)
        # every image an attack will read, decoded once now: a bad file fails in seconds, not hours in
        dataset.check([i for batch in batches for t in batch for i in t.images])
        (run_dir / "pictures").mkdir(exist_ok=True)
        ranks = min(world, len(batches))  # no idle ranks; nothing (left) to do: no processes to start
        if ranks <= 1:
            return attack_and_record(cfg, run_dir, dataset, batches, done)
        return launch_ranks(cfg, run_dir, batches, done, ranks)


def attack_and_record(cfg: DictConfig, run_dir: Path, dataset, batches: list[list[Trial]],
                      done: set[tuple[str, int]], rank: int = 0, world: int = 1, device: torch.device | None = None,
                      barrier=None) -> dict[str, dict] | None:
    """Attack `batches` and record each batch as it finishes; then (rank 0) the summary of all records.

    One process (world 1): records go straight to trials.jsonl. A rank of several: to its own
    trials.rank{rank}.jsonl; after `barrier` (every rank's records are on disk) rank 0 merges them."""
    store = TrialStore(run_dir) if world == 1 else RankStore(run_dir, rank)
    methods = attack_names(cfg)
    # curves and panels come from one logger: rank 0's (its own batches); the others log nothing
    logger = instantiate(cfg.logger) if cfg.get("logger") and rank == 0 else None
    trainer_args = single_device_args(cfg, device)
    if rank == 0:
        log.info("run dir: %s", run_dir)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(bar_width=16), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    show = cfg.get("progress_bar", True) and rank == 0
    # Memory stays flat in the number of trials only if each batch is freed before the next: its Trainer and
    # attack module reference each other, so their tensors (the K trials' L-BFGS history alone is
    # 2 x K x 100 x pixels floats: 80 MB for K = 32 at 3x32x32) go only with Python's cyclic collector,
    # whose full passes get rarer as the heap grows (RSS grew by ~0.65 MB a trial after 2,500 trials of
    # steps=1 without this). So: collect after every batch; freezing what is alive now (torch, Lightning,
    # the data) first keeps that collection to the batch's own objects (milliseconds, not ~0.2 s).
    gc.freeze()
    try:
        step_offset = _attack_batches(cfg, run_dir, dataset, batches, done, store, methods, logger,
                                      trainer_args, world, Progress(*columns, console=console, disable=not show), rank)
    finally:
        gc.unfreeze()
    if logger is not None:
        logger.finalize("success")
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    merge_rank_files(run_dir)
    store = TrialStore(run_dir)
    summary = write_summary(run_dir, store.records())
    tracking.log_run_results(logger, store.records(), summary, run_dir, step_offset)  # config, summary, table
    print_summary(summary, Console())  # the result goes to stdout; progress went to stderr
    config = OmegaConf.to_container(cfg, resolve=True)
    differences = paper.differences(config)
    if differences and set(cfg.attack) & {"dlg", "idlg"}:  # a quick look or a variant of the paper's attacks:
        # say how to run the paper's own protocol (another attack, e.g. ig, has no paper preset here)
        log.info("Not the paper protocol: %s differ%s.", ", ".join(_short(k) for k in differences),
                 "s" if len(differences) == 1 else "")
        log.info("Paper: %s", paper.paper_command(config))
    log.info("outputs: %s", run_dir)  # trials.jsonl, summary.json, pictures/, the log (outputs/README.md)
    return summary


def _short(key: str) -> str:
    """A differing key for the console: its last part, or its last two where the last says little."""
    parts = key.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "_target_" and len(parts) > 1 else parts[-1]


def _attack_batches(cfg: DictConfig, run_dir: Path, dataset, batches: list[list[Trial]], done, store: TrialStore,
                    methods: list[str], logger, trainer_args: dict, world: int, progress: Progress,
                    rank: int = 0) -> int:
    """The batch loop of `attack_and_record`; returns the logger's step offset (steps logged)."""
    step_offset = 0
    with progress:
        # one bar per method: its trials done out of `trials` (this rank's share with several ranks)
        planned = [t for b in batches for t in b]
        extra = cfg.trials - len(planned) if world == 1 else 0  # trials recorded for every method already
        mine = set(range(cfg.trials)) if world == 1 else {t.index for t in planned}
        converged = _converged_counts(run_dir, methods, mine, done)
        counts = {m: extra + sum((m, t.index) in done for t in planned) for m in methods}
        tasks = {m: progress.add_task(m if world == 1 else f"{m} (rank 0 of {world})", total=extra + len(planned),
                                      completed=counts[m], info=f"{converged[m]} converged") for m in methods}
        steps_task = progress.add_task("steps", total=cfg.steps, info="")
        if cfg.get("continuous_batching"):
            return _attack_streams(cfg, run_dir, dataset, batches, done, store, methods, logger, trainer_args,
                                   world, progress, tasks, steps_task, counts, converged, rank)
        for batch in batches:
            private, shared, cost = prepare_batch(cfg, dataset, batch)
            results = {}
            for method in methods:
                todo = [t for t in batch if (method, t.index) not in done]
                if not todo:
                    continue
                rows = [row for row, t in enumerate(batch) if (method, t.index) not in done]
                # callbacks made in the call: Lightning binds the module's `log` to each callback, so one kept
                # in a variable here would keep this batch's module (and its L-BFGS history) alive
                result, used = attack_batch(cfg, method, shared, batch, logger, step_offset,
                                            [ReconstructionMonitor(private.images.flatten(0, 1), step_offset,
                                                                   trial_indices=_per_image(private)),
                                             AttackProgress(progress, tasks[method], steps_task, cfg.steps, rows,
                                                            counts[method], converged[method])],
                                            trainer_args)
                step_offset += used
                results[method] = result
                store.append(evaluate(cfg, result, private, batch, todo, cost))
                statuses = [result.status[row] for row in rows]
                counts[method] += len(todo)
                converged[method] += statuses.count("converged")
                progress.update(tasks[method], completed=counts[method], info=f"{converged[method]} converged")
                log.info("%s%s: trials %d-%d done (%d converged, %d not converged, %d diverged) in %.1f s",
                         f"rank {rank}: " if world > 1 else "", method, todo[0].index, todo[-1].index,
                         statuses.count("converged"), statuses.count("not_converged"), statuses.count("diverged"),
                         result.seconds)
            save_pictures(cfg, run_dir, batch, private, results)
            del private, shared, results  # on disk now: nothing of a finished batch outlives it
            gc.collect()  # see attack_and_record
    return step_offset


def _attack_streams(cfg: DictConfig, run_dir: Path, dataset, batches: list[list[Trial]], done, store: TrialStore,
                    methods: list[str], logger, trainer_args: dict, world: int, progress: Progress, tasks: dict,
                    steps_task, counts: dict, converged: dict, rank: int) -> int:
    """continuous_batching=true: each attack runs this rank's pending trials through K slots, each refilled as
    its trial ends (lightning_idlg.run.continuous); returns the logger's step offset."""
    trials = [t for batch in batches for t in batch]
    slots = max(len(batch) for batch in batches)
    wanted = {t.index: {m for m in methods if (m, t.index) not in done} for t in trials}
    results: dict[int, dict] = {}  # a trial's results until every attack it waits for has ended (its picture)
    step_offset = 0
    for method in methods:
        todo = [t for t in trials if (method, t.index) not in done]
        if not todo:
            continue

        def record(batch, private, result, cost, method=method, group_size=min(slots, len(todo))):
            store.append(evaluate(cfg, result, private, batch, batch, cost, group_size=group_size))
            counts[method] += 1
            converged[method] += result.status[0] == "converged"
            progress.update(tasks[method], completed=counts[method], info=f"{converged[method]} converged")

        stream = Stream(cfg, method, todo, lambda group: prepare_batch(cfg, dataset, group), record,
                        lambda batch, private, res: save_pictures(cfg, run_dir, batch, private, res),
                        lambda index: wanted[index], results, slots)
        shared = stream.initial(instantiate(cfg.model.init).one_network)
        truth = torch.stack([stream.truth(t.index) for t in stream.first])
        attack, trainer = fit_attack(cfg, method, shared, stream.first, logger,
                                     [SlotMonitor(stream, step_offset, truth),
                                      StreamProgress(progress, steps_task, cfg.steps)], trainer_args,
                                     refill=stream.refill, on_finish=stream.finish,
                                     tokens=[t.index for t in stream.first], queued=stream.queued)
        step_offset += trainer.global_step
        statuses = stream.statuses
        log.info("%s%s: %d trials done through %d slots (%d converged, %d not converged, %d diverged) in %.1f s",
                 f"rank {rank}: " if world > 1 else "", method, len(todo), len(stream.first),
                 statuses.count("converged"), statuses.count("not_converged"), statuses.count("diverged"),
                 attack.seconds)
        del attack, trainer, stream, shared
        gc.collect()  # see attack_and_record
    return step_offset


def _per_image(private: PrivateBatch) -> list[int]:
    """The trial index of every private image, flattened (K, B) -> K * B (panel labels)."""
    return [index for index in private.indices for _ in range(private.images.shape[1])]


def _converged_counts(run_dir: Path, methods: list[str], indices: set[int], done) -> dict[str, int]:
    """Converged trials per method among the recorded ones of `indices` (a resumed run's bars start there)."""
    counts = dict.fromkeys(methods, 0)
    if done:
        for record in TrialStore(run_dir).records():
            if record["method"] in counts and record["status"] == "converged" and int(record["index"]) in indices:
                counts[record["method"]] += 1
    return counts


# Several ranks --------------------------------------------------------------------------------------------
# Why not Lightning's DDP for the attack itself: the experiment builds one Trainer per attack batch, and a
# DDP-wrapped GradientInversion would all-reduce the dummies' gradients between ranks, mixing trials that
# must stay independent. Instead Lightning Fabric only *launches* the ranks (DDPStrategy; fork or spawn,
# see `start_method`) and gives each its rank, world size, device and a barrier (gloo, also on GPUs: the group
# carries nothing but that barrier). The parent plans the batches once; rank r attacks batches r, r+N,
# r+2N, ... with ordinary single-device Trainers on its own device (cuda:r, or a CPU process with
# cores/N threads) and appends each finished batch to its own trials.rank{r}.jsonl (flushed and fsynced,
# like trials.jsonl: a crash loses no finished trial, and no two processes ever write one file). After
# the barrier rank 0 merges the rank files into trials.jsonl (skipping (method, index) pairs already
# there), deletes them, and writes the one summary.json. Resume reads trials.jsonl plus any rank files an
# interrupted run left behind (`recorded`), so a rerun, with any number of ranks, skips all of them.
RANK_STRATEGIES = ("auto", "ddp", "ddp_spawn")
TRIALS_FILE = "trials.jsonl"
RANK_FILE_GLOB = "trials.rank*.jsonl"


class RankStore(TrialStore):
    """One rank's records, `trials.rank{rank}.jsonl`, until rank 0 merges them into trials.jsonl."""

    def __init__(self, run_dir: str | Path, rank: int):
        super().__init__(run_dir)
        self.path = Path(run_dir) / f"trials.rank{rank}.jsonl"


def recorded(run_dir: str | Path) -> set[tuple[str, int]]:
    """(method, index) pairs on disk, after merging leftover rank files into trials.jsonl (resume)."""
    merge_rank_files(run_dir)
    return TrialStore(run_dir).done()


def merge_rank_files(run_dir: str | Path) -> int:
    """Append the records of trials.rank*.jsonl that trials.jsonl lacks (sorted by trial), fsync, then
    delete the rank files. Safe to repeat: a crash between the append and the delete duplicates nothing.
    Returns how many records were added."""
    run_dir = Path(run_dir)
    store = TrialStore(run_dir)
    _end_with_newline(store.path)  # a line torn by a crash must not swallow the next record
    files = sorted(run_dir.glob(RANK_FILE_GLOB))
    if not files:
        return 0
    done = store.done()
    new = []
    for path in files:
        for record in read_records(path):  # a torn last line (killed mid-write) is skipped
            key = (record["method"], int(record["index"]))
            if key not in done:
                done.add(key)
                new.append(record)
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    new.sort(key=lambda r: (int(r["index"]), order.get(r["method"], len(order))))
    if new:
        store.append(new)
    for path in files:
        path.unlink()
    return len(new)


def _end_with_newline(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


def single_device_args(cfg: DictConfig, device: torch.device | None) -> dict:
    """Trainer overrides that keep every attack Trainer on one device of this process: never DDP.
    `device`: a rank's own device; None: this process alone, on the first configured device."""
    args = {}
    if str(cfg.trainer.get("strategy", "auto")) != "auto":
        args["strategy"] = "auto"
    if device is not None:
        args["devices"] = [device.index or 0] if device.type == "cuda" else 1
    elif world_size(cfg) > 1:
        args["devices"] = [_gpu_indices(cfg, 1)[0]] if _on_gpu(cfg) else 1
    return args


def _gpu_indices(cfg: DictConfig, n: int) -> list[int]:
    """The first n GPUs of trainer.devices (a list, "0,1", or a count / auto: 0, 1, ...)."""
    devices = cfg.trainer.get("devices", 1)
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return [int(d) for d in devices][:n]
    if isinstance(devices, str) and "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()][:n]
    return list(range(n))


def launch_ranks(cfg: DictConfig, run_dir: Path, batches: list[list[Trial]], done: set[tuple[str, int]],
                 world: int) -> dict[str, dict]:
    """Start `world` ranks with Lightning Fabric (see the comment above); returns rank 0's summary."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.fabric.strategies import DDPStrategy

    plain = rank_config(cfg)
    gpu = _on_gpu(cfg)
    fabric = Fabric(accelerator="cuda" if gpu else "cpu", devices=_gpu_indices(cfg, world) if gpu else world,
                    num_nodes=1, strategy=DDPStrategy(start_method=start_method(cfg), process_group_backend="gloo",
                                                      # ranks are the launched processes' indices, also
                                                      # inside a SLURM job (whose SLURM_PROCID is one task's)
                                                      cluster_environment=LightningEnvironment()))
    if multiprocessing.get_start_method(allow_none=True) not in (None, "spawn", "fork", "forkserver"):
        # a joblib (loky) worker of a Hydra multirun: a spawned rank could not set up loky's start method
        multiprocessing.set_start_method("spawn", force=True)
    # one pickled payload: Fabric's launcher would otherwise walk the arguments (and refuses dataclasses)
    payload = pickle.dumps((plain, str(run_dir), batches, done, _process_state()))
    return fabric.launch(_rank_main, payload)


def start_method(cfg: DictConfig) -> str:
    """How the ranks start. "fork" for CPU ranks on Linux (`trainer.strategy` ddp or auto): a copy of this
    process, already past its imports, in ~0.1 s (spawn: ~5 s of interpreter start and imports per run,
    5% of a 50-trial benchmark). "spawn" (a fresh interpreter) with CUDA, which cannot be forked once
    initialized, on other systems, and when asked for with `trainer.strategy=ddp_spawn`."""
    forkable = sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()
    if _on_gpu(cfg) or not forkable or str(cfg.trainer.get("strategy", "auto")) == "ddp_spawn":
        return "spawn"
    return "fork"


def rank_config(cfg: DictConfig) -> DictConfig:
    """The config a rank gets: plain values, since Hydra's resolvers (${hydra:...}) and state exist
    only in this process; so also the multirun's W&B group, which `WandbTracker` reads from that state."""
    plain = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if plain.get("logger") and "group" in plain.logger and plain.logger.group is None:
        plain.logger.group = tracking.multirun_group()
    return plain


def _rank_main(fabric, payload: bytes) -> dict[str, dict] | None:
    """One rank: its share of the batches (r, r+N, ...), its rank file; rank 0 merges and summarizes."""
    cfg, run_dir, batches, done, state = pickle.loads(payload)
    _restore_process_state(state)
    if cfg.get("threads"):  # else Lightning gave each rank cores / N threads
        torch.set_num_threads(int(cfg.threads))
    rank, world = fabric.global_rank, fabric.world_size
    dataset = instantiate(cfg.dataset)
    return attack_and_record(cfg, Path(run_dir), dataset, batches[rank::world], done, rank, world,
                             fabric.device, fabric.barrier)


LOGGER_NAMES = ("lightning", "lightning.pytorch", "lightning.fabric", __name__)


def _process_state() -> dict:
    """Log levels and warning filters of this process (the app quiets Lightning), for spawned ranks (forked ones inherit them)."""
    filters = []
    for f in warnings.filters:
        try:
            pickle.dumps(f)
            filters.append(f)
        except Exception:  # a filter on a class the ranks cannot import: leave it out
            continue
    return {"levels": {name: logging.getLogger(name).level for name in LOGGER_NAMES}, "filters": filters}


def _restore_process_state(state: dict) -> None:
    for name, level in state["levels"].items():
        logging.getLogger(name).setLevel(level)
    warnings.filters[:] = state["filters"]


def prepare_batch(cfg: DictConfig, dataset, batch: list[Trial]):
    """The client side for a group of trials: private images, victims, the shared (defended) gradients.
    Returns (private, shared, cost): cost is the defense's price per trial (cosine similarity and relative
    error of the shared gradient against the true one), for evaluation only."""
    pairs = [[dataset[i] for i in t.images] for t in batch]
    private = PrivateBatch(torch.stack([torch.stack([image for image, _ in p]) for p in pairs]),
                           torch.tensor([[label for _, label in p] for p in pairs]), [t.index for t in batch])
    c, h, _ = dataset.shape
    factory, init = instantiate(cfg.model.factory), instantiate(cfg.model.init)

    def build(seed: int):
        return make_victim(factory, init, in_channels=c, image_size=h, num_classes=dataset.num_classes, seed=seed)

    if init.one_network:  # a checkpoint: one network, viewed K times
        victim = build(0)
        weights, buffers = share_one_network(victim, len(batch))
    else:  # the paper: a fresh network per trial
        victims = [build(t.victim_seed) for t in batch]
        victim = victims[0]
        weights, buffers = stack_victims(victims)
    client: Client = instantiate(cfg.client)
    shared, cost = client.share(victim, weights, buffers, private, dataset.num_classes, make_defense(cfg),
                                [t.defense_seed for t in batch])
    return private, shared, cost


def make_defense(cfg: DictConfig) -> Defense:
    """The client's defenses (defense=..., a list applies them in order) as one transform."""
    return compose({name: instantiate(node) for name, node in (cfg.get("defense") or {}).items()})


def attack_batch(cfg: DictConfig, method: str, shared, batch: list[Trial], logger, step_offset: int,
                 callbacks, trainer_args: dict | None = None) -> tuple[AttackResult, int]:
    """Attack `method` (configs/attack/<method>.yaml, assembled from its parts) on one group of trials."""
    attack, _ = fit_attack(cfg, method, shared, batch, logger, callbacks, trainer_args)
    return attack.result(), int(attack.steps_used.max())


def fit_attack(cfg: DictConfig, method: str, shared, batch: list[Trial], logger, callbacks,
               trainer_args: dict | None = None, **slots) -> tuple[GradientInversion, pl.Trainer]:
    """Build the attack `method` on the trials `batch` (the group, or continuous batching's first trials:
    `slots` are GradientInversion's refill, on_finish, tokens and queued) and run its Trainer."""
    node = cfg.attack[method]
    # the run's optimizer (optimizer=...) unless the attack brings its own
    optimizer = {} if node.get("optimizer") is not None else {"optimizer": instantiate(cfg.optimizer)}
    attack: GradientInversion = instantiate(node)(
        shared=shared,
        name=method,
        dummy_seeds=[t.dummy_seed for t in batch],
        snapshot_every=cfg.snapshot_every,
        snapshot_trials=sum(t.index < cfg.progress_trials for t in batch),
        **optimizer,
        **slots,
    )
    trainer = instantiate(cfg.trainer, max_steps=attack.max_steps, logger=logger if logger is not None else False,
                          callbacks=callbacks, **(trainer_args or {}))
    trainer.fit(attack)
    return attack, trainer


def evaluate(cfg: DictConfig, result: AttackResult, private: PrivateBatch, batch: list[Trial],
             todo: list[Trial], cost: dict[str, torch.Tensor] | None = None,
             group_size: int | None = None) -> list[dict]:
    """Per-trial records: the attack's output compared with the private data. For a client batch (B > 1)
    each reconstruction is first matched to a private image (Hungarian assignment on MSE), and the record
    holds per-image values under `images` and the trial's means. `group_size`: the trials optimized together
    (default len(batch); continuous batching: its slots, whose trial's result comes alone)."""
    order = metrics.match(result.dummy, private.images)  # (K, B): reconstruction shown as private image j
    dummy = torch.stack([d[o] for d, o in zip(result.dummy, order)])
    predicted = torch.stack([p[o] for p, o in zip(result.predicted_label, order)])
    k, b = private.labels.shape
    flat, truth = dummy.flatten(0, 1), private.images.flatten(0, 1)
    per_image = {name: f(flat, truth).view(k, b) for name, f in per_image_metrics(cfg).items()}
    wanted = {t.index for t in todo}
    axes = record_axes(cfg)
    records = []
    for row, trial in enumerate(batch):
        if trial.index not in wanted:
            continue
        labels, guesses = private.labels[row].tolist(), predicted[row].tolist()
        correct = [y == p for y, p in zip(labels, guesses)]
        record = {
            "method": result.method,
            "index": trial.index,
            "image_index": trial.images[0] if b == 1 else list(trial.images),
            "label": labels[0] if b == 1 else labels,
            "predicted_label": guesses[0] if b == 1 else guesses,
            "label_correct": all(correct),
            **{name: float(values[row].mean()) for name, values in per_image.items()},
            "distance": float(result.distance[row]),
            "status": result.status[row],
            "steps": int(result.steps[row]),
            "evaluations": int(result.evaluations[row]),
            "restarts": int(result.restarts[row]),
            "seconds": result.seconds / len(batch),  # the group's wall time, shared among its trials
            # trials optimized together (trials_per_group), not the client batch
            "group_size": group_size or len(batch),
            "seed": cfg.seed,
            "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
            "client_batch_size": b,
            "axes": {**axes, "attack": result.method},
        }
        if cost is not None:
            record["defense_cosine"] = float(cost["cosine"][row])
            record["defense_relative_error"] = float(cost["relative_error"][row])
        if b > 1:
            record["label_accuracy"] = sum(correct) / b
            record["images"] = [{"image_index": i, "label": y, "predicted_label": p,
                                 **{name: float(values[row, j]) for name, values in per_image.items()},
                                 "matched_reconstruction": int(order[row, j])}
                                for j, (i, y, p) in enumerate(zip(trial.images, labels, guesses))]
        records.append(record)
    return records


def per_image_metrics(cfg: DictConfig) -> dict:
    """name -> f(reconstructions, private images) -> (N,): MSE, PSNR, SSIM, and LPIPS with `metrics.lpips`
    set (its backbone was checked at startup by `validate`), in the order records list them."""
    found = {"mse": metrics.mse, "psnr": metrics.psnr, "ssim": metrics.ssim}
    net = OmegaConf.select(cfg, "metrics.lpips", default=False)
    if net not in (False, None):
        metric = metrics.lpips_metric(net)
        found["lpips"] = lambda reconstruction, target: metrics.lpips(reconstruction, target, metric)
    return found


def record_axes(cfg: DictConfig) -> dict:
    """The run's choices that define what was attacked and how, as flat keys (what the report and W&B
    group by): data set, victim, its init, the client, the defense and its parameters. Taken from the
    config alone, so every rank of a run writes the same."""
    defense = cfg.get("defense") or {}
    init = cfg.model.get("init") or {}
    axes = {
        "dataset": cfg.dataset._target_.rsplit(".", 1)[-1],
        "model": str(cfg.model.factory.get("target") or cfg.model.factory._target_).rsplit(".", 1)[-1],
        "model.init": str(init.get("_target_", "")).rsplit(".", 1)[-1],
        **{f"model.init.{k}": v for k, v in init.items() if k != "_target_"},
        **{f"model.factory.{k}": v for k, v in cfg.model.factory.items() if not k.startswith("_")},
        **{f"client.{k}": v for k, v in cfg.client.items() if k != "_target_"},
        "defense": "+".join(defense) or "none",
        **{f"defense.{name}.{k}": v for name, node in defense.items() for k, v in node.items() if k != "_target_"},
    }
    return {k: (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in axes.items()}


def save_pictures(cfg: DictConfig, run_dir: Path, batch: list[Trial], private: PrivateBatch,
                  results: dict[str, AttackResult]) -> None:
    """trial_NNNNN.png per trial (a client batch: trial_NNNNN_sJ.png per private image J, beside the
    reconstruction matched to it) and the progress strips of the first `progress_trials` trials (for a
    client batch, of its first reconstruction)."""
    if not results or not cfg.get("pictures", True):
        return
    methods = list(results)
    b = private.images.shape[1]
    orders = {m: metrics.match(results[m].dummy, private.images) for m in methods}
    for row, trial in enumerate(batch):
        for j in range(b):  # a client batch: a picture per private image, beside its matched reconstructions
            truth, label = private.images[row, j], int(private.labels[row, j])
            outcomes = []
            for m in methods:
                r, o = results[m], int(orders[m][row, j])
                snapshots = sorted((step, snaps[row, o]) for step, snaps in r.snapshots.items() if row < len(snaps))
                mse = float(metrics.mse(r.dummy[row, o][None], truth[None])[0])
                outcomes.append(Outcome(m, r.dummy[row, o], int(r.predicted_label[row, o]), mse, r.status[row],
                                        int(r.steps[row]), snapshots))
            name = f"trial_{trial.index:05d}.png" if b == 1 else f"trial_{trial.index:05d}_s{j}.png"
            save_trial_picture(run_dir / "pictures" / name, trial.index, trial.images[j], label, truth, outcomes)
            if j == 0 and trial.index < cfg.progress_trials and all(o.snapshots for o in outcomes):
                save_progress_strip(run_dir / "pictures" / f"progress_{trial.index:05d}.png", trial.index,
                                    trial.images[0], label, outcomes)


SUMMARY_COLUMNS = ("method", "trials", "label", "<1e-2", "<1e-3", "<1e-4", "conv", "div", "PSNR", "SSIM", "steps")
SUMMARY_NOTE = ("label: label accuracy; <t: share of trials with MSE < t",
                "conv, div: converged, diverged; PSNR, SSIM, steps (to converge): medians")
SUMMARY_TITLE = "lightning_idlg summary"
file_log = logging.getLogger("lightning_idlg.logfile")  # the run's log file only (configs/hydra/job_logging)


def summary_columns(summary: dict[str, dict]) -> tuple[str, ...]:
    """SUMMARY_COLUMNS, with LPIPS after SSIM where a method has it (metrics.lpips=...)."""
    if not any("lpips" in s for s in summary.values()):
        return SUMMARY_COLUMNS
    at = SUMMARY_COLUMNS.index("SSIM") + 1
    return (*SUMMARY_COLUMNS[:at], "LPIPS", *SUMMARY_COLUMNS[at:])


def summary_note(summary: dict[str, dict]) -> tuple[str, ...]:
    if "LPIPS" not in summary_columns(summary):
        return SUMMARY_NOTE
    return tuple(line.replace("SSIM, ", "SSIM, LPIPS, ") for line in SUMMARY_NOTE)


def summary_rows(summary: dict[str, dict]) -> list[list[str]]:
    lpips = "LPIPS" in summary_columns(summary)
    rows = []
    for method, s in summary.items():
        f = s["fidelity"]
        rows.append([method, str(s["trials"]), f"{s['label_accuracy']:.3f}", f"{f['0.01']:.3f}", f"{f['0.001']:.3f}",
                     f"{f['0.0001']:.3f}", str(s["status"]["converged"]), str(s["status"]["diverged"]),
                     f"{s['psnr']:.1f}", f"{s['ssim']:.3f}", *([f"{s.get('lpips', math.nan):.3f}"] * lpips),
                     f"{s['steps_to_converge']:.0f}"])
    return rows


def summary_text(summary: dict[str, dict]) -> str:
    """The summary as plain text, 80 columns at most (also in the log file, and without a terminal)."""
    columns = summary_columns(summary)
    rows = [list(columns), *summary_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([SUMMARY_TITLE, *lines, *summary_note(summary)])


def print_summary(summary: dict[str, dict], console: Console) -> None:
    """The per-method summary on stdout: a table on a terminal, plain text otherwise (a pipe, a SLURM log);
    both fit 80 columns. The plain text also goes to the run's log file."""
    text = summary_text(summary)
    file_log.info("%s", text)
    if not console.is_terminal:
        console.file.write(text + "\n")
        console.file.flush()
        return
    table = Table(title=SUMMARY_TITLE, caption="\n".join(summary_note(summary)), box=box.SIMPLE_HEAD, padding=(0, 1),
                  collapse_padding=True, pad_edge=False, show_edge=False, title_justify="left",
                  caption_justify="left")  # 74 columns for 1,000 trials
    for column in summary_columns(summary):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=True)
    for row in summary_rows(summary):
        table.add_row(*row)
    console.print(table)
