"""Benchmark (not a test): the peer line. The same trials attacked by breaching 0.1.2 and by lightning_idlg.

    python benchmarks/peer_breaching.py --trials 6 --attacks dlg                 # a quick check
    python benchmarks/peer_breaching.py --trials 50 --cores 2                    # DLG and IG, 50 trials each
    python benchmarks/peer_breaching.py --attacks ig --ig-models resnet20 --ig-steps 2400 \
        --checkpoint resnet20=/path/to/resnet20.pt --breaching-venv /path/to/venv
    # client batches and FedAvg (issue 14), ~27 min wall on 2 quiet cores (estimate below); writes the page
    python benchmarks/peer_breaching.py --trials 20 --cores 2 --attacks ig_batch,fedavg --batch-sizes 4,8 \
        --local-steps 1,5,10 --ig-steps 200 --fedavg-steps 40 --write-doc docs/studies/generated/batches.md

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
(c) ig_batch: Inverting Gradients on clients of B samples (--batch-sizes, default 4 and 8) on
    --batch-model (ResNet-20), untrained: ours `method=ig model=resnet20 client.batch_size=B`, breaching
    `attack=invertinggradients case.user.num_data_points=B`, --ig-steps each. Labels (--batch-labels) by
    a rule both sides compute identically for B > 1: `yin` (ours lightning_idlg.attacks.labels.Yin, breaching
    `label_strategy=yin`: the B most negative row minima of the head's weight gradient; default) or
    `bias-corrected` (ours BiasCorrected); the check below says whether both restored the same multiset.
(d) fedavg: a FedAvg client of --fedavg-batch (4) samples making T local SGD steps (--local-steps, default
    1, 5, 10), each over all B samples at lr --local-lr (1e-3): ours `client=fedavg client.epochs=T
    client.local_batch_size=B client.lr=LR` attacked by `method=ig` with the LocalUpdates objective (it
    simulates the T steps with the dummies); breaching's `local_update` user (`case/user=local_updates
    num_local_updates=T num_data_per_local_update_step=B local_learning_rate=LR
    provide_local_hyperparams=True`) attacked by `invertinggradients`, whose objective then simulates the
    same steps (`_grad_fn_multi_step`: T differentiable SGD steps of the dummies from the sent weights,
    compared with the shared update by the cosine). --fedavg-steps iterations (default --ig-steps). Full-
    batch steps because 1, 5 and 10 steps over B = 4 samples are possible no other way, and because a
    restored label belongs to no sample: with smaller local batches the labels of each step would be a
    guess. Labels: breaching's multi-step objective ignores its label strategy and uses the true labels of
    every step, which its user discloses with the local hyperparameters; --breaching-local-labels
    restored (default) replaces them by breaching's own strategy (--batch-labels) on the update with its
    sign turned, the same rule ours applies to its pseudo-gradient u = (w_0 - w_E) / (lr T); `disclosed`
    keeps breaching's threat model (our side has no way to be given the labels).
    Cost per client and IG iteration on one core (both sides alike within ~30%; from runs of 2 clients at
    5 and 25 iterations on a loaded machine, so an upper bound; ours may be lower with 10 clients per
    vmapped group, not measured): ResNet-20 IG at B = 4 ~0.05-0.08 s CPU, B = 8 ~0.06-0.11 s; FedAvg at
    B = 4, T = 1 ~0.06 s, T = 5 ~0.3 s, T = 10 ~0.6 s (the objective backpropagates through T local steps).
    So (c) and (d) at 20 clients cost about 6.4 CPU-s per iteration of (c) and 40 CPU-s per iteration of
    (d), both sides together, plus ~300 CPU-s of start-up and case writing: --ig-steps 200 --fedavg-steps
    40 is ~3,200 CPU-s, ~27 min wall on 2 cores; 500 and 100 would take ~65 min.

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
as one vector). The check (over 1e-4 fails) compares both computed in float64: our client once more in
float64 (victims, images, local SGD), breaching's user code replayed on float64 copies by its worker
(outside its timed attack; that CPU is taken off its total). In float32 two implementations of the same
computation can differ by more (a BatchNorm network's gradient at small batch variances, T local SGD
steps that amplify rounding: float32 and float64 runs of one plain torch.optim.SGD loop differ by ~1e-3 at
T = 5), so the float32 differences are printed beside it, each side's against float64 too. FedAvg: the
update breaching shares is w_E - w_0, compared as -update / (lr T).

Cores: both sides get --cores processes of one thread each (OMP_NUM_THREADS=1, torch.set_num_threads(1)).
Ours: the app's own parallelism (`trainer=ddp trainer.devices=<cores> threads=1`, trials per group auto).
breaching, which has no multi-process mode, gets the same cores as one process per core with the trials
shared out (trial i to process i mod cores): its best configuration. Each side is timed end to end
(interpreter start, imports, data, all attacks): wall time, and CPU time as getrusage of the child
processes (user + system, every descendant included), so `attacks per CPU-minute` is attacks / CPU
minutes spent, not wall x cores. Metrics on both sides are ours (lightning_idlg.records.metrics: MSE on raw
pixels, PSNR and SSIM clamped to [0, 1]); success is MSE < 1e-3. At B > 1 an attack is a client: each
reconstruction is matched to a private image (metrics.match, Hungarian on MSE; breaching's reconstructions
the same way, reconstruction i carrying breaching's sorted label i), PSNR, SSIM and success are per image
(median over all images), the per-client PSNR a client's mean over its images (median over clients), label
accuracy per image after matching, and exact the clients whose restored label multiset is right.

Known differences (see also /work/shared/docs/peer-breaching.md): breaching's Euclidean objective is
0.5 * sum ||dg||^2 (ours sum ||dg||^2), so L-BFGS's first step and its tolerances differ and so do
trajectories, trial by trial; breaching always runs all its iterations (no early stop; ours stops at
D < 1e-6) and returns the best iterate by objective (strictly: the iterate after the optimizer step whose
starting objective was lowest), ours the last one. IG: breaching's total variation pads the image with
zeros (the last row and column also count |x|) and adds 1e-8 to every term, ours (torchmetrics') does
not; both divide by the pixels x channels.

Prints per comparison and side: attacks per minute, attacks per CPU-minute, success, label accuracy,
median PSNR (per image and per client) and SSIM, median objective evaluations; then the ratio ours /
theirs. The last lines are machine-readable, `ratio_per_cpu_minute <comparison>: X` (comparison: dlg,
ig_<model>[_checkpoint], ig_<model>_b<B>, fedavg_<model>_b<B>_t<T>). Logs, both sides' outputs,
results.json (every trial of both sides) and run.json (command, machine) go to
outputs/benchmarks/peer-<time>/ (--out); the trial files handed to breaching too with --keep-cases.
--write-doc PATH writes the tables as a page (docs/studies/generated/batches.md); --doc-from RUN_DIR --write-doc PATH writes
it again from a run's folder without running.
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

from _breaching_worker import checksum, relative_difference
from paper_protocol import ROOT, SUCCESS_MSE, timed_group

WORKER = Path(__file__).resolve().parent / "_breaching_worker.py"
# our victim (configs/model/<name>.yaml) -> breaching's model of the same parameters, in the same order
BREACHING_MODELS = {"lenet": "lenet_zhu", "convnet": "ConvNet", "resnet20": "resnet20", "resnet18": "resnet18"}
# the data and case settings every breaching run shares: one CIFAR-100 image, pixels in [0, 1] unnormalized
BREACHING_CASE = ["case=1_single_image_small", "case/data=CIFAR100", "case.data.normalize=False",
                  "case.data.mean=[0,0,0]", "case.data.std=[1,1,1]", "case.server.model_state=default",
                  "attack.optim.callback=1000000"]
# batch label strategies (client batch B > 1) that both sides compute the same way: --batch-labels -> our
# label strategy (lightning_idlg.attacks.labels) and breaching's attack.label_strategy
BATCH_LABELS = {"yin": ("Yin", "yin"), "bias-corrected": ("BiasCorrected", "bias-corrected")}
ATTACKS = ("dlg", "ig", "ig_batch", "fedavg")
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# per private image (a record's `images` at B > 1, the record itself at B = 1)
IMAGE_KEYS = ("image_index", "label", "predicted_label", "mse", "psnr", "ssim")


@dataclass
class Comparison:
    """One line of the peer table: our app's overrides and breaching's, for the same trials."""

    name: str  # dlg, ig_convnet, ig_resnet20_checkpoint, ...
    title: str
    ours: list[str]  # Hydra overrides of our app (besides data, trials, seed, cores and output)
    breaching: list[str]  # breaching's attack overrides (besides BREACHING_CASE, model, labels, BatchNorm)
    model: str  # our model= name
    batch_size: int = 1  # B, the client's samples
    local_steps: int | None = None  # T local SGD steps of a FedAvg client (None: it shares one gradient)


def batch_label_overrides(args) -> list[str]:
    """Our IG's label strategy for B > 1 (--batch-labels), in place of iDLG's rule."""
    ours, _ = BATCH_LABELS[args.batch_labels]
    return [f"attack.ig.label_strategy._target_=lightning_idlg.attacks.labels.{ours}", "~attack.ig.label_strategy.rule"]


def batch_comparisons(args) -> list[Comparison]:
    """(c) IG at client batches B (--batch-sizes) and (d) a FedAvg client of --fedavg-batch samples with
    T full-batch local steps (--local-steps), on --batch-model, untrained unless --ig-override says."""
    out, model, ig = [], args.batch_model, ["attack=invertinggradients"]
    # the victim as --ig-override sets it (e.g. model/init=checkpoint model.init.path=...), else untrained
    victim = ", ".join(o for o in args.ig_override if o.startswith("model")) or "untrained"
    if "ig_batch" in args.attacks:
        for b in args.batch_sizes:
            out.append(Comparison(
                f"ig_{model}_b{b}", f"Inverting Gradients, client batch {b}, {model} ({victim}), labels "
                f"{args.batch_labels}, {args.ig_steps} iterations",
                ["dataset=cifar100", f"method={args.ig_method}", f"model={model}", f"client.batch_size={b}",
                 f"steps={args.ig_steps}", *batch_label_overrides(args), *args.ig_override],
                [*ig, f"attack.optim.max_iterations={args.ig_steps}"], model, b))
    if "fedavg" in args.attacks:
        b = args.fedavg_batch
        for t in args.local_steps:
            out.append(Comparison(
                f"fedavg_{model}_b{b}_t{t}", f"FedAvg client, {b} samples, {t} full-batch local SGD step(s) at lr "
                f"{args.local_lr:g}, attacked by Inverting Gradients simulating them, {model} ({victim}), labels "
                f"{args.batch_labels}, {args.fedavg_steps} iterations",
                ["dataset=cifar100", f"method={args.ig_method}", f"model={model}", "client=fedavg",
                 f"client.batch_size={b}", f"client.epochs={t}", f"client.local_batch_size={b}",
                 f"client.lr={args.local_lr}", "client.disclose_local=true",
                 "attack.ig.objective._target_=lightning_idlg.attacks.local_updates.LocalUpdates", f"steps={args.fedavg_steps}",
                 *batch_label_overrides(args), *args.ig_override],
                # breaching's FedAvg user: T local updates of all B samples at the same lr, disclosed to the server
                ["case/user=local_updates", f"case.user.num_local_updates={t}",
                 f"case.user.num_data_per_local_update_step={b}", f"case.user.local_learning_rate={args.local_lr}",
                 "case.user.provide_local_hyperparams=True", *ig, f"attack.optim.max_iterations={args.fedavg_steps}"],
                model, b, t))
    return out


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
    return out + batch_comparisons(args)


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
    the folder `path`: overrides.json, settings.json and one trial_<index>.pt each (a worker holds one
    trial at a time: a ConvNet victim and its gradient are 25 MB). Returns our side's per-trial facts
    (images, labels, checksums) and breaching's overrides for them."""
    from hydra.utils import instantiate

    from lightning_idlg.case.plan import plan_trials

    from lightning_idlg.case.share import prepare_batch

    from lightning_idlg.run.experiment import attack_names

    cfg = compose(our_overrides(args, comparison))
    [method] = attack_names(cfg)
    dataset = instantiate(cfg.dataset)
    trials = plan_trials(cfg, len(dataset))
    private, shared, _ = prepare_batch(cfg, dataset, trials)
    dummies, _ = instantiate(cfg.attack[method].dummy).draw([t.dummy_seed for t in trials], shared.input_shape,
                                                            shared.batch_size, shared.num_classes)
    buffers = victim_buffers(cfg, dataset, trials, shared.weights)
    b = comparison.batch_size
    overrides = [*BREACHING_CASE, f"case.model={BREACHING_MODELS[comparison.model]}", f"case.user.num_data_points={b}",
                 *breaching_labels(cfg.attack[method]), *breaching_batchnorm(cfg), *comparison.breaching]
    exact = float64_share(cfg, dataset, trials, private)
    path.mkdir()
    (path / "overrides.json").write_text(json.dumps(overrides))
    (path / "settings.json").write_text(json.dumps({"local_labels": args.breaching_local_labels}))
    rows = []
    for k, trial in enumerate(trials):
        images, labels = private.images[k].clone(), private.labels[k].clone()
        weights = [w[k].clone() for w in shared.weights.values()]
        torch.save({"index": trial.index, "images": images, "labels": labels, "weights": weights,
                    "buffers": buffers[k], "dummy": dummies[k].clone(), "dummy_seed": trial.dummy_seed,
                    "gradient": [g[k].clone() for g in shared.gradients.values()],
                    "gradient64": [g[k].clone() for g in exact.values()]},
                   path / f"trial_{trial.index:05d}.pt")
        ours_error = relative_difference([g[k] for g in exact.values()], [g[k] for g in shared.gradients.values()])
        # as the app's records hold them: one value at B = 1, a list for a batch
        rows.append({"index": trial.index, "image_index": trial.images[0] if b == 1 else list(trial.images),
                     "label": int(labels[0]) if b == 1 else labels.tolist(), "images": images,
                     "seen": {"image": checksum([images]), "label": checksum([labels]), "weights": checksum(weights)},
                     "float32_error": ours_error})
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


