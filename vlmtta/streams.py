"""Stream orders for online methods: in file order, i.i.d. shuffled, class-grouped, or Dirichlet label shift.

An order is written as text (``vlmtta bench --order``): ``sorted`` (dataset order), ``shuffled`` (alias
``iid``: a seeded permutation), ``grouped`` (classes in a seeded order, each class contiguous) or
``dirichlet[:ALPHA]`` (temporally correlated labels, default ``ALPHA`` = 0.1).

The Dirichlet order follows the non-i.i.d. protocol of NOTE / RoTTA-style benchmarks: the stream is cut
into slots of ``DIRICHLET_SLOT`` samples, and each slot's class proportions are drawn from a Dirichlet
distribution, so a small concentration ``alpha`` gives long runs of one class and a large one approaches
i.i.d.  Labels decide only the order of ``grouped`` and ``dirichlet`` streams (as in the published
protocols); the runner never passes them to a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

ORDERS = ("sorted", "shuffled", "grouped", "dirichlet")
ALIASES = {"iid": "shuffled"}
DIRICHLET_ALPHA = 0.1
DIRICHLET_SLOT = 64


@dataclass(frozen=True)
class StreamOrder:
    """A parsed order: its kind and, for ``dirichlet``, the concentration and slot length."""

    kind: str
    alpha: float | None = None
    slot: int | None = None

    @classmethod
    def parse(cls, text: str) -> "StreamOrder":
        """``sorted`` / ``shuffled`` (``iid``) / ``grouped`` / ``dirichlet`` / ``dirichlet:ALPHA``; clear error otherwise."""
        name, _, value = str(text).strip().partition(":")
        kind = ALIASES.get(name, name)
        if kind not in ORDERS or (value and kind != "dirichlet"):
            raise ValueError(f"Unknown stream order {text!r}; accepted: sorted, shuffled (iid), grouped, "
                             "dirichlet or dirichlet:ALPHA (e.g. dirichlet:0.1).")
        if kind != "dirichlet":
            return cls(kind)
        try:
            alpha = float(value) if value else DIRICHLET_ALPHA
        except ValueError:
            raise ValueError(f"Stream order {text!r}: ALPHA must be a number, e.g. dirichlet:0.1.") from None
        if not alpha > 0 or not np.isfinite(alpha):
            raise ValueError(f"Stream order {text!r}: ALPHA must be a finite number > 0.")
        return cls(kind, alpha, DIRICHLET_SLOT)

    def __str__(self) -> str:
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"

    @property
    def uses_labels(self) -> bool:
        """Whether labels shape the order (they still never reach a method)."""
        return self.kind in ("grouped", "dirichlet")

    def describe(self, seed: int) -> dict[str, Any]:
        """The order's protocol facts for a result file."""
        facts: dict[str, Any] = {"order": self.kind, "seed": int(seed)}
        if self.kind == "dirichlet":
            facts.update(alpha=self.alpha, slot=self.slot)
        return facts

    def indices(self, labels: Sequence[int] | torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Indices of the samples in stream order (a permutation of ``range(len(labels))``)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if self.kind == "sorted":
            return torch.arange(len(labels))
        if self.kind == "shuffled":
            return iid_order(len(labels), seed)
        if self.kind == "grouped":
            return grouped_order(labels, seed)
        return dirichlet_order(labels, alpha=self.alpha, slot=self.slot, seed=seed)


def stream_order(labels: Sequence[int] | torch.Tensor, order: str | StreamOrder = "shuffled",
                 seed: int = 0) -> torch.Tensor:
    """Indices of ``labels`` in stream order, ``order`` as in the module docstring (e.g. ``"dirichlet:0.1"``)."""
    return (order if isinstance(order, StreamOrder) else StreamOrder.parse(order)).indices(labels, seed)


def iid_order(n: int, seed: int = 0) -> torch.Tensor:
    """A seeded random permutation of ``range(n)``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


def grouped_order(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Classes in a seeded order, each class's samples contiguous (in a seeded order within the class)."""
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(len(labels), generator=gen)
    rank = torch.randperm(int(labels.max()) + 1 if len(labels) else 0, generator=gen)
    return perm[torch.sort(rank[labels[perm]], stable=True).indices]


def dirichlet_order(labels: torch.Tensor, alpha: float = DIRICHLET_ALPHA, slot: int = DIRICHLET_SLOT,
                    seed: int = 0) -> torch.Tensor:
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
