"""Stream orders: parsing, seeded permutations, class-grouped and Dirichlet label-shift streams."""
from __future__ import annotations

import pytest
import torch

from vlmtta.streams import StreamOrder, dirichlet_order, iid_order, stream_order


def _repeats(labels: torch.Tensor) -> float:
    return float((labels[1:] == labels[:-1]).float().mean())


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


def test_dirichlet_order_correlates_labels():
    labels = torch.arange(2000) % 10
    order = dirichlet_order(labels, alpha=0.1, seed=0)
    assert sorted(order.tolist()) == list(range(2000))
    assert torch.equal(order, stream_order(labels, "dirichlet:0.1", seed=0))
    assert torch.equal(order, stream_order(labels, "dirichlet", seed=0))  # default alpha 0.1
    assert _repeats(labels[order]) > 0.5 > 0.2 > _repeats(labels[iid_order(2000)])
    assert _repeats(labels[stream_order(labels, "dirichlet:100", seed=0)]) < 0.2


def test_parse_and_describe():
    order = StreamOrder.parse("dirichlet:0.01")
    assert (order.kind, order.alpha, order.slot, str(order)) == ("dirichlet", 0.01, 64, "dirichlet:0.01")
    assert order.describe(7) == {"order": "dirichlet", "seed": 7, "alpha": 0.01, "slot": 64} and order.uses_labels
    assert StreamOrder.parse("iid") == StreamOrder("shuffled") and not StreamOrder("shuffled").uses_labels
    assert StreamOrder("sorted").describe(0) == {"order": "sorted", "seed": 0}
    for bad, message in (("random", "Unknown stream order"), ("shuffled:3", "Unknown stream order"),
                         ("dirichlet:x", "must be a number"), ("dirichlet:0", "> 0"), ("dirichlet:-1", "> 0"),
                         ("dirichlet:nan", "> 0")):
        with pytest.raises(ValueError, match=message):
            StreamOrder.parse(bad)
