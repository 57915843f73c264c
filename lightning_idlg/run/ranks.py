"""Devices and ranks: how many processes attack at once, K per group, and starting the ranks.

Why not Lightning's DDP for the attack itself: the experiment builds one Trainer per attack group, and a
DDP-wrapped GradientInversion would all-reduce the dummies' gradients between ranks, mixing trials that
must stay independent. Instead Lightning Fabric only *launches* the ranks (DDPStrategy; fork or spawn,
see `start_method`) and gives each its rank, world size, device and a barrier (gloo, also on GPUs: the group
carries nothing but that barrier). The parent plans the groups once; rank r attacks groups r, r+N,
r+2N, ... with ordinary single-device Trainers on its own device (cuda:r, or a CPU process with
cores/N threads) and appends each finished group to its own trials.rank{r}.jsonl (records.store).
After the barrier rank 0 merges the rank files into trials.jsonl and writes the one summary.json."""

from __future__ import annotations

import logging
import math
import multiprocessing
import pickle
import sys
import warnings
from typing import Callable

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_idlg.errors import ConfigError
from lightning_idlg.run import tracking
from lightning_idlg.run.quiet import LIGHTNING_LOGGERS


# K = 32 on a CPU core: measured time per trial-evaluation (1 thread, 10 L-BFGS steps, all trials active) for
# K = 8 / 16 / 32 / 64: digits 1x28x28: 1.24 / 0.95 / 0.74 / 0.70 ms; the paper's 3x32x32, 100 classes:
# 2.99 / 2.54 / 2.10 / 2.48 ms. 32 is the best or within 5% of it; beyond, the L-BFGS history (2 x K x 100 x
# pixels floats) grows for nothing, and a larger batch waits longer for its slowest trial.
CPU_TRIALS_PER_GROUP = 32


GPU_TRIALS_PER_GROUP = 512


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


def launch_ranks(cfg: DictConfig, world: int, entry: Callable, *args) -> dict[str, dict]:
    """Start `world` ranks with Lightning Fabric (see the module docstring), each calling
    `entry(fabric, cfg, *args)` with the plain config (`rank_config`); returns rank 0's result. `entry` and
    `args` are pickled (a spawned rank imports `entry`'s module)."""
    from lightning.fabric import Fabric
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.fabric.strategies import DDPStrategy

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
    payload = pickle.dumps((entry, rank_config(cfg), args, _process_state()))
    return fabric.launch(_rank, payload)


def _rank(fabric, payload: bytes):
    """One rank: this process's state as the parent's (log levels, warning filters), then `entry`."""
    entry, cfg, args, state = pickle.loads(payload)
    _restore_process_state(state)
    if cfg.get("threads"):  # else Lightning gave each rank cores / N threads
        torch.set_num_threads(int(cfg.threads))
    return entry(fabric, cfg, *args)


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


LOGGER_NAMES = (*LIGHTNING_LOGGERS, "lightning_idlg")


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
