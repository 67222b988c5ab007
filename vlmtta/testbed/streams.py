"""Test-stream orders for online methods: i.i.d. shuffled, or temporally correlated labels.

The correlated order follows the non-i.i.d. protocol of NOTE / RoTTA-style benchmarks: the stream is
cut into slots, and each slot's class proportions are drawn from a Dirichlet distribution, so a small
concentration ``alpha`` gives long runs of one class and a large one approaches i.i.d.
"""
from __future__ import annotations

import numpy as np
import torch

STREAM_ORDERS = ("iid", "dirichlet")


def iid_order(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded random permutation of ``range(n)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def dirichlet_order(labels: torch.Tensor, alpha: float = 0.1, slot: int = 64, seed: int = 0) -> torch.Tensor:
    """A permutation of the samples whose labels are temporally correlated.

    Every class's samples are shuffled and queued; the stream is built ``slot`` samples at a time,
    each slot taking samples from the classes in proportions drawn from ``Dirichlet(alpha)`` over the
    classes that still have samples, in shuffled order.  Every sample appears exactly once.
    """
    if alpha <= 0 or slot < 1:
        raise ValueError(f"alpha must be > 0 and slot >= 1, got alpha={alpha}, slot={slot}.")
    rng = np.random.default_rng(int(seed))
    labels = np.asarray(torch.as_tensor(labels).long())
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    order: list[int] = []
    while any(queues):
        alive = [q for q in queues if q]
        weights = rng.dirichlet(np.full(len(alive), float(alpha)))
        chunk: list[int] = []
        for queue, count in zip(alive, _split(weights, slot)):
            chunk.extend(queue[:count])
            del queue[:count]
        order.extend(rng.permutation(chunk).tolist())
    return torch.tensor(order, dtype=torch.long)


def _split(weights: np.ndarray, total: int) -> list[int]:
    """Integer counts proportional to ``weights`` that sum to ``total`` (largest remainders)."""
    raw = weights * total
    counts = np.floor(raw).astype(int)
    counts[np.argsort(counts - raw, kind="stable")[: total - counts.sum()]] += 1
    return counts.tolist()


def stream_order(labels: torch.Tensor, order: str = "iid", seed: int = 0, alpha: float = 0.1) -> torch.Tensor:
    """Indices of ``labels`` in stream order: ``iid`` or ``dirichlet`` (correlated, concentration ``alpha``).

    The labels decide only the order of a correlated stream (as in the published non-i.i.d. protocols);
    methods never see them.
    """
    if order == "iid":
        return iid_order(len(labels), seed)
    if order == "dirichlet":
        return dirichlet_order(labels, alpha=alpha, seed=seed)
    raise ValueError(f"Unknown stream order {order!r}; accepted: {', '.join(STREAM_ORDERS)}.")
