"""Label restoration side by side with breaching 0.1.2, on the same clients' shared gradients (not a test).

Our side (this interpreter): the clients of configs/label_restoration.yaml (with the overrides given) share
their gradients through lightning_idlg's Client, and our strategies restore the labels. Each cell's head
gradients (weight and bias, (K, C, F) and (K, C)) and the victims' weights go to files in --work; then
breaching's own `_recover_label_information` (breaching/attacks/base_attack.py) runs on exactly those
gradients in breaching's venv, as a subprocess (this file again, with --breaching-side), strategy by
strategy: `yin`, `wainakh-simple`, `wainakh-whitebox`, `bias-corrected`, and `iDLG` at B = 1. Both sides'
labels are scored here by lightning_idlg.label_metrics; the table pairs each of our strategies with
breaching's for the same method.

    PYTHONPATH=. python benchmarks/labels_breaching.py dataset=mnist dataset.root=../shared/data/mnist \
        --clients 200 --whitebox-clients 20 --markdown docs/labels_mnist.md

breaching's `wainakh-whitebox` runs 2 C dummy backward passes per client (200 for CIFAR-100): it is run on
the first --whitebox-clients clients of a cell only (their scores are over those clients).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BREACHING_PYTHON = "/work/breaching-venv/bin/python"
# breaching's name -> ours (configs/label_restoration.yaml strategies); the same method on both sides
PAIRS = {"iDLG": "iDLG", "yin": "Yin", "wainakh-simple": "LLG", "wainakh-whitebox": "LLGPlus",
         "bias-corrected": "bias-corrected"}


# ------------------------------------------------------------------------------------------- our side

def our_side(overrides: list[str], clients: int, work: Path) -> tuple[list[dict], dict]:
    """Writes victims.pt and cell_<i>.pt into `work`; returns (cells: labels, B, our scores per strategy,
    private labels), info."""
    import torch
    from hydra import compose, initialize_config_module

    from lightning_idlg import label_restoration as lr
    from lightning_idlg.label_metrics import score
    from lightning_idlg.victim import output_layer

    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("label_restoration", overrides=[*overrides, f"clients={clients}", f"clients_per_group={clients}"])
    torch.set_num_threads(1)
    lr.validate(cfg)
    parts = lr.strategies(cfg)
    dataset = lr.load_dataset(cfg)
    images, labels = lr.dataset_tensors(dataset)
    chunk = list(range(clients))
    model, weights, buffers = lr.build_victims(cfg, dataset, chunk)
    head, _ = output_layer(model)
    torch.save({"weights": weights, "shape": dataset.shape, "num_classes": dataset.num_classes,
                "activation": cfg.model.factory.get("activation", "sigmoid"), "width": cfg.model.factory.get("width", 12),
                "head": head}, work / "victims.pt")
    cells, seconds = [], 0.0
    for (mode, b), picks in lr.draw_cells(cfg, labels).items():
        shared = lr.share(cfg, b, model, weights, buffers, images[picks], labels[picks], dataset.num_classes,
                          lr.compose_defense(cfg), chunk)
        private = labels[picks]
        ours = {}
        for name, strategy in parts.items():
            if lr.applies(strategy, b, dataset.num_classes):
                start = time.perf_counter()
                restored = strategy.restore(shared)
                seconds += time.perf_counter() - start
                ours[name] = {k: float(v.double().mean()) for k, v in score(restored, private, dataset.num_classes).items()}
                ours[name]["labels"] = restored.tolist()
        i = len(cells)
        torch.save({"batch_size": b, "weight": shared.gradients[f"{head}.weight"].clone(),
                    "bias": shared.gradients[f"{head}.bias"].clone()}, work / f"cell_{i}.pt")
        cells.append({"labels": mode, "batch_size": b, "ours": ours, "private": private.tolist()})
    return cells, {"dataset": dataset.name, "num_classes": dataset.num_classes, "ours_restore_s": seconds,
                   "activation": str(cfg.model.factory.get("activation", ""))}


def breaching_scores(cells: list[dict], results: list[dict], num_classes: int) -> None:
    """Score breaching's labels (lists of any length per client) against the private ones, into cells."""
    import torch

    from lightning_idlg.label_metrics import score

    for cell, result in zip(cells, results):
        cell["breaching"] = {}
        for name, per_client in result.items():
            if isinstance(per_client, str):
                cell["breaching"][name] = {"error": per_client}
                continue
            totals = {}
            for restored, private in zip(per_client, cell["private"]):
                s = score(torch.tensor([restored]), torch.tensor([private]), num_classes)
                for k, v in s.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
            cell["breaching"][name] = {k: v / len(per_client) for k, v in totals.items()} | {"clients": len(per_client)}
            ours = cell["ours"].get(PAIRS[name])
            if ours is not None:  # the same multiset on both sides (both sorted)
                same = [sorted(t) == o for t, o in zip(per_client, ours["labels"])]
                cell["breaching"][name]["agreement"] = sum(same) / len(same)


def _fmt(scores: dict | None) -> str:
    if scores is None:
        return "-"
    if "error" in scores:
        return "fails"
    return f"{scores['instance_accuracy']:.3f} ({scores['exact']:.2f})"