def float64_share(cfg, dataset, trials, private) -> dict[str, torch.Tensor]:
    """Our client's shared gradient (or FedAvg update) once more in float64 (victims, images, local SGD):
    the reference both sides' float32 results are measured against, and what breaching's user, replayed in
    float64 by its worker, must match. Why not compare the two float32 results alone: a BatchNorm
    network's gradient can be ill-conditioned in float32 (small batch variances), and T local SGD steps
    amplify rounding (float32 and float64 runs of one plain torch.optim.SGD loop differ by ~1e-3 relative
    at T = 5: ResNet-20, untrained, B = 4, lr 1e-3), so two float32 implementations that sum in other
    orders can differ by more than 1e-4 while computing the same thing; in float64 they agree to ~1e-12."""
    from hydra.utils import instantiate

    from lightning_idlg.case.client import PrivateBatch
    from lightning_idlg.label_restoration import build_victims

    model, weights, buffers = build_victims(cfg, dataset, [t.index for t in trials])

    def double(tensors):
        return {n: t.double() if t.is_floating_point() else t for n, t in tensors.items()}

    record, _ = instantiate(cfg.client).share(model.double(), double(weights), double(buffers),
                                              PrivateBatch(private.images.double(), private.labels, private.indices),
                                              dataset.num_classes)
    return record.gradients


