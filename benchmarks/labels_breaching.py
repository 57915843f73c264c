"""Label restoration side by side with breaching 0.1.2, on the same clients' shared gradients (not a test).

Our side (this interpreter): the clients of configs/label_restoration.yaml (with the overrides given) share
their gradients through lightning_idlg's Client, and our strategies restore the labels. Each cell's head
gradients (weight and bias, (K, C, F) and (K, C)) and the victims' weights go to files in --work; then
breaching's own `_recover_label_information` (breaching/attacks/base_attack.py) runs on exactly those
gradients in breaching's venv, as a subprocess (this file again, with --breaching-side), strategy by
strategy: `yin`, `wainakh-simple`, `wainakh-whitebox`, `bias-corrected`, and `iDLG` at B = 1. Both sides'
labels are scored here by lightning_idlg.records.label_metrics; the table pairs each of our strategies with
breaching's for the same method.

    PYTHONPATH=. python benchmarks/labels_breaching.py dataset=mnist dataset.root=../shared/data/mnist \
        --clients 200 --whitebox-clients 20 --markdown docs/labels_mnist.md
    PYTHONPATH=. python benchmarks/labels_breaching.py model=resnet20 model/init=checkpoint \
        model.init.path=resnet20_cifar100.pt dataset=cifar100 dataset.root=../shared/data/cifar100 \
        --group 10 --csv resnet_trained.csv          # also our rows, as lightning-idlg-labels writes them

Our side is the experiment's own loop (label_restoration.restore_cells), so its rows (--csv) are the ones
lightning-idlg-labels writes for the same overrides.

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

def our_side(overrides: list[str], clients: int, group: int, work: Path, whitebox_clients: int) -> tuple[list[dict], dict]:
    """The experiment's own cells (label_restoration.restore_cells: same victims, draws and gradients as
    lightning-idlg-labels with these overrides), `group` clients at a time. Writes cell_<i>.pt (the head
    gradients of all clients) and victims.pt (the victim's factory and the first `whitebox_clients`
    clients' weights and buffers, for breaching's white-box strategy) into `work`; returns (cells: labels,
    B, our scores and labels per strategy, private labels), info (with our rows in COLUMNS form)."""
    import torch
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from lightning_idlg import label_restoration as lr
    from lightning_idlg.report.labels import victim_title
    from lightning_idlg.records.label_metrics import score
    from lightning_idlg.case.model import output_layer

    with initialize_config_module("lightning_idlg.configs", version_base="1.3"):
        cfg = compose("label_restoration", overrides=[*overrides, f"clients={clients}", f"clients_per_group={group}"])
    torch.set_num_threads(1)
    lr.validate(cfg)
    parts = lr.strategies(cfg)
    dataset = lr.load_dataset(cfg)
    gathered: dict[tuple, dict] = {}
    seconds = 0.0
    for cell in lr.restore_cells(cfg, dataset, parts):
        shared = cell["shared"]
        head, _ = output_layer(shared.model)
        if not (work / "victims.pt").exists():
            n = min(whitebox_clients, len(cell["clients"]))
            torch.save({"factory": OmegaConf.to_container(cfg.model.factory, resolve=True), "shape": dataset.shape,
                        "num_classes": dataset.num_classes,
                        "weights": {k: w[:n].clone() for k, w in shared.weights.items()},
                        "buffers": {k: b[:n].clone() for k, b in (shared.buffers or {}).items()}}, work / "victims.pt")
        into = gathered.setdefault((cell["labels"], cell["batch_size"]), {"weight": [], "bias": [], "private": [], "ours": {}})
        into["weight"].append(shared.gradients[f"{head}.weight"].clone())
        into["bias"].append(shared.gradients[f"{head}.bias"].clone())
        into["private"].append(cell["private"])
        for name, restored in cell["restored"].items():
            into["ours"].setdefault(name, []).append(restored)
        seconds += sum(cell["seconds"].values())
    cells, rows = [], []
    describe = lr.describe_run(cfg, dataset, " ".join(overrides))
    for i, ((mode, b), got) in enumerate(gathered.items()):
        private = torch.cat(got["private"])
        ours = {}
        for name, pieces in got["ours"].items():
            restored = torch.cat(pieces)
            scores = {k: float(v.double().mean()) for k, v in score(restored, private, dataset.num_classes).items()}
            rows.append({**describe, "labels": mode, "batch_size": b, "strategy": name,
                         "distinct_assumed": parts[name].distinct, "clients": len(private), **scores})
            ours[name] = {**scores, "labels": restored.tolist()}
        torch.save({"batch_size": b, "weight": torch.cat(got["weight"]), "bias": torch.cat(got["bias"])}, work / f"cell_{i}.pt")
        cells.append({"labels": mode, "batch_size": b, "ours": ours, "private": private.tolist()})
    return cells, {"dataset": dataset.name, "num_classes": dataset.num_classes, "ours_restore_s": seconds,
                   "victim": victim_title(describe), "rows": rows}


def breaching_scores(cells: list[dict], results: list[dict], num_classes: int) -> None:
    """Score breaching's labels (lists of any length per client) against the private ones, into cells."""
    import torch

    from lightning_idlg.records.label_metrics import score

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
    lines = [f"**{info['dataset']}, {info['victim']}**: instance accuracy, ours / breaching "
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

    victims = torch.load(work / "victims.pt", weights_only=False)
    c, h, _ = victims["shape"]

    def victim(j: int | None = None) -> torch.nn.Module:
        """Our victim's architecture (lightning_idlg.case.architectures / victim: torch only), client j's weights."""
        from hydra.utils import instantiate

        model = instantiate(victims["factory"])(in_channels=c, image_size=h, num_classes=victims["num_classes"])
        if j is not None:  # buffers only where the client shared them (train-mode BatchNorm does not read them)
            missing = model.load_state_dict({k: v[j] for k, v in (victims["weights"] | victims["buffers"]).items()},
                                            strict=False).missing_keys
            if set(missing) - dict(model.named_buffers()).keys():
                raise SystemExit(f"victims.pt does not fit {type(model).__name__}: missing {missing[:3]}")
        return model

    cfg = breaching.get_config(overrides=["attack=seethroughgradients"])
    attacker = breaching.attacks.prepare_attack(victim(), torch.nn.CrossEntropyLoss(), cfg.attack)
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
                    models = [victim(j)] if name == "wainakh-whitebox" else []
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
    parser.add_argument("--group", type=int, default=100,
                        help="clients whose gradients are computed at once (memory: ResNet-20 at B = 64 needs ~1 GB a client)")
    parser.add_argument("--whitebox-clients", type=int, default=20)
    parser.add_argument("--work", default="/tmp/labels_breaching")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--csv", help="also write our rows (lightning-idlg-labels' labels.csv columns) to this file")
    parser.add_argument("--breaching-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.breaching_side:
        return breaching_side(work, args.whitebox_clients)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # restore_cells' progress
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("cell_*.pt"), work / "victims.pt"]:
        old.unlink(missing_ok=True)
    start = time.perf_counter()
    cells, info = our_side(args.overrides, args.clients, args.group, work, args.whitebox_clients)
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
    if args.csv:
        from lightning_idlg.label_restoration import write_csv

        write_csv(info["rows"], Path(args.csv))
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
