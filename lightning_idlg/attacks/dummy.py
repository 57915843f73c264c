"""Dummy initialization: where an attack starts, one part of an attack (configs/attack/*.yaml `dummy`).

Each trial draws from its own seed, so its start never depends on the group it runs in or on the device.
"""

from __future__ import annotations

import torch


class GaussianDummy:
    """x' ~ N(0, 1) per pixel and label logits l' ~ N(0, 1) (DLG and iDLG: `torch.randn`), for the B samples
    of a client. Per trial: a generator seeded with the trial's seed draws x' (B, C, H, W), then l'
    (B, classes); restart number `attempt` takes the (attempt + 1)-th such draw of the same generator. With
    B = 1 this is exactly the engine's earlier draw (randn(C, H, W), then randn(classes))."""

    def draw(self, seeds: list[int], input_shape: tuple[int, ...], batch_size: int, num_classes: int,
             attempt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x' (K, B, C, H, W), l' (K, B, classes)), float32 on the CPU."""
        dummies, logits = [], []
        for seed in seeds:
            g = torch.Generator().manual_seed(int(seed))
            for _ in range(attempt + 1):
                # float32 whatever the default dtype (Lightning's 64-true precision sets float64 inside fit,
                # where continuous batching draws): the same seed gives the same start everywhere
                dummy = torch.randn((batch_size, *input_shape), generator=g, dtype=torch.float32)
                logit = torch.randn((batch_size, num_classes), generator=g, dtype=torch.float32)
            dummies.append(dummy)
            logits.append(logit)
        return torch.stack(dummies), torch.stack(logits)
