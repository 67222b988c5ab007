"""Stream orders for online methods: in file order, i.i.d. shuffled, class-grouped, or Dirichlet label shift.

An order is written as text (``vlmtta bench --order``): ``sorted`` (dataset order), ``shuffled`` (alias
``iid``: a seeded permutation), ``grouped`` (classes in a seeded order, each class contiguous) or
``dirichlet[:ALPHA]`` (temporally correlated labels, default ``ALPHA`` = 0.1).

The Dirichlet order is the temporally correlated ("practical TTA") stream of RoTTA (Yuan et al., CVPR 2023,
``LabelDirichletDomainSequence``), itself NOTE's (Gong et al., NeurIPS 2022) Dirichlet protocol: time is cut
into ``min(C, 100)`` slots; each class spreads its samples over the slots in proportions drawn from
``Dirichlet(alpha)`` (its samples in dataset order); a slot plays its classes' blocks one after the other, in
a random order.  A small ``alpha`` puts most of a class in one slot (long runs of one class); a large one
spreads every class evenly over the slots, so each slot holds every class, still as contiguous blocks.
Labels decide only the order of ``grouped`` and ``dirichlet`` streams (as in the published protocols); the
runner never passes them to a method.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

ORDERS = ("sorted", "shuffled", "grouped", "dirichlet")
ALIASES = {"iid": "shuffled"}
DIRICHLET_ALPHA = 0.1  # RoTTA's gamma
MAX_SLOTS = 100  # RoTTA: one slot per class, at most 100


@dataclass(frozen=True)
class StreamOrder:
    """A parsed order: its kind and, for ``dirichlet``, the concentration."""

    kind: str
    alpha: float | None = None

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
        return cls(kind, alpha)

    def __str__(self) -> str:
        return self.kind if self.alpha is None else f"{self.kind}:{self.alpha:g}"

    @property
    def uses_labels(self) -> bool:
        """Whether labels shape the order (they still never reach a method)."""
        return self.kind in ("grouped", "dirichlet")

    def describe(self, seed: int, n_classes: int) -> dict[str, Any]:
        """The order's protocol facts for a result file (``n_classes``: classes present in the stream)."""
        facts: dict[str, Any] = {"order": self.kind, "seed": int(seed)}
        if self.kind == "dirichlet":
            facts.update(alpha=self.alpha, slots=min(n_classes, MAX_SLOTS), protocol="RoTTA / NOTE")
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
        return dirichlet_order(labels, alpha=self.alpha, seed=seed)


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


def dirichlet_order(labels: torch.Tensor, alpha: float = DIRICHLET_ALPHA, seed: int = 0,
                    slots: int | None = None) -> torch.Tensor:
    """A permutation of the samples whose labels are temporally correlated (RoTTA / NOTE, see the module docstring).

    ``slots`` defaults to ``min(C, 100)`` for the ``C`` classes present.  Every sample appears exactly once.
    """
    labels = np.asarray(torch.as_tensor(labels).long())
    classes, counts = np.unique(labels, return_counts=True)
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])  # each class's indices, ascending
    slots = slots or max(1, min(len(classes), MAX_SLOTS))
    if alpha <= 0 or slots < 1:
        raise ValueError(f"alpha must be > 0 and slots >= 1, got alpha={alpha}, slots={slots}.")
    rng = np.random.default_rng(int(seed))
    shares = rng.dirichlet(np.full(slots, float(alpha)), len(classes))  # [C, slots]: where each class's samples go
    blocks: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for members, share in zip(by_class, shares):
        for slot, block in enumerate(np.split(members, (np.cumsum(share)[:-1] * len(members)).astype(int))):
            blocks[slot].append(block)
    order = [slot[k] for slot in blocks for k in rng.permutation(len(slot))]
    return torch.from_numpy(np.concatenate([np.zeros(0, dtype=np.int64), *order])).long()