def breaching_labels(node) -> list[str]:
    """breaching's label setting for our attack's `label_strategy`: the rule computed the same way."""
    target = str(node.label_strategy._target_).rsplit(".", 1)[-1] if node.get("label_strategy") else None
    rule = node.label_strategy.get("rule") if target else None
    theirs = {"Yin": "yin", "BiasCorrected": "bias-corrected"}  # the batch strategies (BATCH_LABELS)
    if target == "AnalyticLabel" and rule == "weight_sum":  # the same rule: argmin of the head's row sums
        return ["case.user.provide_labels=False", "attack.label_strategy=iDLG"]
    if target == "AnalyticLabel" and rule == "bias":  # the one negative entry of the head's bias gradient
        return ["case.user.provide_labels=False", "attack.label_strategy=analytic"]
    if target in theirs:
        return ["case.user.provide_labels=False", f"attack.label_strategy={theirs[target]}"]
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
            "trials": [{**{k: r[k] for k in ("index", "image_index", "label", "predicted_label", "label_correct",
                                             "mse", "psnr", "ssim", "distance", "steps", "evaluations")},
                        "images": r.get("images") or [{k: r[k] for k in IMAGE_KEYS}]} for r in rows]}


# --------------------------------------------------------------------------------------------- breaching

def breaching_side(args, comparison: Comparison, out: Path, case_dir: Path, case: dict) -> dict:
    """breaching's workers, one process per core, trial i in process i mod cores; metrics by ours."""
    from lightning_idlg.records import metrics

    python = str(Path(args.breaching_venv) / "bin" / "python")
    shards = [out / f"{comparison.name}_breaching.{i}.pt" for i in range(args.cores)]
    commands = [[python, str(WORKER), str(case_dir), "--shard", str(i), "--shards", str(args.cores), "--out", str(f)]
                for i, f in enumerate(shards)]
    run = timed_group(commands, [out / f"{comparison.name}_breaching.{i}.log" for i in range(args.cores)],
                      env=ONE_THREAD)
    parts = [torch.load(f, weights_only=True) for f in shards]
    truth = {t["index"]: t for t in case["trials"]}
    rows = [breaching_record(r, truth[r["index"]], metrics)
            for r in sorted((r for p in parts for r in p["trials"]), key=lambda r: r["index"])]
    return {**run, "processes": args.cores, "threads": [p["threads"] for p in parts],
            "config": json.loads(parts[0]["config"]), "trials": rows}


