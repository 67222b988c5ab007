"""DMN: dynamic memory filling/replacement, similarity-weighted readout and fusion by hand, static support memory."""
from __future__ import annotations

import math

import pytest
import torch

import vlmtta.methods.dmn  # noqa: F401  (registers "dmn")
from vlmtta.api import Adapter
from vlmtta.images import load_image
from vlmtta.methods import Context, create_method, get_method_class
from vlmtta.views import original_view

TEXT = torch.eye(3, 4)
SCALE = 10.0


def unit(*values: float) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(values, dtype=torch.float32), dim=0)


def bound(scale: float = SCALE, backbone=None, text: torch.Tensor = TEXT, **options):
    method = create_method("dmn", **options)
    method.bind(Context([f"c{i}" for i in range(text.shape[0])], [], text.clone(), scale, backbone))
    return method


def entropy(f: torch.Tensor) -> float:
    p = (SCALE * TEXT @ f).softmax(-1)
    return float(-(p * p.log()).sum())


def readout(q: torch.Tensor, slots: list[list[torch.Tensor]], beta: float = 5.5) -> torch.Tensor:
    """softmax over classes of scale * cos(q, sum_s exp(-beta (1 - q.s)) s)."""
    protos = []
    for class_slots in slots:
        proto = sum(math.exp(-beta * (1 - float(q @ s))) * s for s in class_slots)
        protos.append(torch.nn.functional.normalize(proto, dim=0))
    return (SCALE * torch.stack(protos) @ q).softmax(-1)


def test_memory_fills_by_pseudo_label_and_replaces_the_highest_entropy():
    dmn = bound(n_views=1, memory_size=2)
    stream = [unit(1, 0.5, 0, 0), unit(1, 0.2, 0, 0), unit(1, 0.8, 0, 0), unit(1, 0, 0.1, 0), unit(0.2, 1, 0, 0)]
    for f in stream:
        dmn.predict_features(f[None])
    keys, ents, _ = dmn.dynamic.contents(0)
    kept = sorted(stream[:4], key=entropy)[:2]
    assert torch.allclose(keys, torch.stack(kept))
    assert ents.tolist() == pytest.approx([entropy(f) for f in kept], rel=1e-4)
    assert torch.allclose(dmn.dynamic.contents(1)[0], stream[4][None])


def test_pseudo_label_from_confident_views_stores_the_original_view():
    dmn = bound(n_views=4, confident_ratio=0.5)
    views = torch.stack([unit(1, 1.1, 0, 0), unit(0.1, 1, 0, 0), unit(1, 0, 0, 0), unit(1, 0.05, 0, 0)])
    dmn.predict_features(views)  # view 0 says class 1; the two most confident (2, 3) say class 0
    keys, ents, _ = dmn.dynamic.contents(0)
    assert torch.allclose(keys, views[:1])  # the original view's feature, under the confident pseudo-label
    mean_p = (SCALE * views[[2, 3]] @ TEXT.T).softmax(-1).mean(0)
    assert ents[0].item() == pytest.approx(float(-(mean_p * mean_p.log()).sum()), rel=1e-4)


def test_readout_and_fusion_by_hand():
    dmn = bound(n_views=1, text_weight=1.0, dynamic_weight=2.0)
    f1, f2, f3 = unit(1, 0.3, 0, 0.2), unit(0.2, 1, 0, 0.4), unit(1, 0.5, 0, 0.5)
    dmn.predict_features(f1[None])
    dmn.predict_features(f2[None])
    probs = dmn.predict_features(f3[None])  # f3 -> class 0, stored before the readout
    text = list(TEXT)
    dynamic = readout(f3, [[text[0], f1, f3], [text[1], f2], [text[2]]])
    expected = (1.0 * (SCALE * TEXT @ f3).softmax(-1) + 2.0 * dynamic) / 3.0
    assert torch.allclose(probs, expected, atol=1e-6)
    assert probs.sum().item() == pytest.approx(1.0)


def test_zero_dynamic_weight_is_zero_shot():
    dmn = bound(n_views=1, dynamic_weight=0.0)
    f = unit(1, 0.7, 0.2, 0)
    assert torch.allclose(dmn.predict_features(f[None]), (SCALE * TEXT @ f).softmax(-1))


def test_static_memory_from_support_features():
    support = torch.stack([unit(1, 0, 0, 1), unit(0, 1, 1, 0), unit(1, 0, 0, 0.5)])
    dmn = bound(n_views=1, support=(support, [0, 2, 0]))
    assert dmn.static.filled.tolist() == [[True, True], [False, False], [True, False]]
    q = unit(1, 0.2, 0.3, 0.6)
    probs = dmn.predict_features(q[None])
    text = list(TEXT)
    static = readout(q, [[text[0], support[0], support[2]], [text[1]], [text[2], support[1]]])
    dynamic = readout(q, [[text[0], support[0], support[2], q], [text[1]], [text[2], support[1]]])
    expected = ((SCALE * TEXT @ q).softmax(-1) + dynamic + static) / 3.0
    assert torch.allclose(probs, expected, atol=1e-6)
    assert dmn.hyperparameters()["support"] == "3 labelled samples"
    dmn.reset()
    assert dmn.dynamic.filled.sum() == 0 and dmn.static.filled.sum() == 3  # reset keeps the labelled memory
    with pytest.raises(ValueError, match="labels"):
        bound(support=(support, [0, 5, 0]))
    with pytest.raises(ValueError, match="support"):
        bound(support=(support, [0, 1]))


