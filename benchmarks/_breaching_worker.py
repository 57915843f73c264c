"""One shard of the peer line (benchmarks/peer_breaching.py): breaching 0.1.2 attacks given trials.

Runs in breaching's own venv (never imports lightning_idlg; only torch and breaching):

    BREACHING_VENV/bin/python benchmarks/_breaching_worker.py CASE_DIR --shard 0 --shards 2 --out OUT.pt

CASE_DIR (written by peer_breaching.py) holds overrides.json (breaching's Hydra overrides: case, model,
attack) and one trial_<index>.pt per trial (torch.save) with the exact tensors our side attacks: `image`
(C, H, W) in [0, 1], `label`, `weights` and `buffers` (our victim's, in parameter / buffer order),
`dummy` (1, C, H, W): our dummy start, and `gradient` (our client's shared gradient, only to compare with
breaching's). This shard attacks trials shard, shard + shards, ... (in index order) one after another, as
breaching runs (one process, one trial at a time, loading each trial's file when it gets to it), and
writes per trial: the reconstruction, the labels breaching used, its objective per iteration, objective
evaluations, wall and CPU seconds of the attack, checksums of what breaching's model and user saw, and the
relative difference ||g - g_ours|| / ||g_ours|| of breaching's shared gradient (all tensors as one vector).

The case is built from its parts, offline (breaching.cases.construct_case would build a torchvision loader
with download=True): get_config -> construct_model -> construct_server (honest-but-curious) ->
UserSingleStep with custom data -> prepare_attack -> reconstruct(initial_data=our dummy start).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import torch


def checksum(tensors) -> str:
    """12 hex digits of SHA-256 over the float32 bytes of `tensors` in order (also used by peer_breaching.py)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(torch.as_tensor(t).detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def load_victim(model: torch.nn.Module, weights: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
    """Copy our victim into breaching's model by order; the shapes must agree one for one."""
    params, bufs = list(model.parameters()), list(model.buffers())
    if len(params) != len(weights) or any(p.shape != w.shape for p, w in zip(params, weights)):
        raise SystemExit(f"breaching's model does not fit our victim: parameters "
                         f"{[tuple(p.shape) for p in params]} vs {[tuple(w.shape) for w in weights]}")
    if len(bufs) != len(buffers) or any(b.shape != c.shape for b, c in zip(bufs, buffers)):
        raise SystemExit(f"breaching's model does not fit our victim: buffers "
                         f"{[tuple(b.shape) for b in bufs]} vs {[tuple(c.shape) for c in buffers]}")
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
        for b, c in zip(bufs, buffers):
            b.copy_(c)


def main() -> None:
    parser = argparse.ArgumentParser(description="breaching 0.1.2 on given trials (one shard)")
    parser.add_argument("case")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    started = time.perf_counter()
    import breaching  # noqa: E402 (after the thread setting)
    from breaching.cases.users import UserSingleStep
    from omegaconf import OmegaConf

    case = Path(args.case)
    cfg = breaching.get_config(overrides=json.loads((case / "overrides.json").read_text()))
    setup = dict(device=torch.device("cpu"), dtype=torch.float)
    model, loss_fn = breaching.cases.construct_model(cfg.case.model, cfg.case.data,
                                                     pretrained=cfg.case.server.pretrained)
    server = breaching.cases.construct_server(model, loss_fn, cfg.case, setup)
    model = server.vet_model(model)
    user = UserSingleStep(model, loss_fn, None, setup, idx=0, cfg_user=cfg.case.user)
    user.data_key = "inputs"  # normally set when the user loads its own data
    attacker = breaching.attacks.prepare_attack(model, loss_fn, cfg.attack, setup)

    evaluations = 0
    make_closure = attacker._compute_objective

    def counted(*a, **k):  # counts objective evaluations (L-BFGS calls the closure up to 25 times a step)
        closure = make_closure(*a, **k)

        def wrapped():
            nonlocal evaluations
            evaluations += 1
            return closure()

        return wrapped

    attacker._compute_objective = counted
    setup_seconds = time.perf_counter() - started

    results = []
    for trial_file in sorted(case.glob("trial_*.pt"))[args.shard::args.shards]:
        trial = torch.load(trial_file, weights_only=True)
        load_victim(server.model, trial["weights"], trial["buffers"])
        payload = server.distribute_payload()
        data = {"inputs": trial["image"][None].clone(), "labels": torch.tensor([int(trial["label"])])}
        seen = {"image": checksum([data["inputs"]]), "label": checksum([data["labels"]]),
                "weights": checksum(payload["parameters"])}
        wall, cpu, evaluations = time.perf_counter(), time.process_time(), 0
        shared, _ = user.compute_local_updates(payload, custom_data=data)
        # over the whole gradient: a conv bias before BatchNorm has a zero gradient, rounding noise on each side
        difference = sum(float((g - o).pow(2).sum()) for g, o in zip(shared["gradients"], trial["gradient"]))
        gradient_error = (difference / sum(float(o.pow(2).sum()) for o in trial["gradient"])) ** 0.5
        torch.manual_seed(int(trial["dummy_seed"]))  # only used where initial_data is ignored
        output, stats = attacker.reconstruct([payload], [shared], server.secrets, initial_data=trial["dummy"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        values = stats["Trial_0_Val"]
        results.append({"index": int(trial["index"]), "reconstruction": output["data"].detach().clone(),
                        "labels": [int(y) for y in output["labels"].flatten()], "objective": values,
                        "best_objective": min(values) if values else float("nan"), "iterations": len(values),
                        "evaluations": evaluations, "seconds": wall, "cpu_seconds": cpu,
                        "gradient_error": gradient_error, "seen": seen})
        print(f"breaching shard {args.shard}: trial {trial['index']} in {wall:.1f} s ({cpu:.1f} s CPU), "
              f"{len(values)} iterations, {evaluations} evaluations, best objective "
              f"{results[-1]['best_objective']:.3g}", flush=True)
    torch.save({"shard": args.shard, "threads": torch.get_num_threads(), "setup_seconds": setup_seconds,
                "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
                "trials": results}, args.out)


if __name__ == "__main__":
    main()
