"""TDA on hand-built feature streams: cache contents, negative band and adjusted logits computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

import vlmtta.methods.tda  # noqa: F401  (registers "tda")
from vlmtta.api import Adapter
from vlmtta.methods import Context, create_method, get_method_class

TEXT = torch.eye(3, 4)  # class c's text feature is e_c (D = 4)
SCALE = 10.0  # a small logit scale keeps entropies away from 0, so the negative band can be reached


def unit(*values: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(values, dtype=torch.float32), dim=0)


def bound(name: str = "tda", scale: float = SCALE, **options):
    method = create_method(name, **options)
    method.bind(Context(["a", "b", "c"], [], TEXT.clone(), scale))
    return method


def entropy(f: torch.Tensor, scale: float = SCALE) -> float:
    p = (scale * TEXT @ f).softmax(-1)
    return float(-(p * p.log()).sum())


def test_positive_cache_keeps_the_lowest_entropy_features_per_class():
    tda = bound(shot_capacity=2)
    stream = [unit(1, 0.5, 0, 0), unit(1, 0.1, 0, 0), unit(1, 0.7, 0, 0.1), unit(1, 0, 0, 0.2), unit(0, 1, 0.3, 0)]
    for f in stream:
        tda.predict_features(f[None])
    keys, ents, _ = tda.positive.contents(0)
    by_entropy = sorted(stream[:4], key=entropy)[:2]  # class 0 keeps its two most confident images
    assert torch.allclose(keys, torch.stack(by_entropy))
    assert ents.tolist() == pytest.approx([entropy(f) for f in by_entropy], rel=1e-4)
    assert torch.allclose(tda.positive.contents(1)[0], stream[4][None])
    assert tda.positive.filled.sum() == 3


def test_negative_band_and_mask():
    tda = bound()
    log2c = math.log2(3)
    confident, uncertain = unit(1, 0.05, 0, 0), unit(1, 0.8, 0.1, 0)
    assert entropy(confident) / log2c < 0.2 < entropy(uncertain) / log2c < 0.5
    tda.predict_features(confident[None])
    assert tda.negative.filled.sum() == 0  # below the band
    tda.predict_features(uncertain[None])
    keys, _, values = tda.negative.contents(0)
    assert torch.allclose(keys, uncertain[None])
    probs = (SCALE * TEXT @ uncertain).softmax(-1)
    assert values[0].tolist() == ((probs > 0.03) & (probs < 1.0)).float().tolist()
    assert values[0].tolist() == [1.0, 1.0, 0.0]  # p_c is below 0.03


def test_entropy_normalisation_option():
    f = unit(1, 1.0, 0, 0)  # H / log2(3) in the band, H / ln(3) above it
    h = entropy(f)
    assert 0.2 < h / math.log2(3) < 0.5 < h / math.log(3)
    for norm, stored in (("log2", 1), ("log", 0)):
        tda = bound(neg_entropy_norm=norm)
        tda.predict_features(f[None])
        assert tda.negative.filled.sum() == stored
    with pytest.raises(ValueError, match="neg_entropy_norm"):
        create_method("tda", neg_entropy_norm="bits")


def test_adjusted_logits_by_hand():
    alpha, beta, neg_alpha, neg_beta = 2.0, 5.0, 0.117, 1.0
    tda = bound(alpha=alpha, beta=beta, neg_alpha=neg_alpha, neg_beta=neg_beta)
    f1, f2, f3 = unit(1, 0.8, 0.1, 0), unit(0.1, 1, 0, 0.3), unit(1, 0.6, 0, 0.2)
    for f in (f1, f2):
        tda.predict_features(f[None])
    probs = tda.predict_features(f3[None])
    a = lambda f, k, b: math.exp(-b * (1 - float(f @ k)))
    clip = SCALE * TEXT @ f3
    positive = torch.tensor([a(f3, f1, beta) + a(f3, f3, beta), a(f3, f2, beta), 0.0])
    # negative cache: f1 and f3 are in the band (class 0); f2 is too confident
    assert [entropy(f) / math.log2(3) for f in (f1, f2, f3)][1] < 0.2
    mask = lambda f: ((SCALE * TEXT @ f).softmax(-1) > 0.03).float()
    negative = a(f3, f1, neg_beta) * mask(f1) + a(f3, f3, neg_beta) * mask(f3)
    expected = (clip + alpha * positive - neg_alpha * negative).softmax(-1)
    assert torch.allclose(probs, expected, atol=1e-6)


def test_confident_view_averaging():
    tda = bound(n_views=4, confident_ratio=0.5)
    views = torch.stack([unit(1, 0.9, 0, 0), unit(1, 0.05, 0, 0), unit(1, 0.9, 0.9, 0), unit(1, 0.2, 0, 0.1)])
    tda.predict_features(views)
    logits = SCALE * views @ TEXT.T
    keep = [1, 3]  # the two lowest-entropy views
    keys, ents, _ = tda.positive.contents(0)
    assert torch.allclose(keys[0], views[keep].mean(0))  # mean feature, not renormalised
    mean_p = logits[keep].softmax(-1).mean(0)
    assert ents[0].item() == pytest.approx(float(-(mean_p * mean_p.log()).sum()), rel=1e-4)


def test_reset_restores_the_initial_state_exactly():
    torch.manual_seed(0)
    stream = torch.nn.functional.normalize(torch.randn(30, 4), dim=-1)
    tda, fresh = bound(), bound()
    first = [tda.predict_features(f[None]) for f in stream]
    tda.reset()
    for cache, clean in ((tda.positive, fresh.positive), (tda.negative, fresh.negative)):
        for name in ("keys", "entropy", "values"):
            assert torch.equal(getattr(cache, name), getattr(clean, name))
    again = [tda.predict_features(f[None]) for f in stream]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert not torch.equal(first[-1], (SCALE * TEXT @ stream[-1]).softmax(-1))  # the caches did act


def test_online_through_the_adapter_and_dataset_defaults():
    adapter = Adapter.from_features(["a", "b", "c"], TEXT, "tda", logit_scale=SCALE)
    assert adapter.method.protocol == "online"
    adapter.adapt_features(unit(1, 0.3, 0, 0)[None])
    adapter.adapt_features(unit(1, 0.2, 0, 0)[None])
    assert adapter.method.positive.filled.sum() == 2  # kept across steps
    adapter.reset()
    assert adapter.method.positive.filled.sum() == 0
    cls = get_method_class("tda")
    keys = {"caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
            "stanford_cars", "sun397", "ucf101", "imagenet", "imagenet_a", "imagenet_v2", "imagenet_r",
            "imagenet_sketch"}
    assert set(cls.dataset_defaults) == keys
    assert cls.options_for("imagenet_sketch") == {"alpha": 2.363, "beta": 7.45, "n_views": 64, "augmentation": "augmix"}
    assert cls.options_for("eurosat", alpha=1.0) == {"alpha": 1.0, "beta": 8.0, "n_views": 1}
    assert {k: cls.defaults()[k] for k in ("alpha", "beta", "n_views")} == {"alpha": 2.0, "beta": 5.0, "n_views": 1}
