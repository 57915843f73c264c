"""Benchmark (not a test): the iDLG paper protocol, the reference loop against this engine, same trials.

    python benchmarks/paper_protocol.py                  # 50 trials, every core given to each side
    python benchmarks/paper_protocol.py --trials 4 --steps 5                      # a check of the script
    python benchmarks/paper_protocol.py --cores 2 --batch 8 --override continuous_batching=true
    python benchmarks/paper_protocol.py --default-threads-trials 10   # + the default-threads secondary line
    python benchmarks/paper_protocol.py --preset paper_cifar100_improved --override tolerance=1e-5 \
        --reuse-reference outputs/benchmarks/<time>    # another engine configuration, same reference

Protocol (docs/paper.md): LeNet 3x32x32 (sigmoid, every weight and bias ~ U(-0.5, 0.5), fresh per trial),
100 classes, one image per trial, cross-entropy gradient, iDLG (label from the last layer's weight
gradient, the reference script's rule), L-BFGS lr 1 (PyTorch defaults), 300 steps, stop once D < 1e-6.
Images: the CIFAR-100 test subset under --data if it is there, else scikit-image's 100 faces (`faces`,
resized to 3x32x32), so that the benchmark runs anywhere. Both sides attack the same N trials: image,
victim weights (same seed, same draws) and dummy start (same seed) are equal.

(a) reference: the loop as the reference script runs it, written here independently of the engine: one trial
    at a time, torch.optim.LBFGS on the dummy, a closure that takes autograd.grad(create_graph=True) of the
    nn.Module's loss and backpropagates D, then `optimizer.step(closure)` and `current_loss =
    closure().item()` every step, stop when < 1e-6. Run at its best (the baseline of `speedup`): one process
    per core (`--cores`), one thread each, the trials shared out (trial i to process i mod cores). Secondary
    line (`--default-threads-trials N`, 0: skipped): one process at PyTorch's default threads, as the reference
    script runs, on the first N trials, labelled as such (on a 2-core machine its OpenMP threads spin beside
    any other work and slow it down; it is not the baseline).
(b) engine: `lightning-idlg experiment=paper_cifar100 method=idlg` (the app, as a user runs it), with
    `--ranks` processes (trainer=ddp; default: --cores) of `--threads` threads each, `--batch` trials per
    group, `--override continuous_batching=true` etc. for other engine settings.

Each side runs in subprocesses of its own, timed end to end (interpreter start, imports, data, all attacks,
results), while this process samples the memory of the process trees (RSS of the largest process, and PSS
summed: shared library pages counted once) and takes the CPU time of every descendant (getrusage). Success:
final MSE < 1e-3 (raw pixels). Per side: attacks per minute, attacks per core-minute (wall x the cores the
side was given: idle cores count, as they do for a user who reserved them) and attacks per CPU-minute (CPU
time actually used). The last line printed is `speedup: X.XX`, the engine's attacks per core-minute over
the reference's at its best, both given the same cores in one run; the CPU-minute ratio is printed above it.
The peer line (breaching 0.1.2 on the same trials) is benchmarks/peer_breaching.py --attacks dlg.
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

def reference(plan_file: str, out_file: str, threads: int, share: int = 0, shares: int = 1,
              device: str = "cpu") -> None:
    """The reference loop, one trial after another (runs in its own process), over trials share, share +
    shares, ... of the plan (one process per core: each its share)."""
    import torch
    from torch import nn

    if threads:  # 0: PyTorch's default, as the reference script runs
        torch.set_num_threads(threads)

    plan = json.loads(Path(plan_file).read_text())
    plan["trials"] = plan["trials"][share::shares]
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
        gt_data, gt_label = image.unsqueeze(0).to(device), torch.tensor([int(label)], device=device)
        torch.manual_seed(trial["victim_seed"])
        net = LeNet(num_classes=dataset.num_classes)
        with torch.no_grad():
            for p in net.parameters():
                p.uniform_(-0.5, 0.5)
        net = net.to(device)

        # the client's gradient
        loss = criterion(net(gt_data), gt_label)
        original_dy_dx = [g.detach().clone() for g in torch.autograd.grad(loss, net.parameters())]

        # iDLG: the label from the last layer's weight gradient, then the dummy data alone
        label_pred = torch.argmin(torch.sum(original_dy_dx[-2], dim=-1), dim=-1).detach().reshape((1,))
        generator = torch.Generator().manual_seed(trial["dummy_seed"])
        # drawn on the CPU (the engine's draw), then moved: the same start on any device
        dummy_data = torch.randn(gt_data.size(), generator=generator).to(device).requires_grad_(True)
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
        for iters in range(plan.get("steps", STEPS)):
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
    ranks = (["trainer=ddp", f"trainer.devices={args.ranks}"] if args.ranks > 1 else [])
    if args.device == "cuda":
        ranks = ["trainer=gpu"]
    threads = [f"threads={args.threads}"] if args.threads else []
    return [sys.executable, "-m", "lightning_idlg", f"experiment={args.preset}", "method=idlg", *dataset,
            f"trials={args.trials}", f"seed={args.seed}", f"steps={plan['steps']}", f"trials_per_group={args.batch}",
            *ranks, *threads,
            "pictures=false", "progress_trials=0", "progress_bar=false", f"hydra.run.dir={run_dir}", *args.override]


# --------------------------------------------------------------------------------------------- shared

def load_dataset(data: dict):
    from lightning_idlg.case.dataset import cifar100, faces  # loaders only: torchvision + PIL, no engine code

    return cifar100(data["root"]) if data["name"] == "cifar100" else faces(image_size=32, num_classes=100)


def make_plan(args) -> dict:
    """The N trials: image index, victim seed, dummy seed (the engine's own plan for this seed)."""
    from omegaconf import OmegaConf

    from lightning_idlg.case.plan import plan_trials

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


def report(name: str, run: dict, rows: list[dict], cores: int, detail: str) -> dict:
    """One side's line; returns its attacks per minute, per core-minute and per CPU-minute."""
    n = len(rows)
    speed = {"minute": n / run["wall"] * 60, "core_minute": n / (run["wall"] * cores) * 60,
             "cpu_minute": n / run["cpu"] * 60}
    success = sum(r["mse"] < SUCCESS_MSE for r in rows) / n
    labels = sum(bool(r["label_correct"]) for r in rows) / n
    evaluations = statistics.median(r["evaluations"] for r in rows)
    successes = sum(r["mse"] < SUCCESS_MSE for r in rows)
    per_success = f"{sum(r['evaluations'] for r in rows) / successes:.0f}" if successes else "n/a (no success)"
    print(f"{name}: {speed['minute']:.2f} attacks/min ({n} in {run['wall']:.1f} s end to end on {cores} core(s)), "
          f"{speed['core_minute']:.2f} per core-minute, {speed['cpu_minute']:.2f} per CPU-minute "
          f"({run['cpu']:.1f} CPU s), success (MSE < 1e-3) {success:.3f}, label accuracy {labels:.3f}, "
          f"median evaluations per trial {evaluations:.0f}, evaluations per success {per_success}, "
          f"peak memory {run['rss_mb']:.0f} MB RSS (largest process) / {run['pss_mb']:.0f} MB PSS (all); {detail}",
          flush=True)
    return speed


def run_reference(out: Path, plan: dict, processes: int, threads: int, name: str,
                  device: str = "cpu") -> tuple[dict, list[dict]]:
    """The reference loop in `processes` processes of `threads` threads (0: PyTorch's default), trials shared
    out; returns the timing and the per-trial results in plan order."""
    (out / f"{name}_plan.json").write_text(json.dumps(plan))
    results = [out / f"{name}_{i}.json" for i in range(processes)]
    commands = [[sys.executable, str(Path(__file__).resolve()), "--part", "reference", "--plan",
                 str(out / f"{name}_plan.json"), "--result", str(results[i]), "--reference-threads", str(threads),
                 "--share", str(i), "--shares", str(processes), "--device", device] for i in range(processes)]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    run = timed_group(commands, [out / f"{name}_{i}.log" for i in range(processes)], env)
    rows = sorted((r for f in results for r in json.loads(f.read_text())["trials"]), key=lambda r: r["index"])
    threads_used = {json.loads(f.read_text())["threads"] for f in results}
    (out / f"{name}_run.json").write_text(json.dumps({"run": run, "trials": rows, "threads": sorted(threads_used)}))
    return run, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar100"),
                        help="CIFAR-100 folder (test/<class>/*.png); absent: the built-in faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS, help="L-BFGS steps on both sides (the protocol: 300; "
                        "fewer only for a quick check of the script)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="cores given to each side: reference processes, and engine processes by default")
    parser.add_argument("--ranks", type=int, default=None, help="engine processes (trainer=ddp when > 1); default --cores")
    parser.add_argument("--threads", type=int, default=1, help="threads per engine process (0: default)")
    parser.add_argument("--batch", default="auto", help="engine trials per group (K), or auto")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmarks"), help="logs and run dirs")
    parser.add_argument("--default-threads-trials", type=int, default=0, metavar="N",
                        help="secondary line: the reference in one process at PyTorch's default threads on the "
                             "first N trials (0: skipped)")
    parser.add_argument("--skip-reference", action="store_true", help="engine only (no speedup line)")
    parser.add_argument("--reuse-reference", metavar="DIR",
                        help="take the reference's results from an earlier benchmark dir (same trials, seed, data, "
                             "cores); its figures were measured in that run, not beside this engine run")
    parser.add_argument("--preset", default="paper_cifar100",
                        help="the engine's experiment: paper_cifar100 (the protocol), paper_cifar100_improved "
                             "or paper_cifar100_reliable")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a further Hydra override for the engine (repeatable), e.g. continuous_batching=true")
    parser.add_argument("--part", choices=["reference"], help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--reference-threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--shares", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: both sides on one GPU (engine trainer=gpu, one process; benchmarks/gpu.sh)")
    parser.add_argument("--reference-trials", type=int, default=None, metavar="N",
                        help="the reference on the first N trials only (default: all; the GPU run: 50)")
    args = parser.parse_args()
    if args.part == "reference":
        return reference(args.plan, args.result, args.reference_threads, args.share, args.shares, args.device)
    if args.device == "cuda":  # one GPU: the engine in one process, the reference in one process beside it
        args.cores, args.ranks, args.threads = 1, 1, 0
    args.ranks = args.ranks or args.cores

    out = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    plan = {**make_plan(args), "steps": args.steps}
    (out / "plan.json").write_text(json.dumps(plan))
    data = "CIFAR-100 test subset (841 images) at " + plan["data"]["root"] if plan["data"]["name"] == "cifar100" \
        else "scikit-image faces (100, 3x32x32)"
    print(f"paper protocol: iDLG, LeNet 3x32x32 sigmoid U(-0.5, 0.5), 100 classes, L-BFGS lr 1, {args.steps} steps, "
          f"tolerance {TOLERANCE:g}; {args.trials} trials, seed {args.seed}; data: {data}; "
          f"{os.cpu_count()} CPUs, {args.cores} given to each side, load average {os.getloadavg()[0]:.2f} at start",
          flush=True)

    speed = {}
    if args.reuse_reference:  # the reference is the slow half: measure it once per plan
        earlier = Path(args.reuse_reference)
        if json.loads((earlier / "plan.json").read_text()) != plan:
            raise SystemExit(f"--reuse-reference {earlier}: its plan (trials, seed, data) differs from this one")
        saved = json.loads((earlier / "reference_run.json").read_text())
        if len(saved.get("processes", [])) != 1 or saved["processes"][0] != args.cores:
            raise SystemExit(f"--reuse-reference {earlier}: its reference ran on other cores than --cores {args.cores}")
        run, rows = saved["run"], saved["trials"]
        print(f"reference: reused from {earlier} (measured there, not beside this engine run)")
    elif not args.skip_reference:
        mine = {**plan, "trials": plan["trials"][:args.reference_trials]}
        run, rows = run_reference(out, mine, args.cores, 1, "reference", args.device)
        saved = json.loads((out / "reference_run.json").read_text())
        (out / "reference_run.json").write_text(json.dumps({**saved, "processes": [args.cores]}))
    if args.reuse_reference or not args.skip_reference:
        attack_s = sum(r["seconds"] for r in rows)
        best = "one process per core, one thread each" if args.device == "cpu" else "one process on the GPU"
        speed["reference"] = report(f"reference (its best: {best}; {len(rows)} trials)", run, rows,
                                    args.cores, f"{args.cores} process(es) x 1 thread, attacks alone {attack_s:.1f} s")
    if args.default_threads_trials:
        subset = {**plan, "trials": plan["trials"][:args.default_threads_trials]}
        run_d, rows_d = run_reference(out, subset, 1, 0, "reference_default_threads")
        report(f"reference at PyTorch's default threads (secondary line, first {len(rows_d)} trials, not the "
               f"baseline)", run_d, rows_d, args.cores, "one process, default threads")

    run_dir = out / "engine"
    command = engine_command(args, plan, run_dir)
    run = timed(command, out / "engine.log")
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    groups = sorted({r.get("group_size", r.get("batch_size")) for r in rows}, reverse=True)
    speed["engine"] = report("engine", run, rows, args.cores,
                             f"{args.ranks} process(es) x {args.threads or 'default'} thread(s), trials per group "
                             f"{args.batch} (group sizes {groups})")
    print("engine command: " + " ".join(command[1:]))
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other processes compete for the same cores)")
    if "reference" in speed:
        ratio = {k: speed["engine"][k] / speed["reference"][k] for k in speed["engine"]}
        print(f"ratio per CPU-minute: {ratio['cpu_minute']:.2f}; per minute: {ratio['minute']:.2f}")
        if args.device == "cuda":
            print(f"GPU: engine {speed['engine']['minute'] / 60:.2f} attacks/s, wall {run['wall']:.1f} s for "
                  f"{len(rows)} attacks; reference {speed['reference']['minute'] / 60:.3f} attacks/s")
        print(f"speedup: {ratio['core_minute']:.2f}")


if __name__ == "__main__":
    main()