def test_support_images_are_encoded_with_the_backbone(tiny_backbone, rgb_image):
    classes = ["cat", "dog"]
    text = tiny_backbone.class_embeddings(classes, ["a photo of a {}."])
    image = torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8)
    dmn = bound(backbone=tiny_backbone, text=text, n_views=1, support=([rgb_image, image], [1, 0]))
    expected = tiny_backbone.encode_images(torch.cat([
        original_view(t, tiny_backbone.image_size, tiny_backbone.mean, tiny_backbone.std)
        for t in (load_image(rgb_image), image)]))
    assert torch.allclose(dmn.static.keys[1, 0], expected[0], atol=1e-5)
    assert torch.allclose(dmn.static.keys[0, 0], expected[1], atol=1e-5)
    with pytest.raises(ValueError, match="model itself"):
        Adapter.from_features(classes, text, "dmn", support=([image], [0]))


def test_reset_restores_the_initial_state_exactly():
    torch.manual_seed(0)
    stream = torch.nn.functional.normalize(torch.randn(25, 4, 4), dim=-1)
    dmn, fresh = bound(n_views=4), bound(n_views=4)
    first = [dmn.predict_features(v) for v in stream]
    dmn.reset()
    for name in ("keys", "entropy", "values"):
        assert torch.equal(getattr(dmn.dynamic, name), getattr(fresh.dynamic, name))
    assert all(torch.equal(x, dmn.predict_features(v)) for x, v in zip(first, stream))


def test_defaults():
    cls = get_method_class("dmn")
    assert cls.options_for("imagenet_r") == {"n_views": 32, "augmentation": "rrc_flip"}
    assert cls.options_for("dtd") == {"n_views": 32, "augmentation": "augmix"}
    assert len(cls.dataset_defaults) == 15
    defaults = cls.defaults()
    assert (defaults["memory_size"], defaults["beta"], defaults["n_views"]) == (50, 5.5, 32)
    assert (defaults["text_weight"], defaults["dynamic_weight"], defaults["static_weight"]) == (1.0, 1.0, 1.0)


def dense_predict(dmn, features: torch.Tensor) -> torch.Tensor:
    """The previous formulation: every one of the C x memory_size slots is read (empty ones with weight 0)."""
    from vlmtta.entropy import marginal_entropy, marginal_log_probs, select_confident
    from vlmtta.memory import affinity, weighted_prototypes

    logits = dmn.logits(features)
    confident = logits[select_confident(logits, dmn.confident_ratio)]
    dmn.dynamic.insert(marginal_log_probs(confident).argmax(), features[0], marginal_entropy(confident))
    q, text, scale = features[0], dmn.context.text_features, dmn.context.logit_scale
    fixed = affinity(q, text, dmn.beta)[:, None] * text
    if dmn.static is not None:
        fixed = fixed + weighted_prototypes(dmn.static.keys, dmn.static.affinity(q, dmn.beta))
    dynamic = fixed + weighted_prototypes(dmn.dynamic.keys, dmn.dynamic.affinity(q, dmn.beta))

    def readout(prototypes):
        return (scale * torch.nn.functional.normalize(prototypes, dim=-1) @ q).softmax(-1)

    probs = dmn.text_weight * logits[0].softmax(-1) + dmn.dynamic_weight * readout(dynamic)
    total = dmn.text_weight + dmn.dynamic_weight
    if dmn.static is not None:
        probs, total = probs + dmn.static_weight * readout(fixed), total + dmn.static_weight
    return probs / total


@pytest.mark.parametrize("with_support", [False, True])
def test_readout_of_filled_slots_equals_the_dense_readout(with_support):
    gen = torch.Generator().manual_seed(0)
    n_classes, dim = 9, 16
    text = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=gen), dim=-1)
    centres = text[torch.randint(0, 4, (80,), generator=gen)]  # most classes never get an entry
    stream = torch.nn.functional.normalize(centres[:, None] + 0.4 * torch.randn(80, 4, dim, generator=gen), dim=-1)
    support = None
    if with_support:
        support = (torch.nn.functional.normalize(torch.randn(5, dim, generator=gen), dim=-1), [0, 3, 3, 8, 5])
    fast = bound(scale=50.0, text=text, n_views=4, memory_size=3, support=support, dynamic_weight=2.0)
    dense = bound(scale=50.0, text=text, n_views=4, memory_size=3, support=support, dynamic_weight=2.0)
    for views in stream:
        got, want = fast.predict_features(views), dense_predict(dense, views)
        assert torch.allclose(got, want, rtol=0, atol=1e-6) and int(got.argmax()) == int(want.argmax())
    filled = fast.dynamic.filled
    assert 0 < int(filled.sum()) < filled.numel() and torch.equal(fast.dynamic.keys, dense.dynamic.keys)
    index, classes = fast.dynamic.filled_slots()
    assert torch.equal(index, filled.flatten().nonzero().squeeze(1)) and torch.equal(classes, filled.nonzero()[:, 0])
