"""BoostAdapter: TDA plus boosting views in a temporary copy of the positive cache (capacity shot + delta)."""
from __future__ import annotations

import math

import torch

import vlmtta.methods.boostadapter  # noqa: F401  (registers "boostadapter" and "tda")
from vlmtta.methods import Context, create_method, get_method_class

TEXT = torch.eye(3, 4)
SCALE = 10.0


def unit(*values: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(values, dtype=torch.float32), dim=0)


def bound(name: str, **options):
    method = create_method(name, **options)
    method.bind(Context(["a", "b", "c"], [], TEXT.clone(), SCALE))
    return method


def test_single_view_is_exactly_tda():
    torch.manual_seed(0)
    stream = torch.nn.functional.normalize(torch.randn(40, 4), dim=-1)
    boost, tda = bound("boostadapter", n_views=1), bound("tda")
    for f in stream:
        assert torch.equal(boost.predict_features(f[None]), tda.predict_features(f[None]))


def test_boosting_views_enter_a_temporary_copy_only():
    alpha, beta = 2.0, 5.0
    boost = bound("boostadapter", n_views=10, confident_ratio=0.2, delta=0, shot_capacity=1,
                  neg_alpha=0.0)  # no negative term, to read the positive one alone
    history = unit(1, 0.5, 0.3, 0)  # stored in class 0 with its (higher) entropy
    boost.predict_features(torch.stack([history] * 10))
    views = torch.stack([unit(1, 0.6, 0.2, 0.1)] + [unit(0.5, 1, 0.5, 0)] * 7 + [unit(1, 0, 0, 0.05), unit(0, 1, 0, 0)])
    probs = boost.predict_features(views)
    # history: the original view (view 0); boosting: the 2 lowest-entropy views, 8 (class 0) and 9 (class 1)
    original = views[0]
    a = lambda k: math.exp(-beta * (1 - float(original @ k)))
    # class 0, capacity 1 + delta 0: the lowest-entropy of {history, view 0, view 8} is view 8
    positive = torch.tensor([a(views[8]), a(views[9]), 0.0])
    expected = (SCALE * TEXT @ original + alpha * positive).softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-6)
    keys, _, _ = boost.positive.contents(0)  # the stored cache holds history only (view 0 lost to history)
    assert torch.allclose(keys, history[None]) and boost.positive.filled.sum() == 1


def test_delta_widens_the_temporary_capacity():
    views = torch.stack([unit(1, 0.5, 0.3, 0)] * 8 + [unit(1, 0, 0, 0.05), unit(1, 0.02, 0, 0)])
    terms = []
    for delta in (0, 1, 2):
        boost = bound("boostadapter", n_views=10, confident_ratio=0.2, delta=delta, shot_capacity=1, neg_alpha=0.0)
        terms.append(boost.positive_affinity(boost.summarise(views, SCALE * views @ TEXT.T), views, SCALE * views @ TEXT.T))
    q = views[0]
    a = lambda k: math.exp(-5.0 * (1 - float(q @ k)))
    # the history (view 0) was not inserted (summarise only); the cache is empty: capacity 1 + delta
    assert abs(terms[0][0].item() - a(views[8])) < 1e-6
    assert abs(terms[1][0].item() - (a(views[8]) + a(views[9]))) < 1e-6
    assert torch.equal(terms[2], terms[1])


def test_history_modes_and_defaults():
    views = torch.stack([unit(1, 0.9, 0, 0)] + [unit(1, 0.1, 0, 0)] * 9)
    for history, expected in (("original", views[0]), ("confident", views[1])):
        boost = bound("boostadapter", n_views=10, history=history)
        boost.predict_features(views)
        assert torch.allclose(boost.positive.contents(0)[0][0], expected)
    cls = get_method_class("boostadapter")
    assert cls.options_for("imagenet_a") == {"alpha": 2.0, "beta": 5.0, "delta": 3, "n_views": 64,
                                             "augmentation": "rrc_flip", "history": "confident"}
    assert cls.options_for("stanford_cars")["delta"] == 3 and cls.options_for("dtd")["history"] == "original"
    assert len(cls.dataset_defaults) == 15


def test_reset():
    torch.manual_seed(1)
    stream = torch.nn.functional.normalize(torch.randn(12, 10, 4), dim=-1)
    boost = bound("boostadapter", n_views=10)
    first = [boost.predict_features(v) for v in stream]
    boost.reset()
    assert boost.positive.filled.sum() == 0 and boost.negative.filled.sum() == 0
    assert all(torch.equal(x, boost.predict_features(v)) for x, v in zip(first, stream))
