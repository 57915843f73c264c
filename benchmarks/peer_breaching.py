"""Benchmark (not a test): the peer line. The same trials attacked by breaching 0.1.2 and by lightning_idlg.

    python benchmarks/peer_breaching.py --trials 6 --attacks dlg                 # a quick check
    python benchmarks/peer_breaching.py --trials 50 --cores 2                    # DLG and IG, 50 trials each
    python benchmarks/peer_breaching.py --attacks ig --ig-models resnet20 --ig-steps 2400 \
        --checkpoint resnet20=/path/to/resnet20.pt --breaching-venv /path/to/venv

breaching runs in a venv of its own (--breaching-venv, default /work/breaching-venv), never in ours:

    python3 -m venv VENV && VENV/bin/pip install torch==2.14.1 torchvision==0.29.1 breaching==0.1.2

Comparisons (`--attacks`):
(a) dlg: DLG with the iDLG label on the paper's LeNet (docs/paper.md): ours `experiment=paper_cifar100
    method=idlg` (L-BFGS lr 1, 300 steps, stop at D < 1e-6); breaching `attack=deepleakage
    attack.attack_type=optimization attack.label_strategy=iDLG attack.optim.max_iterations=300` on
    `lenet_zhu` (the same layers, shapes and order as our LeNet).
(b) ig: Inverting Gradients at client batch 1 on each of --ig-models (ConvNet, ResNet-20: breaching's
    `ConvNet` and `resnet20`), untrained, and on a checkpoint per `--checkpoint MODEL=PATH`; ours
    `dataset=cifar100 method=ig model=<m> steps=<--ig-steps>` (breaching's settings: cosine objective, TV
    0.2, signed Adam lr 0.1 with step decay, box [0, 1], best iterate, no early stop, labels by iDLG's
    rule), breaching `attack=invertinggradients attack.optim.max_iterations=<--ig-steps>`. Both get the
    same budget (breaching's default, 24,000, is too slow for a CPU benchmark). Cost per trial and
    iteration on one core, both sides alike (measured on a loaded machine): ConvNet ~0.22 s CPU, ResNet-20
    ~0.03 s; so 20 trials at 2,400 iterations take ~3 CPU-hours per side on ConvNet, ~25 CPU-minutes on
    ResNet-20 (--attacks ig --ig-models resnet20 runs one alone).

Same trials: our side composes the app's own config with the same overrides as its run and takes, for the
seed, the app's trial plan (experiment.plan_trials: which CIFAR-100 images, victim and dummy seeds) and the
app's client (experiment.prepare_batch: images in [0, 1], labels, victim weights, shared gradient; the
buffers from the victims rebuilt as it builds them) and the attack's own dummy draw. breaching gets exactly
those tensors in a file: the image and label as the user's custom data, the victim copied into its model by
parameter and buffer order (shapes checked one for one), our dummy start as `reconstruct(initial_data=...)`.
Its data config is set to `normalize=False`, mean 0, std 1 (the same [0, 1] tensors; IG's box is [0, 1]),
BatchNorm in the mode of our client (`client.mode=train`: no public buffers, batch statistics; eval: the
server sends the buffers, so pass `--ig-override client.mode=eval --ig-override client.share_buffers=true`),
and the labels by the same rule as ours (our iDLG weight_sum rule: breaching's iDLG; bias: its analytic).
Checksums of images, labels and weights are printed per side (breaching's taken from what its user and its
model's payload hold), and the relative L2 difference of breaching's shared gradient from ours (all tensors
as one vector; over 1e-4 fails).

Cores: both sides get --cores processes of one thread each (OMP_NUM_THREADS=1, torch.set_num_threads(1)).
Ours: the app's own parallelism (`trainer=ddp trainer.devices=<cores> threads=1`, trials per group auto).
breaching, which has no multi-process mode, gets the same cores as one process per core with the trials
shared out (trial i to process i mod cores): its best configuration. Each side is timed end to end
(interpreter start, imports, data, all attacks): wall time, and CPU time as getrusage of the child
processes (user + system, every descendant included), so `attacks per CPU-minute` is attacks / CPU
minutes spent, not wall x cores. Metrics on both sides are ours (lightning_idlg.metrics: MSE on raw
pixels, PSNR and SSIM clamped to [0, 1]); success is MSE < 1e-3.

Known differences (see also /work/shared/docs/peer-breaching.md): breaching's Euclidean objective is
0.5 * sum ||dg||^2 (ours sum ||dg||^2), so L-BFGS's first step and its tolerances differ and so do
trajectories, trial by trial; breaching always runs all its iterations (no early stop; ours stops at
D < 1e-6) and returns the best iterate by objective (strictly: the iterate after the optimizer step whose
starting objective was lowest), ours the last one. IG: breaching's total variation pads the image with
zeros (the last row and column also count |x|) and adds 1e-8 to every term, ours (torchmetrics') does
not; both divide by the pixels x channels.

Prints per comparison and side: attacks per minute, attacks per CPU-minute, success, label accuracy,
median PSNR and SSIM, median objective evaluations; then the ratio ours / theirs. The last lines are
machine-readable, `ratio_per_cpu_minute <comparison>: X` (comparison: dlg, ig_<model>[_checkpoint]).
Logs, both sides' outputs and results.json (every trial of both sides) go to outputs/benchmarks/peer-<time>/
(--out); the trial files handed to breaching too with --keep-cases.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from _breaching_worker import checksum
from paper_protocol import ROOT, SUCCESS_MSE, timed_group

WORKER = Path(__file__).resolve().parent / "_breaching_worker.py"
# our victim (configs/model/<name>.yaml) -> breaching's model of the same parameters, in the same order
BREACHING_MODELS = {"lenet": "lenet_zhu", "convnet": "ConvNet", "resnet20": "resnet20", "resnet18": "resnet18"}
# the data and case settings every breaching run shares: one CIFAR-100 image, pixels in [0, 1] unnormalized
BREACHING_CASE = ["case=1_single_image_small", "case/data=CIFAR100", "case.data.normalize=False",
                  "case.data.mean=[0,0,0]", "case.data.std=[1,1,1]", "case.server.model_state=default",
                  "case.user.num_data_points=1", "attack.optim.callback=1000000"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclass
class Comparison:
    """One line of the peer table: our app's overrides and breaching's, for the same trials."""

    name: str  # dlg, ig_convnet, ig_resnet20_checkpoint, ...
    title: str
    ours: list[str]  # Hydra overrides of our app (besides data, trials, seed, cores and output)
    breaching: list[str]  # breaching's attack overrides (besides BREACHING_CASE, model, labels, BatchNorm)
    model: str  # our model= name


def comparisons(args) -> list[Comparison]:
    out = []
    if "dlg" in args.attacks:
        out.append(Comparison("dlg", "DLG with the iDLG label, paper LeNet (paper_cifar100: L-BFGS, 300 steps)",
                              ["experiment=paper_cifar100", "method=idlg", *args.dlg_override],
                              # the label: attack.label_strategy=iDLG, from our label strategy (breaching_labels)
                              ["attack=deepleakage", "attack.attack_type=optimization",
                               "attack.optim.max_iterations=300"], "lenet"))
    if "ig" in args.attacks:
        checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
        for model in args.ig_models:
            trained = ["model/init=checkpoint", f"model.init.path={checkpoints.get(model)}"]
            variants = [("", [])] + ([("_checkpoint", trained)] if model in checkpoints else [])
            for suffix, init in variants:
                out.append(Comparison(
                    f"ig_{model}{suffix}", f"Inverting Gradients, batch 1, {model} "
                    f"({'checkpoint ' + checkpoints[model] if suffix else 'untrained'}), {args.ig_steps} iterations",
                    ["dataset=cifar100", f"method={args.ig_method}", f"model={model}", *init, f"steps={args.ig_steps}",
                     *args.ig_override],
                    ["attack=invertinggradients", f"attack.optim.max_iterations={args.ig_steps}"], model))
    return out


# --------------------------------------------------------------------------------------------- our side

def our_overrides(args, comparison: Comparison) -> list[str]:
    cores = ["trainer=ddp", f"trainer.devices={args.cores}"] if args.cores > 1 else []
    return [*comparison.ours, f"dataset.root={Path(args.data_root).resolve()}",
            f"trials={args.trials}", f"seed={args.seed}", *cores, "threads=1", "pictures=false",
            "progress_trials=0", "progress_bar=false"]


def compose(overrides: list[str]):
    """The app's config for `overrides`, composed exactly as the command line composes it."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def write_case(args, comparison: Comparison, path: Path) -> dict:
    """Our trials for `comparison`, as the app plans and shares them, written for breaching's workers into
    the folder `path`: overrides.json, and one trial_<index>.pt each (a worker holds one trial at a time:
    a ConvNet victim and its gradient are 25 MB). Returns our side's per-trial facts (labels, checksums)
    and breaching's overrides for them."""
    from hydra.utils import instantiate

    from lightning_idlg.experiment import attack_names, plan_trials, prepare_batch

    cfg = compose(our_overrides(args, comparison))
    [method] = attack_names(cfg)
    dataset = instantiate(cfg.dataset)
    trials = plan_trials(cfg, len(dataset))
    private, shared, _ = prepare_batch(cfg, dataset, trials)
    dummies, _ = instantiate(cfg.attack[method].dummy).draw([t.dummy_seed for t in trials], shared.input_shape,
                                                            shared.batch_size, shared.num_classes)
    buffers = victim_buffers(cfg, dataset, trials, shared.weights)
    overrides = [*BREACHING_CASE, f"case.model={BREACHING_MODELS[comparison.model]}",
                 *breaching_labels(cfg.attack[method]), *breaching_batchnorm(cfg), *comparison.breaching]
    path.mkdir()
    (path / "overrides.json").write_text(json.dumps(overrides))
    rows = []
    for k, trial in enumerate(trials):
        image, label = private.images[k, 0].clone(), int(private.labels[k, 0])
        weights = [w[k].clone() for w in shared.weights.values()]
        torch.save({"index": trial.index, "image": image, "label": label, "weights": weights, "buffers": buffers[k],
                    "dummy": dummies[k].clone(), "dummy_seed": trial.dummy_seed,
                    "gradient": [g[k].clone() for g in shared.gradients.values()]},
                   path / f"trial_{trial.index:05d}.pt")
        rows.append({"index": trial.index, "image_index": trial.images[0], "label": label, "image": image,
                     "seen": {"image": checksum([image[None]]), "label": checksum([torch.tensor([label])]),
                              "weights": checksum(weights)}})
    return {"method": method, "overrides": overrides, "trials": rows}