def breaching_record(r: dict, t: dict, metrics) -> dict:
    """One breaching trial scored as the app scores its own: each reconstruction matched to a private image
    (metrics.match, Hungarian on MSE; B = 1: the one pair), per-image MSE, PSNR, SSIM and the label that
    came with the matched reconstruction (breaching's labels are sorted, reconstruction i carries label i),
    the client's values the means over its images."""
    x, x0 = r["reconstruction"], t["images"]
    order = metrics.match(x[None], x0[None])[0]
    matched = x[order]
    truth = t["label"] if isinstance(t["label"], list) else [t["label"]]
    guesses = [r["labels"][int(i)] if int(i) < len(r["labels"]) else -1 for i in order]
    values = {"mse": metrics.mse(matched, x0), "psnr": metrics.psnr(matched, x0), "ssim": metrics.ssim(matched, x0)}
    indices = t["image_index"] if isinstance(t["image_index"], list) else [t["image_index"]]
    images = [{"image_index": i, "label": y, "predicted_label": p, **{k: float(v[j]) for k, v in values.items()}}
              for j, (i, y, p) in enumerate(zip(indices, truth, guesses))]
    return {"index": r["index"], "image_index": t["image_index"], "label": t["label"],
            "predicted_label": guesses[0] if len(guesses) == 1 else guesses,
            "restored_labels": sorted(r["labels"]), "label_correct": all(y == p for y, p in zip(truth, guesses)),
            **{k: float(v.mean()) for k, v in values.items()}, "images": images,
            "best_objective": r["best_objective"], "iterations": r["iterations"], "evaluations": r["evaluations"],
            "seconds": r["seconds"], "cpu_seconds": r["cpu_seconds"], "check_cpu_seconds": r["check_cpu_seconds"],
            "gradient_error": r["gradient_error"], "float64_error": r["float64_error"],
            "float32_error": r["float32_error"], "local_update": r["local_update"], "seen": r["seen"]}


