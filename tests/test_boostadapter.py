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


def test_single_view_with_tdas_negative_rule_is_exactly_tda():
    torch.manual_seed(0)
    stream = torch.nn.functional.normalize(torch.randn(40, 4), dim=-1)
    boost, tda = bound("boostadapter", n_views=1, neg_eviction="entropy"), bound("tda")
    for f in stream:
        assert torch.equal(boost.predict_features(f[None]), tda.predict_features(f[None]))


def official_single_view(stream: torch.Tensor, text: torch.Tensor, fifo: bool, alpha=2.0, beta=5.0,
                         neg_alpha=0.117, neg_beta=1.0) -> list[torch.Tensor]:
    """The official runner's per-image loop on one view, with Python lists: the positive cache keeps each
    class's 3 lowest-entropy images; the negative cache takes images whose entropy / log2(C) is in (0.2, 0.5),
    2 per class, either first-in-first-out (``update_cache``'s ``fifo=True`` default) or lowest-entropy (TDA)."""
    n_classes = text.shape[0]
    positive: dict[int, list] = {}
    negative: dict[int, list] = {}
    out = []
    for f in stream:
        logits = SCALE * f @ text.T
        probs = logits.softmax(-1)
        entropy = float(-(probs * probs.log()).sum())
        pred = int(logits.argmax())
        positive[pred] = sorted(positive.get(pred, []) + [(f, entropy)], key=lambda item: item[1])[:3]
        if 0.2 < entropy / math.log2(n_classes) < 0.5:
            entries = negative.get(pred, []) + [(f, entropy, probs)]
            negative[pred] = entries[-2:] if fifo else sorted(entries, key=lambda item: item[1])[:2]
        final = logits.clone()
        for label, entries in positive.items():
            for key, _ in entries:
                final[label] += alpha * math.exp(-beta * (1 - float(f @ key)))
        for entries in negative.values():
            for key, _, p in entries:
                final -= neg_alpha * math.exp(-neg_beta * (1 - float(f @ key))) * ((p > 0.03) & (p < 1.0)).float()
        out.append(final.softmax(-1))
    return out


def test_negative_cache_is_first_in_first_out_as_the_official_runner():
    g = torch.Generator().manual_seed(0)
    n_classes, dim = 5, 8
    text = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    labels = torch.randint(0, n_classes, (150,), generator=g)
    stream = torch.nn.functional.normalize(text[labels] + 0.35 * torch.randn(150, dim, generator=g), dim=-1)
    fifo, lowest = official_single_view(stream, text, fifo=True), official_single_view(stream, text, fifo=False)
    assert max(float((a - b).abs().max()) for a, b in zip(fifo, lowest)) > 1e-3  # the stream tells the rules apart
    for options, reference in (({}, fifo), ({"neg_eviction": "entropy"}, lowest)):
        method = create_method("boostadapter", n_views=1, **options)
        method.bind(Context([f"c{i}" for i in range(n_classes)], [], text, SCALE))
        got = torch.stack([method.predict_features(f[None]) for f in stream])
        assert torch.allclose(got, torch.stack(reference), atol=1e-5), options
    assert create_method("boostadapter").neg_eviction == "fifo" and create_method("tda").neg_eviction == "entropy"


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
