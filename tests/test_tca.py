"""TCA: condensation arithmetic, coreset averaging, reservoir, the R = 1 identity, online behaviour."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import bound_method, random_images

from vlmtta.methods import tca
from vlmtta.methods.base import Context

CLASSES = ["cat", "dog", "car", "tree"]


def bind(backbone, **options) -> tca.TCA:
    return bound_method("tca", backbone, CLASSES, **options)


images = random_images


def test_condensation_sizes():
    assert tca.condensation_sizes(196, 1.0) == (196, 0, 0)
    keep, band, rest = tca.condensation_sizes(196, 0.9)  # EViT: 177 kept + 1 fused leave; here 173 + 4 centres + 1
    assert (keep, band, rest) == (173, 16, 7) and keep + 4 + 1 == math.ceil(0.9 * 196) + 1
    assert tca.condensation_sizes(10, 0.7) == (3, 5, 2)  # ceil(7.000000000000001) must not give 8 (+ 1)
    # the official code's counting: Ours-0.035 on 196 patches: left 190, m 7 -> keep 176, band 14, rest 6
    assert tca.condensation_sizes(196, 0.9, code_drop_rate=0.035) == (176, 14, 6)


def tokens_after_each_layer(keep_ratio: float, code_drop_rate: float | None = None, n: int = 196) -> list[int]:
    counts = []
    for _ in range(3):
        keep, band, rest = tca.condensation_sizes(n, keep_ratio, 4, code_drop_rate)
        n = keep + min(4, band) + (1 if rest else 0)
        counts.append(1 + n)  # with CLS
    return counts


def test_paper_mode_is_evits_budget_and_code_mode_the_codes():
    assert tokens_after_each_layer(0.9) == [179, 163, 148]  # EViT at keep rate 0.9 on ViT-B/16's 196 patches
    # the code's Ours-0.035: left = ceil(0.965 n), keep left - 2m, 4 centres, 1 fused
    assert tokens_after_each_layer(1.0, code_drop_rate=0.035) == [182, 167, 155]


def test_coreset_average_hand_computed():
    tokens = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [10.0, 2.0]]])
    out = tca.coreset_average(tokens, 2)
    # centres: token 0 (start), then the farthest: token 3; token 1 joins 0 (w 1/1), token 2 joins 3 (w 1/2)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(out[0, 1], (torch.tensor([10.0, 2.0]) + 0.5 * torch.tensor([10.0, 0.0])) / 1.5)
    assert tca.coreset_average(tokens[:, :1], 4).shape == (1, 1, 2)
    # the official code's random start, here token 3: then the farthest from it is token 0
    out = tca.coreset_average(tokens, 2, start=torch.tensor([3]))
    torch.testing.assert_close(out[0, 0], (torch.tensor([10.0, 2.0]) + 0.5 * torch.tensor([10.0, 0.0])) / 1.5)
    torch.testing.assert_close(out[0, 1], torch.tensor([0.5, 0.0]))


def test_random_kcenter_start_draws_from_the_generator():
    x = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(1))
    attn = torch.rand(2, 2, 8, generator=torch.Generator().manual_seed(2))
    out = tca.condense(x, attn, (2, 4, 2), n_centres=2, generator=torch.Generator().manual_seed(5))
    start = torch.randint(4, (2,), generator=torch.Generator().manual_seed(5))
    band = x[:, 1:].gather(1, attn.mean(1).argsort(dim=1, descending=True, stable=True)[:, 2:6, None].expand(-1, -1, 3))
    torch.testing.assert_close(out[:, 3:5], tca.coreset_average(band, 2, start))


def test_condense_keeps_top_merges_band_fuses_rest():
    x = torch.arange(1 * 9 * 2, dtype=torch.float).view(1, 9, 2)  # CLS + 8 tokens
    attn = torch.tensor([[[0.01, 0.30, 0.02, 0.20, 0.03, 0.10, 0.04, 0.05]]])  # one head
    out = tca.condense(x, attn, (2, 4, 2), n_centres=1)
    assert out.shape == (1, 1 + 2 + 1 + 1, 2)
    torch.testing.assert_close(out[0, 1:3], x[0, [2, 4]])  # the two most attended, best first
    fused = 0.02 * x[0, 3] + 0.01 * x[0, 1]  # the two least attended, weighted by CLS attention
    torch.testing.assert_close(out[0, -1], fused)


def test_reservoir_evicts_low_confidence_low_diversity():
    res = tca.TokenReservoir(n_classes=2, size=2, n_layers=1, width=2, device="cpu")
    res.add(0, torch.tensor([[1.0, 0.0]]), 0.1)
    res.add(0, torch.tensor([[1.0, 0.01]]), 0.2)
    res.add(0, torch.tensor([[0.0, 1.0]]), 0.15)  # diverse: the near-duplicate with higher entropy goes
    assert int(res.count[0]) == 2
    kept = {tuple(v.tolist()) for v in res.cls[0, :2, 0]}
    assert kept == {(1.0, 0.0), (0.0, 1.0)}
    torch.testing.assert_close(res.means[0, 0], torch.tensor([0.5, 0.5]))
    assert res.anchors(2, all_classes=True) is None and res.anchors(2, all_classes=False).shape == (1, 1, 2)
    corr = res.correction(torch.tensor([[1.0, 0.0]]), torch.ones(1), beta=2.0)
    torch.testing.assert_close(corr, torch.tensor([1.0 + math.exp(-2.0), 0.0]))


def test_r1_empty_reservoir_equals_encode_image(tiny_backbone):
    method = bind(tiny_backbone, keep_ratio=1.0, layers=(0, 1))
    batch = images(4)
    out = method.encode(batch)
    with torch.no_grad():
        reference = tiny_backbone.model.encode_image(batch)
    torch.testing.assert_close(out.features, reference, atol=1e-5, rtol=0)
    probs = method.predict_views(batch[:1])
    zeroshot = method.logits(torch.nn.functional.normalize(reference[:1], dim=-1))[0]
    label = int(zeroshot.argmax())  # the correction then only adds lambd * exp(0) to its own class
    zeroshot[label] += method.lambd
    torch.testing.assert_close(probs, zeroshot.softmax(-1), atol=1e-5, rtol=0)


def test_condensation_reduces_tokens_and_anchors_join(tiny_backbone):
    method = bind(tiny_backbone, keep_ratio=0.7, layers=(1,), anchor_all_classes=False, anchor_min_count=1)
    assert method.encode(images(2)).n_tokens == [17, 14]  # CLS + ceil(0.7 * 16 patches) + 1 fused = 1 + 13
    for seed in range(3):
        probs = method.predict_views(images(1, seed))
        assert probs.shape == (4,) and torch.isclose(probs.sum(), torch.tensor(1.0))
    assert len(method.reservoir) == 3 and method._anchors is not None
    with_anchor = method.encode(images(1, 7)).features
    method._anchors = None
    assert not torch.allclose(with_anchor, method.encode(images(1, 7)).features)
    method.reset()
    assert len(method.reservoir) == 0 and method._anchors is None


def test_options_and_defaults():
    assert tca.TCA.options_for("eurosat") == {"reservoir_size": 2, "scale": 5.0, "lambd": 8.0, "beta": 7.0}
    assert tca.TCA.options_for("imagenet_a", keep_ratio=0.7) == {"reservoir_size": 3, "scale": 0.01, "lambd": 3.0,
                                                                 "beta": 5.0, "keep_ratio": 0.7}
    assert tca.TCA.options_for("fgvc_aircraft") == {"reservoir_size": 3, "scale": 0.02, "lambd": 2.0, "beta": 2.0}
    assert tca.TCA.options_for("oxford_pets")["scale"] == 5.5 and tca.TCA.options_for("stanford_cars")["lambd"] == 1.5
    assert len(tca.TCA.dataset_defaults) == 15
    imagenet = {k: v for k, v in tca.TCA().hyperparameters().items() if k in ("reservoir_size", "scale", "lambd", "beta")}
    assert imagenet == tca.TCA.options_for("imagenet") and tca.TCA().kcenter_start == "first"
    with pytest.raises(ValueError, match="kcenter_start"):
        tca.TCA(kcenter_start="best")
    assert tca.TCA.info()["protocol"] == "online"
    with pytest.raises(ValueError, match="keep_ratio"):
        tca.TCA(keep_ratio=0)
    with pytest.raises(ValueError, match="head_reduce"):
        tca.TCA(head_reduce="max")


def test_refuses_non_vit_backbone(tiny_backbone):
    class Fake:
        model = torch.nn.Module()
    Fake.model.visual = torch.nn.Linear(2, 2)
    method = tca.TCA()
    with pytest.raises(TypeError, match="ViT"):
        method.bind(Context(CLASSES, [], torch.eye(4), 100.0, Fake()))


def test_random_kcenter_start_is_seeded_per_stream(tiny_backbone):
    method = bind(tiny_backbone, keep_ratio=0.7, layers=(1,), kcenter_start="random", kcenter_seed=3)
    batch = images(2)
    first = method.encode(batch).features
    method.reset()  # a new stream draws the same starts again
    torch.testing.assert_close(method.encode(batch).features, first, rtol=0, atol=0)
