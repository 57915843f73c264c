"""Label restoration on its own: how well each label strategy reads a client's B labels off its shared
gradient, with no optimization at all (`lightning-idlg-labels`, configs/label_restoration.yaml).

For every cell (label draw x client batch size B): `clients` clients, each with a fresh victim (from the
trial's seed, as in the attack runs: client i attacks the network of trial i) and B private samples drawn
from the data set as `labels` says, share their gradient through the real `Client` (its reduction, mode and
defense); every strategy of `strategies` restores (K, B) labels from the `SharedGradient` alone; the scores
of `label_metrics` compare them with the private labels afterwards. Clients are vectorized in groups of
`clients_per_group` (one vmapped gradient per group).

Label draws (`labels`, one mode or a list):
- `distinct`: B different classes (uniform), one image of each: the setting of Yin et al.; needs B <= the
  classes present (larger B: no row for that cell);
- `repeated`: max(1, B // 2) different classes (at most the classes present), each at least once, the other
  labels drawn from those same classes: every client with B >= 2 holds a repeated label (LLG's setting);
- `random`: B images drawn uniformly from the data set, labels as they fall.
Within a class, a client's images are distinct while the class has enough of them, else drawn again.

Outputs in the run dir: `labels.csv` (one row per cell and strategy; every row names its data set, victim,
client, defense and the command-line overrides), `labels.md` (tables of accuracy against B) and
`labels.png` (instance accuracy and exact-multiset accuracy against B, per strategy). With `logger=wandb`
the same table (a wandb.Table) and picture go to a W&B run as well (tracking.log_label_results; offline
without an API key, as for the attack app).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_idlg.case.plan import derive_seed  # stream 0: client i here meets the app's trial i's victim
from lightning_idlg.errors import ConfigError, instantiate_part, positive_int
from lightning_idlg.report.labels import COLUMNS, LABEL_MODES, SCORE_NAMES, markdown, write_outputs

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ clients

def dataset_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, H, W), labels (N,)) of a whole TrialImages data set (the subsets here are small)."""
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in pairs]), torch.tensor([label for _, label in pairs])


def label_modes(value) -> list[str]:
    modes = [value] if isinstance(value, str) else list(value)
    bad = [m for m in modes if m not in LABEL_MODES]
    if not modes or bad:
        raise ConfigError(f"labels={value!r} is not known; valid: {', '.join(LABEL_MODES)} (or a list of them)")
    return modes


