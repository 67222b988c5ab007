"""Many images at once (``Method.predict_*_many``, ``Adapter.step_many``) equal one image at a time."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtta import Adapter
from vlmtta.methods import Need, get_method_class, method_names

CLASSES = ["cat", "dog", "car", "tree", "boat"]
FEATURE_ONLY = [n for n in method_names()  # vlmtta's own methods (tests register others of their own)
                if get_method_class(n).needs == frozenset({Need.VIEW_FEATURES})
                and get_method_class(n).__module__.startswith("vlmtta.")]


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (36 + k, 40, 3), dtype=np.uint8), "RGB") for k in range(n)]


@pytest.mark.parametrize("name", FEATURE_ONLY)
def test_features_many_equals_one_at_a_time(name):
    from conftest import clustered_features

    from vlmtta.methods import Context, create_method

    text, feats = clustered_features(6 * 4, 5, 16, noise=0.6)
    feats = feats.reshape(6, 4, 16)
    methods = []
    for _ in range(2):
        method = create_method(name, n_views=4) if "n_views" in get_method_class(name).defaults() else \
            create_method(name)
        method.bind(Context([f"c{i}" for i in range(5)], [], text, 100.0))
        methods.append(method)
    one = torch.stack([methods[0]._one_image(lambda f=f: methods[0].predict_features(f)) for f in feats])
    many = methods[1].predict_features_many(feats)
    assert many.shape == (6, 5)
    torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["zeroshot", "tpt", "tda"])
def test_step_many_equals_step(tiny_model_dir, name):
    images = _images(3)
    kwargs = dict(model=tiny_model_dir, pretrained=None, device="cpu", seed=7)
    options = {"n_views": 4} if name == "tpt" else {}
    one, many = Adapter(CLASSES, name, **kwargs, **options), Adapter(CLASSES, name, **kwargs, **options)
    expected = [one.step(image) for image in images]
    got = many.step_many(images)
    assert [p.index for p in got] == [p.index for p in expected]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(list(g.probabilities.values()), list(e.probabilities.values()), rtol=1e-4, atol=1e-5)
    assert many.steps == one.steps == 3


def test_many_shapes_are_checked():
    text = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    adapter = Adapter.from_features(CLASSES, text, "zeroshot")
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        adapter.adapt_features_many(torch.randn(4, 8))
    with pytest.raises(ValueError, match="precomputed features"):
        adapter.step_many([])