def victim_buffers(cfg, dataset, trials, weights: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """Each trial's victim buffers (BatchNorm statistics), which the shared record holds only where the
    server knows them: the victims built again as the app builds them (label_restoration.build_victims,
    checked against the weights the client shared)."""
    from lightning_idlg.label_restoration import build_victims

    _, rebuilt, buffers = build_victims(cfg, dataset, [t.index for t in trials])
    if any(not torch.equal(rebuilt[n], w) for n, w in weights.items()):
        raise SystemExit("rebuilding the victims for their buffers gave other weights than the app's client")
    return [[b[k].clone() for b in buffers.values()] for k in range(len(trials))]


def breaching_labels(node) -> list[str]:
    """breaching's label setting for our attack's `label_strategy` (batch 1)."""
    target = str(node.label_strategy._target_).rsplit(".", 1)[-1] if node.get("label_strategy") else None
    rule = node.label_strategy.get("rule") if target else None
    if target == "AnalyticLabel" and rule == "weight_sum":  # the same rule: argmin of the head's row sums
        return ["case.user.provide_labels=False", "attack.label_strategy=iDLG"]
    if target == "AnalyticLabel" and rule == "bias":  # the one negative entry of the head's bias gradient
        return ["case.user.provide_labels=False", "attack.label_strategy=analytic"]
    raise SystemExit(f"no breaching counterpart known for our label strategy {target} (rule {rule}); "
                     "add one to breaching_labels")


def breaching_batchnorm(cfg) -> list[str]:
    """BatchNorm as our client runs it: train mode (batch statistics; breaching: no public buffers, so its
    user and attacker both run in train mode) or eval mode (running statistics the server sends)."""
    return [f"case.server.provide_public_buffers={cfg.client.mode == 'eval'}"]


def our_side(args, comparison: Comparison, out: Path, method: str) -> dict:
    """The app as a user runs it, in a subprocess; its records (trials.jsonl) and cost."""
    run_dir = out / f"{comparison.name}_ours"
    command = [sys.executable, "-m", "lightning_idlg", *our_overrides(args, comparison), f"hydra.run.dir={run_dir}"]
    run = timed_group([command], [out / f"{comparison.name}_ours.log"], env=ONE_THREAD)
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    rows = sorted((r for r in rows if r["method"] == method), key=lambda r: r["index"])
    return {**run, "command": " ".join(command[3:]), "processes": args.cores,
            "trials": [{k: r[k] for k in ("index", "image_index", "label", "predicted_label", "label_correct", "mse",
                                          "psnr", "ssim", "distance", "steps", "evaluations")} for r in rows]}


# --------------------------------------------------------------------------------------------- breaching

def breaching_side(args, comparison: Comparison, out: Path, case_dir: Path, case: dict) -> dict:
    """breaching's workers, one process per core, trial i in process i mod cores; metrics by ours."""
    from lightning_idlg import metrics

    python = str(Path(args.breaching_venv) / "bin" / "python")
    shards = [out / f"{comparison.name}_breaching.{i}.pt" for i in range(args.cores)]
    commands = [[python, str(WORKER), str(case_dir), "--shard", str(i), "--shards", str(args.cores), "--out", str(f)]
                for i, f in enumerate(shards)]
    run = timed_group(commands, [out / f"{comparison.name}_breaching.{i}.log" for i in range(args.cores)],
                      env=ONE_THREAD)
    parts = [torch.load(f, weights_only=True) for f in shards]
    truth = {t["index"]: t for t in case["trials"]}
    rows = []
    for r in sorted((r for p in parts for r in p["trials"]), key=lambda r: r["index"]):
        t = truth[r["index"]]
        x, x0 = r["reconstruction"], t["image"][None]
        rows.append({"index": r["index"], "image_index": t["image_index"], "label": t["label"],
                     "predicted_label": r["labels"][0], "label_correct": r["labels"] == [t["label"]],
                     "mse": float(metrics.mse(x, x0)[0]), "psnr": float(metrics.psnr(x, x0)[0]),
                     "ssim": float(metrics.ssim(x, x0)[0]), "best_objective": r["best_objective"],
                     "iterations": r["iterations"], "evaluations": r["evaluations"], "seconds": r["seconds"],
                     "cpu_seconds": r["cpu_seconds"], "gradient_error": r["gradient_error"], "seen": r["seen"]})
    return {**run, "processes": args.cores, "threads": [p["threads"] for p in parts],
            "config": json.loads(parts[0]["config"]), "trials": rows}


# --------------------------------------------------------------------------------------------- report

def summary(side: dict) -> dict:
    rows = side["trials"]
    n = len(rows)
    return {"trials": n, "per_minute": n / side["wall"] * 60, "per_cpu_minute": n / side["cpu"] * 60,
            "success": sum(r["mse"] < SUCCESS_MSE for r in rows) / n,
            "label_accuracy": sum(bool(r["label_correct"]) for r in rows) / n,
            "psnr": statistics.median(r["psnr"] for r in rows), "ssim": statistics.median(r["ssim"] for r in rows),
            "evaluations": statistics.median(r["evaluations"] for r in rows)}


def print_side(name: str, side: dict, s: dict, detail: str) -> None:
    print(f"  {name}: {s['per_minute']:.2f} attacks/min, {s['per_cpu_minute']:.2f} attacks/CPU-min "
          f"({s['trials']} in {side['wall']:.1f} s wall, {side['cpu']:.1f} s CPU, {side['processes']} process(es) "
          f"x 1 thread), success (MSE < 1e-3) {s['success']:.3f}, label accuracy {s['label_accuracy']:.3f}, "
          f"median PSNR {s['psnr']:.1f}, median SSIM {s['ssim']:.3f}, median evaluations {s['evaluations']:.0f}, "
          f"peak memory {side['rss_mb']:.0f} MB RSS (largest process) / {side['pss_mb']:.0f} MB PSS (all); {detail}")


def check_same_trials(case: dict, ours: dict, theirs: dict) -> list[str]:
    """What both sides saw, as checksums; the problems found (empty: the same trials)."""
    problems = []
    for t, o in zip(case["trials"], ours["trials"]):
        if (o["index"], o["image_index"], o["label"]) != (t["index"], t["image_index"], t["label"]):
            problems.append(f"trial {t['index']}: the app attacked image {o['image_index']} label {o['label']}, "
                            f"the case holds image {t['image_index']} label {t['label']}")
    if len(ours["trials"]) != len(case["trials"]):
        problems.append(f"the app recorded {len(ours['trials'])} trials, the case holds {len(case['trials'])}")
    for side, rows in (("ours", case["trials"]), ("breaching", theirs["trials"])):  # over all trials, in order
        print(f"  checksums {side:9}: " + ", ".join(
            f"{what} {hashlib.sha256(' '.join(r['seen'][what] for r in rows).encode()).hexdigest()[:12]}"
            for what in ("image", "label", "weights")))
    for t, b in zip(case["trials"], theirs["trials"]):
        if t["seen"] != b["seen"]:
            problems.append(f"trial {t['index']}: breaching saw {b['seen']}, ours {t['seen']}")
    worst = max(r["gradient_error"] for r in theirs["trials"])
    print(f"  shared gradient: breaching's user against our client, relative L2 difference {worst:.1e} at most")
    if worst > 1e-4:
        problems.append(f"breaching's shared gradient differs from ours by up to {worst:.1e} (relative)")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="/work/shared/data/cifar100",
                        help="CIFAR-100 (the app's dataset=cifar100 dataset.root)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(),
                        help="processes per side, one thread each (ours: trainer=ddp ranks; breaching: shards)")
    parser.add_argument("--attacks", type=lambda s: s.split(","), default=["dlg", "ig"], help="dlg,ig")
    parser.add_argument("--ig-models", type=lambda s: s.split(","), default=["convnet", "resnet20"],
                        help="our model= names for IG: " + ", ".join(BREACHING_MODELS))
    parser.add_argument("--ig-steps", type=int, default=2400, help="IG iterations on both sides (breaching: 24000)")
    parser.add_argument("--ig-method", default="ig",
                        help="our IG (method=ig: breaching's settings, no early stop, one attempt)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="also attack this trained victim (model/init=checkpoint), e.g. resnet20=ckpt.pt")
    parser.add_argument("--dlg-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a further Hydra override of our DLG run")
    parser.add_argument("--ig-override", action="append", default=[], metavar="KEY=VALUE",
                        help="a further Hydra override of our IG runs")
    parser.add_argument("--per-trial", action="store_true", help="also print each trial's MSE, PSNR, evaluations")
    parser.add_argument("--keep-cases", action="store_true", help="keep the trial files handed to breaching")
    parser.add_argument("--breaching-venv", default="/work/breaching-venv", help="the venv with breaching 0.1.2")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"), help="logs, cases and runs")
    args = parser.parse_args()
    for c in args.checkpoint:
        if "=" not in c or c.split("=", 1)[0] not in args.ig_models:
            parser.error(f"--checkpoint {c}: give MODEL=PATH with MODEL one of --ig-models")

    out = Path(args.out) / time.strftime("peer-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(f"peer line: breaching 0.1.2 ({args.breaching_venv}) and lightning_idlg on the same {args.trials} "
          f"CIFAR-100 trials (seed {args.seed}, {args.data_root}); {args.cores} process(es) x 1 thread per side; "
          f"IG budget {args.ig_steps} iterations; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"at start; outputs {out}", flush=True)
    ratios, problems, results = {}, [], {}
    for comparison in comparisons(args):
        case_dir = out / f"{comparison.name}_case"
        case = write_case(args, comparison, case_dir)
        ours = our_side(args, comparison, out, case["method"])
        theirs = breaching_side(args, comparison, out, case_dir, case)
        if not args.keep_cases:  # 25 MB a trial for ConvNet
            shutil.rmtree(case_dir)
        print(f"{comparison.name}: {comparison.title}")
        print(f"  ours: lightning-idlg {ours['command']}")
        print(f"  breaching: {' '.join(case['overrides'])}")
        problems += [f"{comparison.name}: {p}" for p in check_same_trials(case, ours, theirs)]
        s_ours, s_theirs = summary(ours), summary(theirs)
        print_side("lightning_idlg", ours, s_ours, "trainer=ddp ranks, trials per group auto")
        print_side("breaching", theirs, s_theirs, f"one process per core, attacks alone "
                   f"{sum(r['cpu_seconds'] for r in theirs['trials']):.1f} s CPU")
        if args.per_trial:
            for o, b in zip(ours["trials"], theirs["trials"]):
                print(f"    trial {o['index']:3d} image {o['image_index']:4d} label {o['label']:3d}: MSE ours "
                      f"{o['mse']:.3e} breaching {b['mse']:.3e}; PSNR {o['psnr']:.1f} / {b['psnr']:.1f}; evaluations "
                      f"{o['evaluations']} / {b['evaluations']}; objective {o['distance']:.3g} / "
                      f"{b['best_objective']:.3g}")
        ratios[comparison.name] = s_ours["per_cpu_minute"] / s_theirs["per_cpu_minute"]
        print(f"  ratio ours/theirs: {ratios[comparison.name]:.2f} per CPU-minute, "
              f"{s_ours['per_minute'] / s_theirs['per_minute']:.2f} per minute", flush=True)
        results[comparison.name] = {"ours": {**s_ours, **{k: v for k, v in ours.items() if k != "trials"}},
                                    "breaching": {**s_theirs, **{k: v for k, v in theirs.items() if k != "trials"}},
                                    "ours_trials": ours["trials"], "breaching_trials": theirs["trials"]}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other processes compete for the same cores)")
    for p in problems:
        print(f"NOT THE SAME TRIALS: {p}")
    for name, ratio in ratios.items():
        print(f"ratio_per_cpu_minute {name}: {ratio:.2f}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
