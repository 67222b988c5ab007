"""ClassCache: entropy-ranked per-class tensor slots shared by TDA, BoostAdapter and DMN."""
from __future__ import annotations

import math

import pytest
import torch

from vlmtta.memory import ClassCache, affinity, weighted_prototypes


def unit(*values: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(values, dtype=torch.float32), dim=0)


def test_free_slots_first_then_lowest_entropy_replacement():
    cache = ClassCache(n_classes=2, capacity=2, dim=2)
    a, b, c, d = unit(1, 0), unit(0, 1), unit(1, 1), unit(1, -1)
    assert cache.insert(0, a, 0.5) and cache.insert(0, b, 0.9)
    assert not cache.insert(0, c, 0.9)  # full, not strictly lower than the worst (0.9)
    assert cache.insert(0, d, 0.1)  # replaces b, the highest entropy
    keys, entropies, _ = cache.contents(0)
    assert entropies.tolist() == pytest.approx([0.1, 0.5])
    assert torch.equal(keys, torch.stack([d, a]))
    assert cache.filled.tolist() == [[True, True], [False, False]]  # the other class is untouched
    assert not cache.insert(1, a, 0.2, when=torch.tensor(False))  # gated insertion
    assert cache.filled[1].sum() == 0


def test_fifo_eviction_replaces_the_oldest_whatever_the_entropy():
    cache = ClassCache(n_classes=2, capacity=2, dim=2)
    a, b, c, d = unit(1, 0), unit(0, 1), unit(1, 1), unit(1, -1)
    assert cache.insert(0, a, 0.1, evict="fifo") and cache.insert(1, c, 0.3, evict="fifo")
    assert cache.insert(0, b, 0.2, evict="fifo")
    assert cache.insert(0, c, 0.9, evict="fifo")  # full: replaces a (oldest) although its entropy is the lowest
    assert not cache.insert(0, d, 0.0, evict="fifo", when=torch.tensor(False))  # gated: nothing moves
    assert cache.insert(0, d, 0.5, evict="fifo")  # replaces b, now the oldest
    keys, entropies, _ = cache.contents(0)
    assert entropies.tolist() == pytest.approx([0.5, 0.9]) and torch.equal(keys, torch.stack([d, c]))
    assert cache.contents(1)[1].tolist() == pytest.approx([0.3])
    cache.reset()
    assert cache.insert(0, b, 0.4, evict="fifo") and cache.filled.sum() == 1
    with pytest.raises(ValueError, match="evict"):
        cache.insert(0, a, 0.1, evict="lifo")


def test_affinities_by_hand():
    cache = ClassCache(n_classes=3, capacity=2, dim=2, value_dim=3)
    cache.insert(0, unit(1, 0), 0.1, value=torch.tensor([1.0, 0.0, 1.0]))
    cache.insert(0, unit(0, 1), 0.2, value=torch.tensor([0.0, 1.0, 0.0]))
    cache.insert(2, unit(1, 1), 0.3, value=torch.tensor([0.0, 0.0, 1.0]))
    q, beta = unit(1, 0), 2.0
    a0, a1, a2 = 1.0, math.exp(-beta), math.exp(-beta * (1 - 1 / math.sqrt(2)))
    assert cache.class_affinity(q, beta).tolist() == pytest.approx([a0 + a1, 0.0, a2])
    assert cache.value_affinity(q, beta).tolist() == pytest.approx([a0, a1, a0 + a2])
    assert affinity(q, torch.stack([unit(0, 1)]), beta).tolist() == pytest.approx([a1])


def test_class_affinity_with_matches_an_explicit_bigger_copy():
    torch.manual_seed(0)
    cache = ClassCache(n_classes=4, capacity=2, dim=3)
    keys = torch.nn.functional.normalize(torch.randn(6, 3), dim=-1)
    for k, (label, h) in zip(keys, [(0, 0.4), (0, 0.6), (1, 0.3), (2, 0.5), (2, 0.2), (1, 0.9)]):
        cache.insert(label, k, h)
    before = [t.clone() for t in (cache.keys, cache.entropy)]
    extra = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    labels, entropy = torch.tensor([0, 0, 3, 2]), torch.tensor([0.1, 0.5, 0.2, 0.7])
    q = torch.nn.functional.normalize(torch.randn(3), dim=0)
    for capacity in (2, 3, 4):
        copy = ClassCache(n_classes=4, capacity=capacity, dim=3)
        for label in range(4):
            for k, h, _ in zip(*cache.contents(label)):
                copy.insert(label, k, h)
        for k, label, h in zip(extra, labels, entropy):
            copy.insert(label, k, h)
        got = cache.class_affinity_with(q, 3.0, extra, labels, entropy, capacity)
        assert torch.allclose(got, copy.class_affinity(q, 3.0), atol=1e-6)
    assert torch.equal(cache.keys, before[0]) and torch.equal(cache.entropy, before[1])  # untouched
    assert torch.equal(cache.class_affinity_with(q, 3.0, extra[:0], labels[:0], entropy[:0], 5),
                       cache.class_affinity(q, 3.0))


def test_from_labelled_and_weighted_prototypes():
    features = torch.eye(3)
    cache = ClassCache.from_labelled(features, torch.tensor([2, 0, 2]), n_classes=3)
    assert cache.capacity == 2
    assert cache.filled.tolist() == [[True, False], [False, False], [True, True]]
    assert torch.equal(cache.keys[2], features[[0, 2]])
    protos = weighted_prototypes(cache.keys, torch.tensor([[2.0, 5.0], [1.0, 1.0], [1.0, 3.0]]))
    assert protos.tolist() == [[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 3.0]]


def test_reset_restores_the_empty_state():
    cache = ClassCache(n_classes=3, capacity=2, dim=2, value_dim=3)
    fresh = ClassCache(n_classes=3, capacity=2, dim=2, value_dim=3)
    cache.insert(1, unit(1, 0), 0.3, value=torch.ones(3))
    cache.reset()
    for name in ("keys", "entropy", "values"):
        assert torch.equal(getattr(cache, name), getattr(fresh, name))
    with pytest.raises(ValueError, match="capacity"):
        ClassCache(3, 0, 2)