def draw_clients(labels: torch.Tensor, batch_size: int, mode: str, clients: int,
                 generator: torch.Generator) -> torch.Tensor | None:
    """(clients, B) data set indices of each client's samples, drawn as `mode` says (module docstring);
    None where the data set cannot give such a client (distinct labels with B > classes present)."""
    present = labels.unique()
    by_class = {int(c): (labels == c).nonzero().flatten() for c in present}
    if mode == "random":
        return torch.stack([torch.randperm(len(labels), generator=generator)[:batch_size] for _ in range(clients)])
    kinds = batch_size if mode == "distinct" else min(max(1, batch_size // 2), len(present))
    if kinds > len(present):
        return None
    rows = []
    for _ in range(clients):
        classes = present[torch.randperm(len(present), generator=generator)[:kinds]]
        extra = classes[torch.randint(kinds, (batch_size - kinds,), generator=generator)]
        rows.append(_images_of(torch.cat([classes, extra]), by_class, generator))
    return torch.stack(rows)


def _images_of(client_labels: torch.Tensor, by_class: dict[int, torch.Tensor],
               generator: torch.Generator) -> torch.Tensor:
    """One image index per label: distinct images of a class while it has enough, then drawn again."""
    picked = torch.empty_like(client_labels)
    for c in client_labels.unique().tolist():
        slots = (client_labels == c).nonzero().flatten()
        pool = by_class[c]
        order = torch.randperm(len(pool), generator=generator)
        if len(slots) > len(pool):
            order = torch.cat([order, torch.randint(len(pool), (len(slots) - len(pool),), generator=generator)])
        picked[slots] = pool[order[:len(slots)]]
    return picked


# ------------------------------------------------------------------------------------------------ victims

def build_victims(cfg: DictConfig, dataset, indices: list[int]):
    """(model, weights, buffers) for the clients `indices`: a fresh victim each (from its trial's seed), or
    one checkpoint viewed K times."""
    from hydra.utils import instantiate

    from lightning_idlg.case.client import share_one_network, stack_victims
    from lightning_idlg.case.model import make_victim

    c, h, _ = dataset.shape
    factory, init = instantiate(cfg.model.factory), instantiate(cfg.model.init)

    def build(seed: int):
        return make_victim(factory, init, in_channels=c, image_size=h, num_classes=dataset.num_classes, seed=seed)

    if init.one_network:
        victim = build(0)
        return (victim, *share_one_network(victim, len(indices)))
    victims = [build(derive_seed(cfg.seed, i, 0)) for i in indices]
    return (victims[0], *stack_victims(victims))


# --------------------------------------------------------------------------------------------- experiment

def strategies(cfg: DictConfig) -> dict:
    """name -> label strategy (configs/label_restoration.yaml `strategies`); learned ones have nothing to
    restore and are refused."""
    from hydra.errors import InstantiationException

    parts = {}
    for name, node in (cfg.strategies or {}).items():
        try:
            part = instantiate_part(node)
        except InstantiationException as err:  # not the part's own one-line error: say which part
            raise ConfigError(f"strategies.{name} cannot be built: {str(err).splitlines()[0]}") from None
        if getattr(part, "learned", True) or not hasattr(part, "restore"):
            raise ConfigError(f"strategies.{name} is not a label strategy that restores labels; valid: "
                              "lightning_idlg.attacks.labels.AnalyticLabel, Yin, LLG, LLGPlus, BiasCorrected")
        parts[name] = part
    if not parts:
        raise ConfigError("strategies is empty; name at least one, e.g. strategies.Yin._target_=lightning_idlg.attacks.labels.Yin")
    return parts


def applies(strategy, batch_size: int, num_classes: int) -> bool:
    """Whether a strategy is defined for this B (its max_batch; B distinct labels need B <= classes)."""
    if strategy.max_batch is not None and batch_size > strategy.max_batch:
        return False
    return not (strategy.distinct and batch_size > num_classes)


def validate(cfg: DictConfig) -> None:
    sizes = list(cfg.batch_sizes)
    if not sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in sizes):
        raise ConfigError(f"batch_sizes must be a list of positive integers, got {sizes!r}")
    for key in ("clients", "clients_per_group"):
        value = cfg[key]
        positive_int(key, value)
    label_modes(cfg.labels)


def draw_cells(cfg: DictConfig, labels: torch.Tensor) -> dict[tuple[str, int], torch.Tensor]:
    """(label draw, B) -> (clients, B) data set indices, for every cell the data set can give; each cell
    from its own seed, so a cell's clients do not depend on which other cells run."""
    picks = {}
    for mode in label_modes(cfg.labels):
        for b in cfg.batch_sizes:
            generator = torch.Generator().manual_seed(derive_seed(cfg.seed, 1000 * b + LABEL_MODES.index(mode), 3))
            drawn = draw_clients(labels, b, mode, cfg.clients, generator)
            if drawn is None:
                log.info("labels=%s, B=%d: the data set has fewer than the classes needed; no row", mode, b)
            else:
                picks[mode, b] = drawn
    return picks


def restore_cells(cfg: DictConfig, dataset, parts: dict):
    """Yields, per group of clients (`clients_per_group`) and per cell (label draw, B): a dict with `labels`
    (the draw), `batch_size`, `clients` (their indices), `shared` (the SharedGradient), `private` (K, B)
    and `restored` (strategy name -> (K, B) labels, for the strategies that apply), `seconds` (restoration
    time per strategy). Victims are built once per group and reused by every cell (client i meets the same
    victim at every B and label draw). This experiment and benchmarks/labels_breaching.py both read it."""
    images, labels = dataset_tensors(dataset)
    from lightning_idlg.case.share import make_defense  # as the attack runs compose them

    defense = make_defense(cfg)
    picks = draw_cells(cfg, labels)
    group = cfg.clients_per_group
    for chunk in [list(range(s, min(s + group, cfg.clients))) for s in range(0, cfg.clients, group)]:
        model, weights, buffers = build_victims(cfg, dataset, chunk)
        for (mode, b), drawn in picks.items():
            mine = drawn[chunk]
            shared = share(cfg, b, model, weights, buffers, images[mine], labels[mine], dataset.num_classes,
                           defense, chunk)
            restored, seconds = {}, {}
            for name, strategy in parts.items():
                if applies(strategy, b, dataset.num_classes):
                    start = time.perf_counter()
                    restored[name] = strategy.restore(shared)
                    seconds[name] = time.perf_counter() - start
            yield {"labels": mode, "batch_size": b, "clients": chunk, "shared": shared, "private": labels[mine],
                   "restored": restored, "seconds": seconds}
        log.info("clients %d-%d done", chunk[0], chunk[-1])


def run(cfg: DictConfig, overrides: str = "") -> list[dict]:
    """Every cell's row (COLUMNS): scores averaged over the cell's clients."""
    from lightning_idlg.records.label_metrics import score
    from lightning_idlg.records.moved import modernize_config

    modernize_config(cfg)  # a strategy named by its module path before the move
    validate(cfg)
    parts = strategies(cfg)
    dataset = load_dataset(cfg)
    sums: dict[tuple, dict[str, float]] = {}
    for cell in restore_cells(cfg, dataset, parts):
        for name, restored in cell["restored"].items():
            scores = score(restored, cell["private"], dataset.num_classes)
            key = (cell["labels"], cell["batch_size"], name)
            total = sums.setdefault(key, dict.fromkeys((*SCORE_NAMES, "clients"), 0.0))
            for s in SCORE_NAMES:
                total[s] += float(scores[s].sum())
            total["clients"] += len(cell["clients"])
    describe = describe_run(cfg, dataset, overrides)
    return [{**describe, "labels": mode, "batch_size": b, "strategy": name,
             "distinct_assumed": parts[name].distinct, "clients": int(t["clients"]),
             **{s: t[s] / t["clients"] for s in SCORE_NAMES}} for (mode, b, name), t in sums.items()]


def load_dataset(cfg: DictConfig):
    """The data set; a loader's own one-line error (missing files, bad root) rather than Hydra's wrapper."""
    return instantiate_part(cfg.dataset, (ConfigError, FileNotFoundError))


def share(cfg, batch_size, model, weights, buffers, images, labels, num_classes, defense, chunk):
    """The clients' shared gradients through the real Client (its reduction, mode, defense)."""
    from hydra.utils import instantiate

    from lightning_idlg.case.client import PrivateBatch

    client = instantiate(cfg.client, batch_size=batch_size)
    private = PrivateBatch(images, labels, chunk)
    seeds = [derive_seed(cfg.seed, i, 2) for i in chunk]
    return client.share(model, weights, buffers, private, num_classes, defense, seeds)[0]


def describe_run(cfg: DictConfig, dataset, overrides: str) -> dict:
    """What made a row: data set, victim (class, with its depth where it has one, and activation), init
    (with the checkpoint's file name: which training state), client, defense, seed, overrides."""
    factory = cfg.model.factory
    target = str(factory.get("target") or factory.get("_target_", "?")).rsplit(".", 1)[-1]
    if factory.get("depth") is not None:
        target = f"{target}-{factory.depth}"
    init = cfg.model.init.get("_target_", "?").rsplit(".", 1)[-1]
    if cfg.model.init.get("path"):
        init = f"{init}({Path(str(cfg.model.init.path)).name})"
    return {"dataset": dataset.name, "model": target, "activation": factory.get("activation", ""),
            "init": init, "reduction": cfg.client.get("reduction", "mean"), "client_mode": cfg.client.get("mode", "train"),
            "defense": "+".join(cfg.get("defense") or {}) or "none", "seed": cfg.seed, "overrides": overrides}


# ------------------------------------------------------------------------------------------------ outputs




# ------------------------------------------------------------------------------------------------ the CLI

def _app(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    overrides = " ".join(hydra_cfg.overrides.task)
    out_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        rows = run(cfg, overrides)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    write_outputs(rows, out_dir)
    log.info("%s", markdown(rows))
    log.info("wrote %s, labels.md, labels.png", out_dir / "labels.csv")
    logger = make_logger(cfg)
    if logger is not None:
        from lightning_idlg.run.tracking import log_label_results

        log_label_results(logger, rows, COLUMNS, out_dir / "labels.png", OmegaConf.to_container(cfg, resolve=True))


def make_logger(cfg: DictConfig):
    """The experiment logger of `logger=` (configs/logger/*.yaml), or None (logger=none). The W&B logger
    tags the attack app's methods; here the label strategies take their place."""
    if not cfg.get("logger"):
        return None
    from hydra.utils import instantiate

    if "methods" in cfg.logger:  # replaces `${oc.dict.keys:attack}`: this config has no attack
        cfg.logger.methods = list(cfg.strategies)
    return instantiate(cfg.logger)


def main() -> None:
    import hydra

    hydra.main(version_base="1.3", config_path="pkg://lightning_idlg.configs", config_name="label_restoration")(_app)()


if __name__ == "__main__":
    main()
