"""Per-class feature memories for online cache methods (TDA, BoostAdapter, DMN), as preallocated tensors.

A ``ClassCache`` holds, for each of ``C`` classes, ``capacity`` slots of a key feature [D], its entropy and an
optional value vector [V].  Empty slots have entropy ``+inf``.  Inserting into a class takes a free slot if there
is one; otherwise, by the ``evict`` rule:

* ``"entropy"``: the class's highest-entropy entry is replaced when the newcomer's entropy is strictly lower (the
  lowest-entropy replacement of TDA's positive and negative caches, BoostAdapter's positive cache and DMN's
  dynamic memory);
* ``"fifo"``: the class's oldest entry is replaced, whatever the entropies (first in, first out: BoostAdapter's
  negative cache keeps each class's most recent entries).

Every operation is a handful of tensor ops whatever ``C`` and ``capacity`` are (no Python lists of tensors and,
for insertion, no host-device synchronisation).
"""
from __future__ import annotations

import torch

EVICTION_RULES = ("entropy", "fifo")


class ClassCache:
    """Entropy-ranked per-class slots: keys [C, K, D], entropies [C, K] (``inf`` = empty), values [C, K, V]."""

    def __init__(self, n_classes: int, capacity: int, dim: int, value_dim: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if n_classes < 1 or capacity < 1 or dim < 1:
            raise ValueError(f"ClassCache needs n_classes, capacity and dim >= 1, got {n_classes}, {capacity}, {dim}.")
        self.keys = torch.zeros(n_classes, capacity, dim, device=device, dtype=dtype)
        self.entropy = torch.full((n_classes, capacity), float("inf"), device=device)
        self.values = torch.zeros(n_classes, capacity, value_dim, device=device, dtype=dtype)
        self.stamps = torch.zeros(n_classes, capacity, dtype=torch.long, device=device)  # insertion order
        self._clock = 0

    @classmethod
    def from_labelled(cls, features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> ClassCache:
        """A cache holding labelled ``features`` [N, D] under ``labels`` [N] (entropy 0), as many slots as the
        largest class has samples (a static memory: DMN's few-shot support)."""
        labels = labels.to(features.device)
        counts = torch.bincount(labels, minlength=n_classes)
        cache = cls(n_classes, max(1, int(counts.max())), features.shape[1], device=features.device, dtype=features.dtype)
        order = torch.argsort(labels, stable=True)
        sorted_labels = labels[order]
        slots = torch.arange(labels.numel(), device=labels.device) - (counts.cumsum(0) - counts)[sorted_labels]
        cache.keys[sorted_labels, slots] = features[order]
        cache.entropy[sorted_labels, slots] = 0.0
        return cache

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def filled(self) -> torch.Tensor:
        """Occupancy mask [C, K]."""
        return self.entropy.isfinite()

    def reset(self) -> None:
        """Empty every slot (the state right after construction)."""
        self.keys.zero_()
        self.values.zero_()
        self.entropy.fill_(float("inf"))
        self.stamps.zero_()
        self._clock = 0

    def insert(self, label: int | torch.Tensor, key: torch.Tensor, entropy: float | torch.Tensor,
               value: torch.Tensor | None = None, when: bool | torch.Tensor = True,
               evict: str = "entropy") -> torch.Tensor:
        """Store ``key`` (and ``value``) under ``label`` in a free slot, else in place of the entry ``evict`` picks:
        the highest-entropy one if ``entropy`` is strictly lower (``"entropy"``), or the oldest one (``"fifo"``).

        ``when`` (a bool or 0-d bool tensor) gates the insertion without a host sync.  Returns whether it was stored.
        """
        if evict not in EVICTION_RULES:
            raise ValueError(f"ClassCache: evict must be one of {EVICTION_RULES}, got {evict!r}.")
        label = torch.as_tensor(label, device=self.keys.device)
        entropy = torch.as_tensor(entropy, dtype=self.entropy.dtype, device=self.entropy.device)
        when = torch.as_tensor(when, device=self.entropy.device)
        if evict == "entropy":
            slot = self.entropy[label].argmax()  # a free slot (inf) first, else the highest entropy
            accept = (entropy < self.entropy[label, slot]) & when
        else:
            slot = torch.where(self.filled[label], self.stamps[label], -1).argmin()  # a free slot first, else the oldest
            accept = when
        self.stamps[label, slot] = torch.where(accept, self._clock, self.stamps[label, slot])
        self._clock += 1
        self.entropy[label, slot] = torch.where(accept, entropy, self.entropy[label, slot])
        self.keys[label, slot] = torch.where(accept, key.to(self.keys.dtype), self.keys[label, slot])
        if value is not None:
            self.values[label, slot] = torch.where(accept, value.to(self.values.dtype), self.values[label, slot])
        return accept

    def contents(self, label: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, entropies and values of class ``label``'s filled slots, lowest entropy first (for inspection)."""
        order = torch.argsort(self.entropy[label], stable=True)
        order = order[self.entropy[label, order].isfinite()]
        return self.keys[label, order], self.entropy[label, order], self.values[label, order]

    def affinity(self, query: torch.Tensor, beta: float) -> torch.Tensor:
        """Tip-Adapter affinity ``exp(-beta (1 - query . key))`` of every slot [C, K]; 0 on empty slots."""
        return affinity(query, self.keys, beta) * self.filled

    def filled_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat indices [M] of the filled slots (class-major, slot order) and their classes [M]: what a readout
        needs to touch only the M filled slots instead of all ``C * capacity``."""
        index = self.entropy.isfinite().flatten().nonzero().squeeze(1)
        return index, torch.div(index, self.capacity, rounding_mode="floor")

    def class_affinity(self, query: torch.Tensor, beta: float) -> torch.Tensor:
        """Per-class sum of slot affinities [C]: the cache logits with one-hot values."""
        return self.affinity(query, beta).sum(dim=1)

    def value_affinity(self, query: torch.Tensor, beta: float) -> torch.Tensor:
        """Affinity-weighted sum of the stored values [V]: the cache logits with soft/multi-hot values."""
        return self.affinity(query, beta).flatten() @ self.values.flatten(0, 1)

    def class_affinity_with(self, query: torch.Tensor, beta: float, keys: torch.Tensor, labels: torch.Tensor,
                            entropy: torch.Tensor, capacity: int) -> torch.Tensor:
        """``class_affinity`` of a temporary copy of this cache, with ``capacity`` slots per class, into which
        ``keys`` [B, D] (pseudo-labels ``labels`` [B], entropies [B]) were inserted in order; the cache is untouched.

        Only the classes in ``labels`` change: for each, the lowest-entropy ``capacity`` entries among its stored
        ones followed by its new ones are kept (stable on ties, so stored entries and earlier keys win).
        """
        stored = self.affinity(query, beta)
        base = stored.sum(dim=1)
        if keys.shape[0] == 0:
            return base
        members = labels[None, :] == labels[:, None]  # [B, B]: the new keys of row b's class
        ent = torch.cat([self.entropy[labels], torch.where(members, entropy[None, :].float(), float("inf"))], dim=1)
        aff = torch.cat([stored[labels], affinity(query, keys, beta)[None].expand_as(members)], dim=1)
        kept = torch.argsort(ent, dim=1, stable=True)[:, :capacity]
        total = (aff.gather(1, kept) * ent.gather(1, kept).isfinite()).sum(dim=1)
        return base.index_put((labels,), total)


def affinity(query: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(-beta (1 - keys @ query))`` over the last dimension of ``keys``."""
    return torch.exp(-beta * (1.0 - keys @ query))


def weighted_prototypes(keys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-class sum of slot keys [C, K, D] weighted by ``weights`` [C, K] -> [C, D] (DMN's memory readout)."""
    return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
