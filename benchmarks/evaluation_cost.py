"""Benchmark (not a test): what one trial-evaluation of the paper protocol costs, at K = 1, 8, 32 trials.

    python benchmarks/evaluation_cost.py                          # this tree, both data sets, K = 1 8 32
    python benchmarks/evaluation_cost.py --compare main           # interleaved with the package at git ref `main`
    python benchmarks/evaluation_cost.py --variant h10:optimizer.history_size=10   # and with other settings
    python benchmarks/evaluation_cost.py --profile prof.txt --trials 32 --data cifar100

The attack is built as the app builds it (the app's Hydra config `experiment=paper_<data> method=idlg`,
case.share.prepare_batch for the client, the preset's GradientInversion and BatchedLBFGS), on the real
images where --data-root holds them (else random images of the same shape: the cost does not depend on
the pixels). One intra-op thread (torch.set_num_threads(1)): the engine runs one thread per process.

Two figures per variant, data set and K, both in ms of this thread's CPU time (wall time with --wall) per
trial-evaluation:
(i)  closure: the attack's closure alone (D of all K trials, its double backward), per call / K;
(ii) step: one L-BFGS step (max_iter 20: 20 closure calls, 20 two-loop recursions over a full history
     of 100 pairs, the per-trial bookkeeping), per step / the evaluations it made.
Each step starts from the same saved state (dummies and optimizer), reached by `--warmup` steps, so every
repetition does the same work. On a shared machine: `--repeats` repetitions, variants interleaved
(A, B, A, B, ...) within each repetition so that load changes hit all alike, medians reported, and the
load average printed before and after. `--compare REF` adds the variant "REF": the package as committed at
git ref REF (a copy under another name), with its own experiment/objective/optimizer code, same config.
`--variant NAME:KEY=VALUE[,KEY=VALUE...]` adds the variant NAME: this tree with further Hydra overrides of the
preset (e.g. a shorter L-BFGS history); `--preset improved` (or `reliable`) times experiment=paper_<data>_improved.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"cifar100": "paper_cifar100", "mnist": "paper_mnist"}
# this thread's CPU time: on a machine shared with other work, time spent waiting for a core is not the
# evaluation's cost (wall time with --wall, e.g. on a quiet machine or a GPU)
clock = time.thread_time


def data_overrides(name: str, root: Path) -> list[str]:
    if name == "cifar100":
        return ["dataset=image_folder", f"dataset.root={root / 'cifar100' / 'test'}",
                f"dataset.class_names={root / 'cifar100' / 'fine_label_names.txt'}"]
    return [f"dataset.root={root / 'mnist'}"]


class RandomImages:
    """Stand-in data set of the preset's shape where the real one is not on disk."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, size: int = 1000):
        self.shape, self.num_classes, self.size = shape, num_classes, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.rand(self.shape, generator=g), int(torch.randint(self.num_classes, (1,), generator=g))


def package_at(ref: str) -> str:
    """Import name of a copy of lightning_idlg/ as committed at git ref `ref` (its imports renamed)."""
    name = "lightning_idlg_" + re.sub(r"\W", "_", ref)
    where = Path(tempfile.mkdtemp(prefix="evaluation_cost_"))
    atexit.register(shutil.rmtree, where, ignore_errors=True)
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "lightning_idlg"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=tar, check=True)
    (where / "lightning_idlg").rename(where / name)
    for file in (where / name).glob("*.py"):
        file.write_text(re.sub(r"\blightning_idlg\b", name, file.read_text()))
    sys.path.insert(0, str(where))
    return name


def retarget(node, package: str):
    """The config's `_target_`s pointed at `package` instead of lightning_idlg."""
    if isinstance(node, dict):
        return {k: retarget(v, package) for k, v in node.items()}
    if isinstance(node, list):
        return [retarget(v, package) for v in node]
    if isinstance(node, str) and node.startswith("lightning_idlg."):
        return package + node[len("lightning_idlg"):]
    return node