# --------------------------------------------------------------------------------------------- report

def summary(side: dict) -> dict:
    """A side's figures. An attack is a client (B images); `psnr`, `ssim` and `success` are over the images
    after matching (at B = 1 the same as over clients), `psnr_client` the median over clients of a client's
    mean PSNR (the app's record value); label accuracy per image after matching, `label_exact` the clients
    whose restored multiset is exactly theirs. CPU: the side's getrusage less the CPU of checks that are not
    its work (the float64 replay of breaching's local-update user)."""
    rows = side["trials"]
    images = [i for r in rows for i in r["images"]]
    n = len(rows)
    cpu = side["cpu"] - sum(r.get("check_cpu_seconds", 0.0) for r in rows)
    return {"trials": n, "images": len(images), "per_minute": n / side["wall"] * 60, "per_cpu_minute": n / cpu * 60,
            "cpu_attacks": cpu, "success": sum(i["mse"] < SUCCESS_MSE for i in images) / len(images),
            "label_accuracy": sum(i["label"] == i["predicted_label"] for i in images) / len(images),
            "label_exact": sum(restored(r) == sorted(truth(r)) for r in rows) / n,
            "psnr": statistics.median(i["psnr"] for i in images), "ssim": statistics.median(i["ssim"] for i in images),
            "psnr_client": statistics.median(r["psnr"] for r in rows),
            "evaluations": statistics.median(r["evaluations"] for r in rows)}


def truth(row: dict) -> list[int]:
    return row["label"] if isinstance(row["label"], list) else [row["label"]]


def restored(row: dict) -> list[int]:
    """The client's restored labels as a sorted multiset (breaching's as its strategy returned them)."""
    if "restored_labels" in row:
        return sorted(row["restored_labels"])
    return sorted(row["predicted_label"] if isinstance(row["predicted_label"], list) else [row["predicted_label"]])


def print_side(name: str, side: dict, s: dict, detail: str) -> None:
    print(f"  {name}: {s['per_minute']:.2f} attacks/min, {s['per_cpu_minute']:.2f} attacks/CPU-min "
          f"({s['trials']} clients, {s['images']} images in {side['wall']:.1f} s wall, {s['cpu_attacks']:.1f} s CPU, "
          f"{side['processes']} process(es) x 1 thread), success (MSE < 1e-3) {s['success']:.3f}, label accuracy "
          f"{s['label_accuracy']:.3f} (exact multiset {s['label_exact']:.3f}), median PSNR {s['psnr']:.2f} per image, "
          f"{s['psnr_client']:.2f} per client, median SSIM {s['ssim']:.3f}, median evaluations {s['evaluations']:.0f}, "
          f"peak memory {side['rss_mb']:.0f} MB RSS (largest process) / {side['pss_mb']:.0f} MB PSS (all); {detail}")


