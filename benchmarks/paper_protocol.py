"""Benchmark (not a test): the iDLG paper protocol, the reference loop against this engine, same trials.

    python benchmarks/paper_protocol.py                  # 50 trials
    python benchmarks/paper_protocol.py --trials 8       # a quick check
    python benchmarks/paper_protocol.py --data ../shared/data/cifar100 --ranks 2 --threads 1 --batch auto
    python benchmarks/paper_protocol.py --preset paper_cifar100_improved --override tolerance=1e-5 \
        --reuse-reference outputs/benchmarks/<time>    # another engine configuration, same reference

Protocol (docs/paper.md): LeNet 3x32x32 (sigmoid, every weight and bias ~ U(-0.5, 0.5), fresh per trial),
100 classes, one image per trial, cross-entropy gradient, iDLG (label from the last layer's weight
gradient, the reference script's rule), L-BFGS lr 1 (PyTorch defaults), 300 steps, stop once D < 1e-6.
Images: the CIFAR-100 test subset under --data if it is there, else scikit-image's 100 faces (`faces`,
resized to 3x32x32), so that the benchmark runs anywhere. Both sides attack the same N trials: image,
victim weights (same seed, same draws) and dummy start (same seed) are equal.

(a) reference: the loop as the reference script runs it, written here independently of the engine: one
    process, one trial at a time, PyTorch's default threads, torch.optim.LBFGS on the dummy, a closure that
    takes autograd.grad(create_graph=True) of the nn.Module's loss and backpropagates D, then
    `optimizer.step(closure)` and `current_loss = closure().item()` every step, stop when < 1e-6.
(b) engine: `lightning-idlg experiment=paper_cifar100 method=idlg` (the app, as a user runs it), with
    `--ranks` processes (trainer=ddp) of `--threads` threads each, `--batch` trials per batch.

Each side runs in a subprocess of its own, timed end to end (interpreter start, imports, data, all
attacks, results), while this process samples the memory of its process tree (RSS of the largest process,
and PSS summed over the tree: shared library pages counted once). Success: final MSE < 1e-3 (raw pixels).
The last line printed is `speedup: X.XX` (engine attacks per minute / reference attacks per minute).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUCCESS_MSE = 1e-3
STEPS, TOLERANCE, LR = 300, 1e-6, 1.0


# --------------------------------------------------------------------------------------------- (a) reference

def reference(plan_file: str, out_file: str, threads: int) -> None:
    """The reference loop, one trial after another (runs in its own process)."""
    import torch
    from torch import nn

    if threads:  # 0: PyTorch's default, as the reference script runs
        torch.set_num_threads(threads)

    plan = json.loads(Path(plan_file).read_text())
    dataset = load_dataset(plan["data"])

    class LeNet(nn.Module):
        def __init__(self, channels: int = 3, num_classes: int = 100):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(channels, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
                nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), nn.Sigmoid(),
                nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), nn.Sigmoid(),
            )
            self.fc = nn.Sequential(nn.Linear(768, num_classes))

        def forward(self, x):
            return self.fc(self.body(x).flatten(1))

    criterion = nn.CrossEntropyLoss()
    results = []
    for trial in plan["trials"]:
        started = time.perf_counter()
        image, label = dataset[trial["image_index"]]
        gt_data, gt_label = image.unsqueeze(0), torch.tensor([int(label)])
        torch.manual_seed(trial["victim_seed"])
        net = LeNet(num_classes=dataset.num_classes)
        with torch.no_grad():
            for p in net.parameters():
                p.uniform_(-0.5, 0.5)

        # the client's gradient
        loss = criterion(net(gt_data), gt_label)
        original_dy_dx = [g.detach().clone() for g in torch.autograd.grad(loss, net.parameters())]

        # iDLG: the label from the last layer's weight gradient, then the dummy data alone
        label_pred = torch.argmin(torch.sum(original_dy_dx[-2], dim=-1), dim=-1).detach().reshape((1,))
        generator = torch.Generator().manual_seed(trial["dummy_seed"])
        dummy_data = torch.randn(gt_data.size(), generator=generator).requires_grad_(True)
        optimizer = torch.optim.LBFGS([dummy_data], lr=LR)
        evaluations = 0
        losses, mses, history = [], [], []

        def closure():
            nonlocal evaluations
            evaluations += 1
            optimizer.zero_grad()
            pred = net(dummy_data)
            dummy_loss = criterion(pred, label_pred)
            dummy_dy_dx = torch.autograd.grad(dummy_loss, net.parameters(), create_graph=True)
            grad_diff = 0
            for gx, gy in zip(dummy_dy_dx, original_dy_dx):
                grad_diff += ((gx - gy) ** 2).sum()
            grad_diff.backward()
            return grad_diff

        steps = 0
        for iters in range(STEPS):
            optimizer.step(closure)
            current_loss = closure().item()
            steps = iters + 1
            losses.append(current_loss)
            mses.append(torch.mean((dummy_data - gt_data) ** 2).item())
            if iters % 10 == 0:
                history.append(dummy_data.detach().clone())
            if current_loss < TOLERANCE:
                break
        mse = torch.mean((dummy_data.detach() - gt_data) ** 2).item()
        results.append({"index": trial["index"], "mse": mse, "label_correct": int(label_pred) == int(label),
                        "distance": losses[-1], "steps": steps, "evaluations": evaluations,
                        "seconds": time.perf_counter() - started})
        print(f"reference trial {trial['index']}: {results[-1]['seconds']:.1f} s, {steps} steps, "
              f"mse {mse:.2e}", file=sys.stderr, flush=True)
    Path(out_file).write_text(json.dumps({"threads": torch.get_num_threads(), "trials": results}))


# --------------------------------------------------------------------------------------------- (b) engine

def engine_command(args, plan: dict, run_dir: Path) -> list[str]:
    data = plan["data"]
    dataset = ([f"dataset.root={data['root']}"] if data["name"] == "cifar100" else
               ["dataset=faces", "dataset.image_size=32", "dataset.num_classes=100"])
    ranks = ([f"trainer=ddp", f"trainer.devices={args.ranks}"] if args.ranks > 1 else [])
    threads = [f"threads={args.threads}"] if args.threads else []
    return [sys.executable, "-m", "lightning_idlg", f"experiment={args.preset}", "method=idlg", *dataset,
            f"trials={args.trials}", f"seed={args.seed}", f"trials_per_group={args.batch}", *ranks, *threads,
            "pictures=false", "progress_trials=0", "progress_bar=false", f"hydra.run.dir={run_dir}", *args.override]


# --------------------------------------------------------------------------------------------- shared

def load_dataset(data: dict):
    from lightning_idlg.data import cifar100, faces  # loaders only: torchvision + PIL, no engine code

    return cifar100(data["root"]) if data["name"] == "cifar100" else faces(image_size=32, num_classes=100)


def make_plan(args) -> dict:
    """The N trials: image index, victim seed, dummy seed (the engine's own plan for this seed)."""
    from omegaconf import OmegaConf

    from lightning_idlg.experiment import plan_trials

    root = Path(args.data).resolve()
    data = {"name": "cifar100", "root": str(root)} if (root / "test").is_dir() else {"name": "faces", "root": None}
    size = len(load_dataset(data))
    # one image per trial (client.batch_size 1), as the reference runs
    cfg = OmegaConf.create({"trials": args.trials, "seed": args.seed, "client": {"batch_size": 1}})
    trials = plan_trials(cfg, size)
    return {"data": data, "trials": [{"index": t.index, "image_index": t.images[0],
                                      "victim_seed": t.victim_seed, "dummy_seed": t.dummy_seed} for t in trials]}


def tree(pid: int) -> list[int]:
    pids, i = [pid], 0
    while i < len(pids):
        try:
            children = Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()
        except OSError:
            children = []
        pids += [int(c) for c in children]
        i += 1
    return pids


def memory_kb(pid: int, field: str) -> int:
    path = f"/proc/{pid}/smaps_rollup" if field == "Pss" else f"/proc/{pid}/status"
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(command: list[str], log_file: Path) -> dict:
    """Run `command`, sampling the memory of its process tree every 0.2 s; wall time end to end."""
    return timed_group([command], [log_file])


def timed_group(commands: list[list[str]], log_files: list[Path], env: dict | None = None) -> dict:
    """Run `commands` at once and wait for all, sampling the memory of their process trees every 0.2 s.
    Returns wall time end to end, peak memory (RSS of the largest process, PSS summed over all) and
    `cpu`: user + system CPU seconds of the commands and every descendant they waited for (getrusage of
    this process's children, so run one group at a time)."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore", **(env or {})}
    peak = {"rss_mb": 0.0, "pss_mb": 0.0}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    logs = [open(f, "w") for f in log_files]
    try:
        procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                 for c, log in zip(commands, logs)]

        def sample():
            while any(p.poll() is None for p in procs):
                pids = [pid for p in procs for pid in tree(p.pid)]
                peak["rss_mb"] = max(peak["rss_mb"], max(memory_kb(p, "VmRSS") for p in pids) / 1024)
                peak["pss_mb"] = max(peak["pss_mb"], sum(memory_kb(p, "Pss") for p in pids) / 1024)
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for p in procs:
            p.wait()
        sampler.join()
    finally:
        for log in logs:
            log.close()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, command, log_file in zip(procs, commands, log_files):
        if p.returncode != 0:
            sys.exit(f"failed ({p.returncode}): {' '.join(command)}\n{Path(log_file).read_text()[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, **peak}


def report(name: str, run: dict, rows: list[dict], detail: str) -> float:
    n = len(rows)
    per_minute = n / run["wall"] * 60
    success = sum(r["mse"] < SUCCESS_MSE for r in rows) / n
    labels = sum(bool(r["label_correct"]) for r in rows) / n
    evaluations = statistics.median(r["evaluations"] for r in rows)
    print(f"{name}: {per_minute:.2f} attacks/min ({n} in {run['wall']:.1f} s end to end), "
          f"success (MSE < 1e-3) {success:.3f}, label accuracy {labels:.3f}, "
          f"peak memory {run['rss_mb']:.0f} MB RSS (largest process) / {run['pss_mb']:.0f} MB PSS (all), "
          f"median evaluations per trial {evaluations:.0f}; {detail}")
    return per_minute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar100"),
                        help="CIFAR-100 folder (test/<class>/*.png); absent: the built-in faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=2, help="engine processes (trainer=ddp when > 1)")
    parser.add_argument("--threads", type=int, default=1, help="threads per engine process (0: default)")
    parser.add_argument("--batch", default="auto", help="engine trials per batch (K), or auto")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"), help="logs and run dirs")
    parser.add_argument("--reference-threads", type=int, default=0,
                        help="threads of the reference process (0: PyTorch's default, as the reference runs)")
    parser.add_argument("--skip-reference", action="store_true", help="engine only (no speedup line)")
    parser.add_argument("--reuse-reference", metavar="DIR",
                        help="take the reference's results from an earlier benchmark dir (same trials, seed, data)")
    parser.add_argument("--preset", default="paper_cifar100",
                        help="the engine's experiment: paper_cifar100 (the protocol) or paper_cifar100_improved")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a further Hydra override for the engine (repeatable), e.g. patience=20")
    parser.add_argument("--part", choices=["reference"], help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part == "reference":
        return reference(args.plan, args.result, args.reference_threads)

    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args)
    (out / "plan.json").write_text(json.dumps(plan))
    data = "CIFAR-100 test subset (841 images) at " + plan["data"]["root"] if plan["data"]["name"] == "cifar100" \
        else "scikit-image faces (100, 3x32x32)"
    print(f"paper protocol: iDLG, LeNet 3x32x32 sigmoid U(-0.5, 0.5), 100 classes, L-BFGS lr 1, {STEPS} steps, "
          f"tolerance {TOLERANCE:g}; {args.trials} trials, seed {args.seed}; data: {data}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)

    speed = {}
    if args.reuse_reference:  # the reference is the slow half: measure it once per plan
        earlier = Path(args.reuse_reference)
        if json.loads((earlier / "plan.json").read_text()) != plan:
            raise SystemExit(f"--reuse-reference {earlier}: its plan (trials, seed, data) differs from this one")
        run = json.loads((earlier / "reference_run.json").read_text())
        ref = json.loads((earlier / "reference.json").read_text())
        print(f"reference: reused from {earlier}")
    elif not args.skip_reference:
        result = out / "reference.json"
        run = timed([sys.executable, str(Path(__file__).resolve()), "--part", "reference", "--plan",
                     str(out / "plan.json"), "--result", str(result), "--reference-threads",
                     str(args.reference_threads)], out / "reference.log")
        (out / "reference_run.json").write_text(json.dumps(run))
        ref = json.loads(result.read_text())
    if args.reuse_reference or not args.skip_reference:
        attack_s = sum(r["seconds"] for r in ref["trials"])
        speed["reference"] = report("reference", run, ref["trials"],
                                    f"one process, {ref['threads']} threads, attacks alone {attack_s:.1f} s")

    run_dir = out / "engine"
    command = engine_command(args, plan, run_dir)
    run = timed(command, out / "engine.log")
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    batches = sorted({r.get("group_size", r.get("batch_size")) for r in rows}, reverse=True)
    speed["engine"] = report("engine", run, rows, f"{args.ranks} process(es) x {args.threads or 'default'} "
                             f"thread(s), trials per batch {args.batch} (batches of {batches})")
    print("engine command: " + " ".join(command[1:]))
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other processes compete for the same cores)")
    if "reference" in speed:
        print(f"speedup: {speed['engine'] / speed['reference']:.2f}")


if __name__ == "__main__":
    main()