class Variant:
    """One attack module of K trials (the preset's, built by `package`) and its closure."""

    def __init__(self, package: str, cfg, dataset, k: int, warmup: int):
        import importlib

        from omegaconf import OmegaConf
        from hydra.utils import instantiate

        try:  # this tree's layout (stage folders), or a copy of a commit from before it (flat modules)
            plan = importlib.import_module(f"{package}.case.plan")
            share = importlib.import_module(f"{package}.case.share")
        except ModuleNotFoundError:
            plan = share = importlib.import_module(f"{package}.experiment")
        cfg = OmegaConf.create(retarget(OmegaConf.to_container(cfg, resolve=True), package))
        cfg.trials = k
        trials = plan.plan_trials(cfg, len(dataset))
        _, shared, _ = share.prepare_batch(cfg, dataset, trials)
        self.attack = instantiate(cfg.attack.idlg)(shared=shared, name="idlg",
                                                  dummy_seeds=[t.dummy_seed for t in trials], snapshot_every=0,
                                                  snapshot_trials=0, optimizer=instantiate(cfg.optimizer))
        self.optimizer = self.attack.configure_optimizers()
        self.k = k
        for _ in range(warmup):  # to a full history (100 pairs): the state most of an attack runs in
            self.optimizer.step(self.closure)
        self.saved = self._state()

    def closure(self) -> torch.Tensor:
        """The attack's closure (GradientInversion.training_step) without Lightning's manual_backward."""
        attack, raw = self.attack, self.optimizer
        raw.zero_grad()
        rows = raw.evaluating.nonzero().squeeze(1)
        distance = torch.zeros(raw.trials, dtype=attack.dummy.dtype)
        if rows.numel():
            d = attack.objective(rows)
            torch.where(torch.isfinite(d), d, torch.zeros_like(d)).sum().backward()
            distance[rows] = d.detach()
        return distance

    def _state(self) -> dict[str, torch.Tensor]:
        state = {n: v.clone() for n, v in vars(self.optimizer).items() if isinstance(v, torch.Tensor)}
        state["dummy"] = self.attack.dummy.detach().clone()
        return state

    def restore(self) -> None:
        with torch.no_grad():
            self.attack.dummy.copy_(self.saved["dummy"])
        for n, v in self.saved.items():
            if n != "dummy":
                current = getattr(self.optimizer, n)
                if current.shape == v.shape:
                    current.copy_(v)
                else:
                    setattr(self.optimizer, n, v.clone())

    def time_closure(self, calls: int) -> float:
        """CPU ms per trial-evaluation of the closure alone, every trial evaluating."""
        self.optimizer.evaluating = torch.ones_like(self.optimizer.active)
        started = clock()
        for _ in range(calls):
            self.closure()
        return (clock() - started) * 1e3 / (calls * self.k)

    def time_step(self) -> tuple[float, int]:
        """(CPU ms per trial-evaluation of one L-BFGS step, evaluations it made), from the saved state."""
        self.restore()
        before = int(self.optimizer.evaluations.sum())
        started = clock()
        self.optimizer.step(self.closure)
        seconds = clock() - started
        evaluations = int(self.optimizer.evaluations.sum()) - before
        return seconds * 1e3 / max(1, evaluations), evaluations


def build_dataset(cfg, name: str):
    from hydra.utils import instantiate

    try:
        return instantiate(cfg.dataset), "real"
    except Exception:  # not on disk: the same shape at random
        shape, classes = ((3, 32, 32), 100) if name == "cifar100" else ((1, 28, 28), 10)
        return RandomImages(shape, classes), "random"


