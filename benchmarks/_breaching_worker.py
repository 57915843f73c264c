"""One shard of the peer line (benchmarks/peer_breaching.py): breaching 0.1.2 attacks given trials.

Runs in breaching's own venv (never imports lightning_idlg; only torch and breaching):

    BREACHING_VENV/bin/python benchmarks/_breaching_worker.py CASE_DIR --shard 0 --shards 2 --out OUT.pt

CASE_DIR (written by peer_breaching.py) holds overrides.json (breaching's Hydra overrides: case, model,
user, attack), settings.json (how to treat a local-update user's labels, see below) and one
trial_<index>.pt per trial (torch.save) with the exact tensors our side attacks: `images` (B, C, H, W) in
[0, 1], `labels` (B,), `weights` and `buffers` (our victim's, in parameter / buffer order), `dummy`
(B, C, H, W): our dummy start, and `gradient` and `gradient64` (our client's shared gradient, or a FedAvg
client's pseudo-gradient u = (w_0 - w_E) / (lr T), as shared and computed again in float64; only to
compare with breaching's). This shard attacks trials shard, shard + shards, ... (in index order) one after
another, as breaching runs (one process, one trial at a time, loading each trial's file when it gets to
it), and writes per trial: the reconstruction, the labels breaching's objective used, its objective per
iteration, objective evaluations, wall and CPU seconds of the attack, checksums of what breaching's model
and user saw, and relative differences ||g - g_ours|| / ||g_ours|| (all tensors as one vector) of
breaching's shared gradient: as shared against ours as shared, as shared against our float64, and
breaching's user replayed on float64 copies of model and data against our float64 (the check; its CPU
seconds are written apart, as not breaching's work).

The case is built from its parts, offline (breaching.cases.construct_case would build a torchvision loader
with download=True): get_config -> construct_model -> construct_server (honest-but-curious) -> the user
(UserSingleStep, or UserMultiStep for `case.user.user_type=local_update`) with our images as its data ->
prepare_attack -> reconstruct(initial_data=our dummy start).

A local-update user (FedAvg) shares w_E - w_0 = -lr T u, compared with ours as -update / (lr T). Labels:
breaching's multi-step objective does not use the labels its label strategy restores but the true labels
of every local step, which its user discloses with the local hyperparameters (`provide_local_hyperparams`).
settings.json `local_labels`: `restored` (the default) replaces them with breaching's own label strategy
applied to the update with its sign turned (-update is a positive multiple of u, the gradient-like
quantity the strategies read, as ours reads u), one full-batch list per step (every local step must take
all B samples); `disclosed` keeps breaching's threat model (the true labels).
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


def local_update_user(cfg, model, loss_fn, setup):
    """breaching's FedAvg user; it loads its data itself (`_load_data`), so `give` hands it ours."""
    from breaching.cases.users import UserMultiStep

    user = UserMultiStep(model, loss_fn, None, setup, idx=0, cfg_user=cfg.case.user)
    user.data_key = "inputs"
    return user


def give(user, data: dict):
    user._load_data = lambda setup=None: data
    return user


def float64_share(cfg, server, loss_fn, data: dict, local_update: bool) -> list[torch.Tensor]:
    """What the user shares, computed by the same user code on float64 copies of model and data (no
    cancellation, no float32 rounding amplified by BatchNorm or local steps)."""
    import copy

    from breaching.cases.users import UserSingleStep

    double = dict(device=torch.device("cpu"), dtype=torch.double)
    model = copy.deepcopy(server.model).double()
    data = {"inputs": data["inputs"].double(), "labels": data["labels"]}
    payload = {"parameters": [p.detach() for p in model.parameters()],
               "buffers": [b.detach() for b in model.buffers()] if cfg.case.server.provide_public_buffers else None}
    if local_update:
        shared, _ = give(local_update_user(cfg, model, loss_fn, double), data).compute_local_updates(payload)
    else:
        user = UserSingleStep(model, loss_fn, None, double, idx=0, cfg_user=cfg.case.user)
        user.data_key = "inputs"
        shared, _ = user.compute_local_updates(payload, custom_data=data)
    return shared["gradients"]


def relative_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor], scale: float = 1.0) -> float:
    """||scale * theirs - ours|| / ||ours|| over all tensors as one vector (float64)."""
    difference = sum(float((scale * t.double() - o.double()).pow(2).sum()) for t, o in zip(theirs, ours))
    return (difference / sum(float(o.double().pow(2).sum()) for o in ours)) ** 0.5