def check_same_trials(case: dict, ours: dict, theirs: dict) -> tuple[list[str], dict]:
    """What both sides saw, as checksums; the problems found (empty: the same trials) and the checks'
    figures (relative differences of the shared gradients, clients with the same restored labels)."""
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
    checks = {"float64": max(r["float64_error"] for r in theirs["trials"]),
              "float32": max(r["gradient_error"] for r in theirs["trials"]),
              "ours_float32": max(t["float32_error"] for t in case["trials"]),
              "breaching_float32": max(r["float32_error"] for r in theirs["trials"])}
    what = "update (as -update / (lr T))" if any(r["local_update"] for r in theirs["trials"]) else "gradient"
    print(f"  shared {what}: breaching's user against our client, relative L2 difference {checks['float64']:.1e} at "
          f"most with both in float64 (the check), {checks['float32']:.1e} as shared in float32; float32 against "
          f"float64: ours {checks['ours_float32']:.1e}, breaching's {checks['breaching_float32']:.1e} at most")
    worst = checks["float64"]
    if worst > 1e-4:
        problems.append(f"breaching's shared gradient differs from ours by up to {worst:.1e} (relative)")
    differ = [o["index"] for o, b in zip(ours["trials"], theirs["trials"]) if restored(o) != restored(b)]
    print(f"  restored labels: the same multiset on both sides for {len(ours['trials']) - len(differ)} of "
          f"{len(ours['trials'])} clients")
    if differ:
        problems.append(f"the label strategies restored other labels on the two sides for trials {differ}")
    checks["same_labels"] = len(ours["trials"]) - len(differ)
    return problems, checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default="/work/shared/data/cifar100",
                        help="CIFAR-100 (the app's dataset=cifar100 dataset.root)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(),
                        help="processes per side, one thread each (ours: trainer=ddp ranks; breaching: shards)")
    parser.add_argument("--attacks", type=lambda s: s.split(","), default=["dlg", "ig"],
                        help="comma-separated: " + ", ".join(ATTACKS))
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
    parser.add_argument("--batch-model", default="resnet20", help="our model= for ig_batch and fedavg")
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in s.split(",")], default=[4, 8],
                        help="client batches B for ig_batch")
    parser.add_argument("--batch-labels", choices=sorted(BATCH_LABELS), default="yin",
                        help="label strategy at B > 1, the same on both sides (ours Yin / BiasCorrected)")
    parser.add_argument("--fedavg-batch", type=int, default=4, help="B of the FedAvg client")
    parser.add_argument("--local-steps", type=lambda s: [int(t) for t in s.split(",")], default=[1, 5, 10],
                        help="local SGD steps T of the FedAvg client (each over all B samples: epochs = T)")
    parser.add_argument("--local-lr", type=float, default=1e-3, help="the FedAvg client's local SGD learning rate")
    parser.add_argument("--fedavg-steps", type=int, default=None,
                        help="IG iterations against the FedAvg clients (default: --ig-steps)")
    parser.add_argument("--breaching-local-labels", choices=["restored", "disclosed"], default="restored",
                        help="breaching's FedAvg objective: labels by its own strategy (as ours) or the true "
                             "labels its user discloses with the local hyperparameters (its threat model)")
    parser.add_argument("--write-doc", metavar="PATH", help="write the tables of this run as a page, e.g. "
                        "docs/studies/generated/batches.md")
    parser.add_argument("--doc-from", metavar="RUN_DIR", help="with --write-doc: write the page from an earlier "
                        "run's results.json and run.json instead of running")
    parser.add_argument("--per-trial", action="store_true", help="also print each trial's MSE, PSNR, evaluations")
    parser.add_argument("--keep-cases", action="store_true", help="keep the trial files handed to breaching")
    parser.add_argument("--breaching-venv", default="/work/breaching-venv", help="the venv with breaching 0.1.2")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"), help="logs, cases and runs")
    args = parser.parse_args()
    if args.doc_from and not args.write_doc:
        parser.error("--doc-from needs --write-doc PATH")
    if args.fedavg_steps is None:
        args.fedavg_steps = args.ig_steps
    unknown = set(args.attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"--attacks {','.join(sorted(unknown))}: valid: {', '.join(ATTACKS)}")
    for c in args.checkpoint:
        if "=" not in c or c.split("=", 1)[0] not in args.ig_models:
            parser.error(f"--checkpoint {c}: give MODEL=PATH with MODEL one of --ig-models")

    if args.doc_from:  # only the page, from an earlier run's files
        folder = Path(args.doc_from)
        write_doc(Path(args.write_doc), json.loads((folder / "results.json").read_text()),
                  json.loads((folder / "run.json").read_text()))
        return
    out = Path(args.out) / time.strftime("peer-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    run = {"command": "python benchmarks/" + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "started": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "load_start": os.getloadavg()[0],
           "cores": args.cores, "trials": args.trials, "seed": args.seed, "out": str(out),
           "batch_labels": args.batch_labels, "breaching_local_labels": args.breaching_local_labels}
    print(f"peer line: breaching 0.1.2 ({args.breaching_venv}) and lightning_idlg on the same {args.trials} "
          f"CIFAR-100 trials (seed {args.seed}, {args.data_root}); {args.cores} process(es) x 1 thread per side; "
          f"IG budget {args.ig_steps} iterations (FedAvg: {args.fedavg_steps}); {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start; outputs {out}", flush=True)
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
        found, checks = check_same_trials(case, ours, theirs)
        problems += [f"{comparison.name}: {p}" for p in found]
        s_ours, s_theirs = summary(ours), summary(theirs)
        print_side("lightning_idlg", ours, s_ours, "trainer=ddp ranks, trials per group auto")
        print_side("breaching", theirs, s_theirs, f"one process per core, attacks alone "
                   f"{sum(r['cpu_seconds'] for r in theirs['trials']):.1f} s CPU")
        if args.per_trial:
            for o, b in zip(ours["trials"], theirs["trials"]):
                print(f"    trial {o['index']:3d} image {o['image_index']} label {o['label']}: MSE ours "
                      f"{o['mse']:.3e} breaching {b['mse']:.3e}; PSNR {o['psnr']:.1f} / {b['psnr']:.1f}; evaluations "
                      f"{o['evaluations']} / {b['evaluations']}; objective {o['distance']:.3g} / "
                      f"{b['best_objective']:.3g}")
        ratios[comparison.name] = s_ours["per_cpu_minute"] / s_theirs["per_cpu_minute"]
        print(f"  ratio ours/theirs: {ratios[comparison.name]:.2f} per CPU-minute, "
              f"{s_ours['per_minute'] / s_theirs['per_minute']:.2f} per minute", flush=True)
        results[comparison.name] = {"title": comparison.title, "batch_size": comparison.batch_size,
                                    "local_steps": comparison.local_steps, "breaching_overrides": case["overrides"],
                                    "problems": found, "checks": checks,
                                    "ours": {**s_ours, **{k: v for k, v in ours.items() if k != "trials"}},
                                    "breaching": {**s_theirs, **{k: v for k, v in theirs.items() if k != "trials"}},
                                    "ours_trials": ours["trials"], "breaching_trials": theirs["trials"]}
    run["load_end"] = os.getloadavg()[0]
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "run.json").write_text(json.dumps(run, indent=1))
    print(f"load average {run['load_end']:.2f} at the end (other processes compete for the same cores)")
    if args.write_doc:
        write_doc(Path(args.write_doc), results, run)
        print(f"wrote {args.write_doc}")
    for p in problems:
        print(f"NOT THE SAME TRIALS: {p}")
    for name, ratio in ratios.items():
        print(f"ratio_per_cpu_minute {name}: {ratio:.2f}")
    if problems:
        sys.exit(1)


