"""Stream orders: parsing, seeded permutations, class-grouped and Dirichlet label-shift streams."""
from __future__ import annotations

import pytest
import torch

from vlmtta.streams import StreamOrder, dirichlet_order, iid_order, stream_order


def test_iid_order_is_a_seeded_permutation():
    order = iid_order(100, seed=1)
    assert sorted(order.tolist()) == list(range(100))
    assert torch.equal(order, iid_order(100, seed=1)) and not torch.equal(order, iid_order(100, seed=2))
    assert torch.equal(stream_order(list(range(100)), "iid", 1), order)  # iid is an alias of shuffled
    assert torch.equal(stream_order(list(range(100)), "shuffled", 1), order)


def test_sorted_and_grouped_orders():
    labels = [k % 4 for k in range(20)]
    assert stream_order(labels, "sorted", 0).tolist() == list(range(20))
    grouped = [labels[i] for i in stream_order(labels, "grouped", 3)]
    assert sorted(stream_order(labels, "grouped", 3).tolist()) == list(range(20))
    assert sum(a != b for a, b in zip(grouped, grouped[1:])) == 3  # each class is one contiguous run


def _runs(labels: torch.Tensor) -> int:
    """Number of maximal runs of one label."""
    return 1 + int((labels[1:] != labels[:-1]).sum())


def test_dirichlet_order_correlates_labels():
    labels = torch.arange(2000) % 10
    order = dirichlet_order(labels, alpha=0.1, seed=0)
    assert sorted(order.tolist()) == list(range(2000))
    assert torch.equal(order, stream_order(labels, "dirichlet:0.1", seed=0))
    assert torch.equal(order, stream_order(labels, "dirichlet", seed=0))  # default alpha 0.1 (RoTTA's gamma)
    assert not torch.equal(order, dirichlet_order(labels, alpha=0.1, seed=1))
    # each slot plays whole class blocks: at most slots x classes runs, far fewer than an i.i.d. stream's ~1800
    assert _runs(labels[order]) <= 10 * 10 < 1500 < _runs(labels[iid_order(2000)])
    assert _runs(labels[order]) < _runs(labels[stream_order(labels, "dirichlet:100", seed=0)])
    # within a class, samples keep their dataset order (RoTTA splits each class's index list, unshuffled)
    for c in range(10):
        members = order[labels[order] == c]
        assert torch.equal(members, members.sort().values)


def test_dirichlet_slots_follow_the_drawn_shares():
    """Small alpha: almost every class sits in one slot; large alpha: each slot holds about 1/slots of each class."""
    labels = torch.arange(3000) % 3  # 3 classes -> 3 slots of RoTTA
    concentrated = labels[dirichlet_order(labels, alpha=0.001, seed=0)]
    assert _runs(concentrated) <= 4  # each class (nearly) whole: a handful of runs
    spread = labels[dirichlet_order(labels, alpha=1000.0, seed=0)]
    assert 7 <= _runs(spread) <= 9  # 3 slots x 3 class blocks of ~333 each (adjacent blocks may share a class)
    assert max(len(set(spread[k:k + 1000].tolist())) for k in (0, 1000, 2000)) == 3
    assert torch.equal(dirichlet_order(torch.tensor([4, 4, 9, 4]), 0.5, seed=2).sort().values, torch.arange(4))
    assert dirichlet_order(torch.zeros(0, dtype=torch.long)).numel() == 0


def test_parse_and_describe():
    order = StreamOrder.parse("dirichlet:0.01")
    assert (order.kind, order.alpha, str(order)) == ("dirichlet", 0.01, "dirichlet:0.01") and order.uses_labels
    assert order.describe(7, 1000) == {"order": "dirichlet", "seed": 7, "alpha": 0.01, "slots": 100,
                                       "protocol": "RoTTA / NOTE"}
    assert order.describe(7, 10)["slots"] == 10
    assert StreamOrder.parse("iid") == StreamOrder("shuffled") and not StreamOrder("shuffled").uses_labels
    assert StreamOrder("sorted").describe(0, 10) == {"order": "sorted", "seed": 0}
    for bad, message in (("random", "Unknown stream order"), ("shuffled:3", "Unknown stream order"),
                         ("dirichlet:x", "must be a number"), ("dirichlet:0", "> 0"), ("dirichlet:-1", "> 0"),
                         ("dirichlet:nan", "> 0")):
        with pytest.raises(ValueError, match=message):
            StreamOrder.parse(bad)
