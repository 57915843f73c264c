"""Scores of restored labels against a client's private labels (evaluation only; the attack never sees them).

The labels of a batch of B samples are a multiset: the shared gradient does not depend on the samples'
order, so every score compares label counts, never positions. For K clients, restored and private labels
(K, B) each, C classes; n_c and n'_c the private and restored counts of class c:
- `exact_multiset`: 1 where n'_c = n_c for every class (all B labels right), else 0;
- `count_accuracy`: the share of the classes that occur in either multiset whose count is right,
  |{c : n'_c = n_c, n_c + n'_c > 0}| / |{c : n_c + n'_c > 0}| (Wainakh et al.'s label-number accuracy over
  present and predicted classes, so that a class claimed but absent counts against it);
- `instance_accuracy`: the share of the B labels right under the best assignment of restored to private
  labels, sum_c min(n_c, n'_c) / B (the multiset intersection; for B = 1 plain label accuracy).
"""

from __future__ import annotations

import torch

SCORES = ("exact", "count_accuracy", "instance_accuracy")


def label_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K, B) labels -> (K, C) counts."""
    counts = torch.zeros(labels.shape[0], num_classes, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, labels.long(), torch.ones_like(labels, dtype=torch.long))


def exact_multiset(restored: torch.Tensor, private: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) 1.0 where the restored multiset equals the private one, else 0.0."""
    return (label_counts(restored, num_classes) == label_counts(private, num_classes)).all(-1).float()


def count_accuracy(restored: torch.Tensor, private: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) share of the classes present in either multiset whose count is right."""
    r, p = label_counts(restored, num_classes), label_counts(private, num_classes)
    seen = (r + p) > 0
    return ((r == p) & seen).sum(-1).float() / seen.sum(-1).float()


def instance_accuracy(restored: torch.Tensor, private: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(K,) multiset intersection size / B: labels right under the best restored-to-private assignment."""
    r, p = label_counts(restored, num_classes), label_counts(private, num_classes)
    return torch.minimum(r, p).sum(-1).float() / private.shape[-1]


def score(restored: torch.Tensor, private: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Every score of `SCORES`, (K,) each."""
    return {"exact": exact_multiset(restored, private, num_classes),
            "count_accuracy": count_accuracy(restored, private, num_classes),
            "instance_accuracy": instance_accuracy(restored, private, num_classes)}