# --------------------------------------------------------------------------------------------- the page

DOC_INTRO = """# Client batches and FedAvg against breaching 0.1.2

Inverting Gradients on clients of more than one sample, run by `lightning_idlg` and by the peer framework
breaching 0.1.2 on **the same clients**: the same CIFAR-100 test-subset images (`../shared/data/cifar100`),
the same victim weights (by default an untrained ResNet-20 with its own init; the comparisons' titles
below say which), copied into breaching's model of the same name by parameter order, the same dummy
start, the same iteration budget, both sides on the same cores (one thread per process: ours as
`trainer=ddp` ranks, breaching as one process per core with the clients shared out). Written by
`benchmarks/peer_breaching.py --write-doc` from the run below; the script's docstring has the details.

- **IG at client batch B** (`ig_<model>_b<B>`): ours `method=ig model=resnet20 client.batch_size=B`,
  breaching `attack=invertinggradients case.user.num_data_points=B`; both read the B labels off the head's
  gradient with the same rule (`--batch-labels`: Yin et al. 2021, the B most negative row minima of the
  head's weight gradient, ours `lightning_idlg.attacks.labels.Yin`, breaching `label_strategy=yin`; or the
  bias-corrected count on both), and the script checks that both restored the same multiset per client.
- **FedAvg** (`fedavg_<model>_b<B>_t<T>`): a client of B samples runs T local SGD steps, each over all B
  samples (ours `client=fedavg client.epochs=T client.local_batch_size=B client.lr=...`; breaching's
  `local_update` user with `num_local_updates=T`, `num_data_per_local_update_step=B`, the same
  `local_learning_rate`), and shares the weight update; the server is told the local settings and both
  attackers simulate the T steps with the dummies through the cosine objective (ours the `LocalUpdates`
  objective, breaching its multi-step objective). breaching's multi-step objective would use the true
  labels of every step, which its user discloses with the local hyperparameters; unless the run says
  `--breaching-local-labels disclosed`, they are replaced by breaching's own label strategy applied to the
  update (sign turned), the same rule as ours on the pseudo-gradient.
- **Same work, checked**: checksums of what both sides saw (images, labels, weights); breaching's shared
  gradient (FedAvg: its update, as -update / (lr T)) against ours with both computed in float64, relative
  L2 difference below 1e-4 (in float32 the same computation can differ by more: BatchNorm at small batch
  variances, rounding amplified over T local steps; those differences are in the checks table); the same
  restored labels on both sides.
- **Metrics** (ours on both sides, `lightning_idlg.records.metrics`): each reconstruction is matched to a private
  image (Hungarian assignment on MSE), then PSNR and SSIM per image (clamped to [0, 1]); *per image* is
  the median over all images, *per client* the median over clients of a client's mean PSNR; label
  accuracy is per image after matching (the label that came with the matched reconstruction), *exact*
  the clients whose restored multiset is right; attacks per CPU-minute count clients over the CPU time of
  every process of a side (interpreter start and imports included).
"""