def table(cells: list[dict], info: dict, clients: int) -> str:
    lines = [f"**{info['dataset']}, LeNet ({info['activation']})**: instance accuracy, ours / breaching "
             f"(exact-multiset accuracy in brackets); {clients} clients per cell unless marked\n"]
    modes = list(dict.fromkeys(c["labels"] for c in cells))
    for mode in modes:
        sizes = [c["batch_size"] for c in cells if c["labels"] == mode]
        lines += [f"{mode} labels\n", "| method (ours / breaching) | " + " | ".join(f"B={b}" for b in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for theirs, ours in PAIRS.items():
            row = []
            for c in (c for c in cells if c["labels"] == mode):
                o, t = c["ours"].get(ours), c["breaching"].get(theirs)
                if o is None and t is None:
                    row.append("-")
                    continue
                mark = f" [{t['clients']}]" if t is not None and t.get("clients", clients) != clients else ""
                row.append(f"{_fmt(o)} / {_fmt(t)}{mark}")
            lines.append(f"| {ours} / {theirs} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["share of clients whose restored multiset is the same on both sides (same method)\n",
              "| labels | method | " + " | ".join(f"B={b}" for b in sorted({c['batch_size'] for c in cells})) + " |",
              "|---|---|" + "---|" * len({c["batch_size"] for c in cells})]
    for mode in modes:
        for theirs, ours in PAIRS.items():
            by_b = {c["batch_size"]: c["breaching"].get(theirs, {}).get("agreement") for c in cells if c["labels"] == mode}
            if any(v is not None for v in by_b.values()):
                lines.append(f"| {mode} | {ours} / {theirs} | " + " | ".join(
                    "-" if by_b.get(b) is None else f"{by_b[b]:.3f}" for b in sorted({c['batch_size'] for c in cells})) + " |")
    lines.append("")
    errors = {n: s["error"] for c in cells for n, s in c["breaching"].items() if "error" in s}
    lines += [f"breaching `{n}` fails: `{e}`" for n, e in errors.items()]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- breaching side

def breaching_side(work: Path, whitebox_clients: int) -> None:
    """In breaching's venv: run `_recover_label_information` per client, per strategy, on every cell file;
    writes breaching.json (per cell: strategy -> labels per client)."""
    import logging

    import breaching
    import torch

    logging.disable(logging.INFO)  # it logs the labels of every call
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from lightning_idlg.victim import LeNet  # torch only: the same architecture as our side

    victims = torch.load(work / "victims.pt", weights_only=False)
    c, h, _ = victims["shape"]
    model = LeNet(c, h, victims["num_classes"], activation=victims["activation"], width=victims["width"])
    cfg = breaching.get_config(overrides=["attack=seethroughgradients"])
    attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg.attack)
    attacker.data_shape = victims["shape"]
    results = []
    for i in range(len(list(work.glob("cell_*.pt")))):
        cell = torch.load(work / f"cell_{i}.pt", weights_only=True)
        b, k = cell["batch_size"], cell["weight"].shape[0]
        out = {}
        for name in PAIRS:
            if name == "iDLG" and b != 1:
                continue
            n = min(k, whitebox_clients) if name == "wainakh-whitebox" else k
            attacker.cfg.label_strategy = name
            labels = []
            try:
                for j in range(n):
                    user = [{"gradients": [cell["weight"][j], cell["bias"][j]], "metadata": {"num_data_points": b}}]
                    models = []
                    if name == "wainakh-whitebox":
                        victim = LeNet(c, h, victims["num_classes"], activation=victims["activation"], width=victims["width"])
                        victim.load_state_dict({p: w[j] for p, w in victims["weights"].items()})
                        models = [victim]
                    torch.manual_seed(j)
                    labels.append(attacker._recover_label_information(user, None, models).tolist())
                out[name] = labels
            except Exception as err:  # breaching's own failure: reported in the table, not fatal here
                out[name] = f"{type(err).__name__}: {err}".splitlines()[0]
        results.append(out)
        print(f"breaching: cell {i} (B={b}) done", flush=True)
    (work / "breaching.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="configs/label_restoration.yaml overrides (dataset=..., labels=...)")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--whitebox-clients", type=int, default=20)
    parser.add_argument("--work", default="/tmp/labels_breaching")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--breaching-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.breaching_side:
        return breaching_side(work, args.whitebox_clients)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("cell_*.pt"):
        old.unlink()
    start = time.perf_counter()
    cells, info = our_side(args.overrides, args.clients, work)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    subprocess.run([BREACHING_PYTHON, __file__, "--breaching-side", "--work", str(work),
                    "--whitebox-clients", str(args.whitebox_clients)], check=True, env=env)
    theirs_s = time.perf_counter() - start
    breaching_scores(cells, json.loads((work / "breaching.json").read_text()), info["num_classes"])
    text = table(cells, info, args.clients)
    text += (f"\nwall time: our side {ours_s:.0f} s (gradients, restoration, files; restoration alone "
             f"{info['ours_restore_s']:.1f} s), breaching side {theirs_s:.0f} s\n")
    print(text)
    (work / "cells.json").write_text(json.dumps(cells))  # with both sides' labels per client
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