def restored_local_labels(attacker, shared: dict, payload: dict, scale: float) -> torch.Tensor:
    """breaching's own label strategy (attack.label_strategy) on the update with its sign turned, scaled to
    the pseudo-gradient u = -update / (lr T) (the scale does not move an argsort; the sign does)."""
    turned = {**shared, "gradients": [scale * g for g in shared["gradients"]]}
    return attacker._recover_label_information([turned], [payload], None)


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
    settings = json.loads((case / "settings.json").read_text()) if (case / "settings.json").exists() else {}
    local_update = cfg.case.user.user_type == "local_update"
    if local_update and cfg.case.user.num_data_per_local_update_step != cfg.case.user.num_data_points \
            and settings.get("local_labels", "restored") == "restored":
        raise SystemExit("restored labels for a local-update user need full-batch local steps "
                         "(num_data_per_local_update_step = num_data_points): a restored label belongs to no sample")
    if local_update:
        lr_steps = cfg.case.user.local_learning_rate * cfg.case.user.num_local_updates
        user = local_update_user(cfg, model, loss_fn, setup)
    else:
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
        data = {"inputs": trial["images"].clone(), "labels": trial["labels"].clone()}
        seen = {"image": checksum([data["inputs"]]), "label": checksum([data["labels"]]),
                "weights": checksum(payload["parameters"])}
        wall, cpu, evaluations = time.perf_counter(), time.process_time(), 0
        used_labels = None
        if local_update:
            shared, _ = give(user, data).compute_local_updates(payload)
            gradient_error = relative_difference(trial["gradient"], shared["gradients"], -1 / lr_steps)
            hyper = shared["metadata"]["local_hyperparams"]
            if hyper is None:
                raise SystemExit("the local-update user must disclose its local hyperparameters "
                                 "(case.user.provide_local_hyperparams=True): breaching then simulates its steps")
            if settings.get("local_labels", "restored") == "restored":
                labels = restored_local_labels(attacker, shared, payload, -1 / lr_steps)
                hyper["labels"] = [labels.clone() for _ in hyper["labels"]]
            used_labels = sorted(int(y) for y in hyper["labels"][0])
        else:
            shared, _ = user.compute_local_updates(payload, custom_data=data)
            # over the whole gradient: a conv bias before BatchNorm has a zero gradient, rounding noise on each side
            gradient_error = relative_difference(trial["gradient"], shared["gradients"])
        torch.manual_seed(int(trial["dummy_seed"]))  # only used where initial_data is ignored
        output, stats = attacker.reconstruct([payload], [shared], server.secrets, initial_data=trial["dummy"])
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        check_cpu = time.process_time()  # outside the timed attack: a check, not breaching's work
        scale = -1 / lr_steps if local_update else 1.0
        float64_error = relative_difference(trial["gradient64"],
                                            float64_share(cfg, server, loss_fn, data, local_update), scale)
        float32_error = relative_difference(trial["gradient64"], shared["gradients"], scale)
        check_cpu = time.process_time() - check_cpu
        values = stats["Trial_0_Val"]
        labels = used_labels if used_labels is not None else [int(y) for y in output["labels"].flatten()]
        results.append({"index": int(trial["index"]), "reconstruction": output["data"].detach().clone(),
                        "labels": labels, "objective": values, "local_update": local_update,
                        "float64_error": float64_error, "float32_error": float32_error,
                        "best_objective": min(values) if values else float("nan"), "iterations": len(values),
                        "evaluations": evaluations, "seconds": wall, "cpu_seconds": cpu, "check_cpu_seconds": check_cpu,
                        "gradient_error": gradient_error, "seen": seen})
        print(f"breaching shard {args.shard}: trial {trial['index']} in {wall:.1f} s ({cpu:.1f} s CPU), "
              f"{len(values)} iterations, {evaluations} evaluations, best objective "
              f"{results[-1]['best_objective']:.3g}", flush=True)
    torch.save({"shard": args.shard, "threads": torch.get_num_threads(), "setup_seconds": setup_seconds,
                "config": json.dumps(OmegaConf.to_container(cfg, resolve=True)),
                "trials": results}, args.out)


if __name__ == "__main__":
    main()