LOCAL_LABELS = {"restored": "the labels its own strategy restored from the update (as ours)",
                "disclosed": "the true labels its user disclosed (its threat model; ours restored them)"}


def write_doc(path: Path, results: dict, run: dict) -> None:
    """The page: the fixed description above, the command and machine, and the tables of `results`."""
    lines = [DOC_INTRO, "**Command** (from the repository root; started " + run["started"] + ", "
             f"{run['cpus']} CPUs, load average {run['load_start']:.2f} at the start and {run['load_end']:.2f} at "
             "the end):", "```bash", run["command"], "```", "",
             *([f"Labels at B > 1: `{run['batch_labels']}` on both sides; breaching's FedAvg objective used "
                f"{LOCAL_LABELS[run['breaching_local_labels']]}.", ""] if "batch_labels" in run else []),
             f"## Results ({run['trials']} clients per row, seed {run['seed']}, {run['cores']} process(es) per "
             "side)", "",
             "| comparison | B | local steps | side | attacks / CPU-min | attacks / min | median PSNR per image "
             "| median PSNR per client | median SSIM | label accuracy (exact) | success (MSE < 1e-3) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for side, label in (("ours", "lightning_idlg"), ("breaching", "breaching")):
            s = r[side]
            first = side == "ours"
            lines.append(f"| {name if first else ''} | {r.get('batch_size', 1) if first else ''} | "
                         f"{(r.get('local_steps') or '-') if first else ''} | {label} | {s['per_cpu_minute']:.2f} | "
                         f"{s['per_minute']:.2f} | {s['psnr']:.2f} | {s['psnr_client']:.2f} | {s['ssim']:.3f} | "
                         f"{s['label_accuracy']:.3f} ({s['label_exact']:.2f}) | {s['success']:.3f} |")
    lines += ["", "Ratios ours / breaching per CPU-minute: " + ", ".join(
        f"{name} {r['ours']['per_cpu_minute'] / r['breaching']['per_cpu_minute']:.2f}" for name, r in results.items())
        + ".", "", "## Checks", "",
        "Relative L2 differences of the shared gradient (FedAvg: the update as -update / (lr T)), all tensors as one "
        "vector, largest over the clients: breaching's against ours with both computed in float64 (the check: "
        "below 1e-4), as shared in float32, and each side's float32 against our float64.", "",
        "| comparison | both in float64 | as shared (float32) | ours float32 vs float64 | breaching's float32 vs "
        "float64 | same restored labels | problems |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        c = r["checks"]
        lines.append(f"| {name} | {c['float64']:.1e} | {c['float32']:.1e} | {c['ours_float32']:.1e} | "
                     f"{c['breaching_float32']:.1e} | {c['same_labels']} of {len(r['ours_trials'])} | "
                     f"{'; '.join(r['problems']) or 'none'} |")
    lines += ["", "Comparisons: " + "; ".join(f"`{name}`: {r['title']}" for name, r in results.items()) + "."]
    lines += ["", "Every client of both sides (per-image values, restored labels, objectives, costs) is in "
              f"`results.json` of the run's folder ({run['out']}).", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