def config(name: str, root: Path, preset: str = "paper", overrides: tuple[str, ...] = ()):
    from lightning_idlg.api import _config

    experiment = PRESETS[name] + ("" if preset == "paper" else f"_{preset}")
    return _config("idlg", [f"experiment={experiment}", "method=idlg", *data_overrides(name, root), *overrides])


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """"h10:optimizer.history_size=10,patience=5" -> ("h10", ("optimizer.history_size=10", "patience=5"))."""
    name, _, overrides = text.partition(":")
    if not name or not overrides or any("=" not in o for o in overrides.split(",")):
        raise SystemExit(f"error: --variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, tuple(overrides.split(","))


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(args) -> None:
    variants = {"this": ("lightning_idlg", ()), **{ref: (package_at(ref), ()) for ref in args.compare},
                **{name: ("lightning_idlg", overrides) for name, overrides in map(parse_variant, args.variant)}}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load()}, "
          f"{'wall' if clock is time.perf_counter else 'CPU'} ms per trial-evaluation, medians of {args.repeats}")
    print(f"{'data':9} {'K':>3} {'variant':>10} {'closure ms':>10} {'step ms':>8} {'evals/step':>10}")
    for name in args.data:
        configs = {v: config(name, args.data_root, args.preset, o) for v, (_, o) in variants.items()}
        dataset, kind = build_dataset(configs["this"], name)
        for k in args.trials:
            built = {v: Variant(p, configs[v], dataset, k, args.warmup) for v, (p, _) in variants.items()}
            closure = {v: [] for v in built}
            step = {v: [] for v in built}
            evaluations = {}
            calls = max(2, round(args.closure_ms / (k * 2.0)))  # ~closure_ms per repetition at 2 ms a trial
            for v in built.values():  # warm: allocator, caches
                v.time_closure(1)
                v.time_step()
            for _ in range(args.repeats):
                for v, variant in built.items():  # A, B, A, B, ...
                    closure[v].append(variant.time_closure(calls))
                    ms, evaluations[v] = variant.time_step()
                    step[v].append(ms)
            for v in built:
                print(f"{name + ('' if kind == 'real' else '*'):9} {k:>3} {v:>10} "
                      f"{statistics.median(closure[v]):>10.3f} {statistics.median(step[v]):>8.3f} "
                      f"{evaluations[v]:>10}", flush=True)
    print(f"load average {load()}" + ("" if kind == "real" else "   (* random images: data not found)"))


def profile(args) -> None:
    """torch.profiler over `--profile-steps` L-BFGS steps of this tree, top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    lines = [f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load()}"]
    for name in args.data:
        cfg = config(name, args.data_root, args.preset)
        dataset, kind = build_dataset(cfg, name)
        for k in args.trials:
            variant = Variant("lightning_idlg", cfg, dataset, k, args.warmup)
            variant.time_step()
            evaluations = 0
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    evaluations += variant.time_step()[1]
            lines += [f"\n== {name} ({kind} images), K = {k}: {args.profile_steps} L-BFGS steps, "
                      f"{evaluations} trial-evaluations",
                      prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)]
    Path(args.profile).write_text("\n".join(lines) + "\n")
    print(f"profile written to {args.profile}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", choices=list(PRESETS), default=list(PRESETS))
    parser.add_argument("--data-root", type=Path,
                        default=Path(os.environ.get("LIGHTNING_IDLG_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--trials", type=int, nargs="+", default=[1, 8, 32], help="K values")
    parser.add_argument("--compare", nargs="*", default=[], help="git refs to interleave with this tree")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                        help="this tree with further overrides, interleaved too (repeatable)")
    parser.add_argument("--preset", choices=["paper", "improved", "reliable"], default="paper",
                        help="experiment=paper_<data>[_improved | _reliable]")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=6, help="L-BFGS steps before timing (fills the history)")
    parser.add_argument("--closure-ms", type=float, default=150.0, help="rough time per closure repetition")
    parser.add_argument("--profile", help="write a torch.profiler table to this file instead of timing")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--wall", action="store_true", help="wall time instead of this thread's CPU time")
    args = parser.parse_args()
    if args.wall:
        global clock
        clock = time.perf_counter
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    (profile if args.profile else measure)(args)


if __name__ == "__main__":
    main()
