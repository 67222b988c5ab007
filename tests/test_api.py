"""Public API: predict on every input type, Adapter streams, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vlmtta
from vlmtta.images import ImageLoadError

CLASSES = ["cat", "dog", "car", "tree"]


@pytest.fixture
def run(tiny_model_dir):
    def call(image, classes=CLASSES, **kwargs):
        kwargs.setdefault("device", "cpu")
        kwargs.setdefault("method", "zeroshot")
        return vlmtta.predict(image, classes, model=tiny_model_dir, pretrained=None, **kwargs)
    return call


def test_predict_every_input_type(run, rgb_image, tmp_path):
    path = tmp_path / "img.png"
    rgb_image.save(path)
    array = np.asarray(rgb_image)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)
    results = [run(x) for x in (path, str(path), rgb_image, array, tensor, tensor.float() / 255)]
    for result in results:
        assert result.probabilities == pytest.approx(results[0].probabilities, abs=1e-6)
    first = results[0]
    assert list(first.probabilities) == CLASSES
    assert sum(first.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert first.label == max(first.probabilities, key=first.probabilities.get) == CLASSES[first.index]
    assert [p for _, p in first.top] == sorted(first.probabilities.values(), reverse=True)
    assert first.method == "zeroshot" and first.elapsed_s > 0


def test_predict_matches_manual_zero_shot(run, rgb_image, tiny_backbone):
    from vlmtta.images import load_image
    from vlmtta.views import original_view

    pixels = original_view(load_image(rgb_image), tiny_backbone.image_size, tiny_backbone.mean, tiny_backbone.std)
    with torch.no_grad():
        image = torch.nn.functional.normalize(tiny_backbone.model.encode_image(pixels), dim=-1)
    text = tiny_backbone.class_embeddings(CLASSES)
    expected = (tiny_backbone.logit_scale * image @ text.t()).softmax(-1)[0]
    got = torch.tensor(list(run(rgb_image).probabilities.values()))
    assert torch.allclose(got, expected, atol=1e-5)


def test_backbone_is_reused(run, rgb_image, tiny_model_dir):
    run(rgb_image)
    first = vlmtta.load_backbone(tiny_model_dir, None, "cpu")
    run(rgb_image, ["x", "y"])
    assert vlmtta.load_backbone(tiny_model_dir, None, "cpu") is first


def test_top_k_and_templates(run, rgb_image):
    result = run(rgb_image, top_k=2, templates="ensemble7")
    assert len(result.top) == 2
    assert run(rgb_image, method="ensemble").probabilities == pytest.approx(result.probabilities, abs=1e-6)


def test_views_are_seeded(run, rgb_image):
    a = run(rgb_image, n_views=8, seed=1).probabilities
    assert run(rgb_image, n_views=8, seed=1).probabilities == a
    assert run(rgb_image, n_views=8, seed=2).probabilities != a


def test_adapter_stream_and_reset(tiny_backbone, rgb_image):
    adapter = vlmtta.Adapter(CLASSES, "zeroshot", backbone=tiny_backbone, n_views=4, seed=3)
    first = adapter.step(rgb_image)
    second = adapter.step(rgb_image)  # next views seed
    assert adapter.steps == 2 and first.probabilities != second.probabilities
    adapter.reset()
    assert adapter.step(rgb_image).probabilities == first.probabilities
    protocol = adapter.protocol()
    assert protocol["protocol"] == "episodic" and protocol["n_views"] == 4 and protocol["seed"] == 3
    assert protocol["templates"] == ["a photo of a {}."] and protocol["hyperparameters"]["n_views"] == 4


def test_one_pixel_image(run):
    assert run(np.full((1, 1, 3), 200, dtype=np.uint8), n_views=4).label in CLASSES


@pytest.mark.parametrize("kwargs, error, message", [
    ({"classes": []}, ValueError, "empty"),
    ({"classes": ["cat", "Cat"]}, ValueError, "Duplicate"),
    ({"method": "tpt2"}, ValueError, "Unknown method 'tpt2'"),
    ({"n_veiws": 4}, ValueError, "Unknown option"),
    ({"device": "gpu0"}, ValueError, "Unknown device 'gpu0'"),
    ({"templates": "nope"}, ValueError, "Unknown template set"),
])
def test_bad_arguments(run, rgb_image, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(rgb_image, **kwargs)


def test_bad_image_loses_nothing(tiny_backbone, rgb_image, tmp_path):
    adapter = vlmtta.Adapter(CLASSES, "zeroshot", backbone=tiny_backbone)
    with pytest.raises(ImageLoadError, match="not found"):
        adapter.step(tmp_path / "missing.jpg")
    assert adapter.steps == 0 and adapter.step(rgb_image).label in CLASSES


def test_long_class_name_is_truncated_with_warning(run, rgb_image):
    with pytest.warns(UserWarning, match="truncated"):
        result = run(rgb_image, ["cat", "a " + "very " * 100 + "long class name"])
    assert len(result.probabilities) == 2


def test_adapter_on_precomputed_features(tiny_backbone, rgb_image):
    """from_features + step_features gives what the full adapter gives on the same features."""
    full = vlmtta.Adapter(CLASSES, "zeroshot", backbone=tiny_backbone)
    text = tiny_backbone.class_embeddings(CLASSES)
    features_only = vlmtta.Adapter.from_features(CLASSES, text * 3, "zeroshot", logit_scale=tiny_backbone.logit_scale)
    from vlmtta.images import load_image
    from vlmtta.views import make_views

    views = make_views(load_image(rgb_image), full.view_config, seed=0)
    features = tiny_backbone.encode_images(views)
    assert features_only.step_features(features).probabilities == pytest.approx(full.step(rgb_image).probabilities,
                                                                                 abs=1e-6)
    assert features_only.protocol()["features"] == "precomputed" and features_only.steps == 1
    with pytest.raises(ValueError, match="step_features"):
        features_only.step(rgb_image)
    with pytest.raises(ValueError, match="must be \\[C, D\\] with C = 4"):
        vlmtta.Adapter.from_features(CLASSES, text[:3])


def test_step_batch_uses_the_method_batch_protocol(tiny_backbone, rgb_image):
    from vlmtta.methods import Method, register

    @register
    class Batched(Method):
        name = "test-batched"
        episodic = False

        def predict_batch(self, images):
            self.seen = images.shape
            return torch.eye(len(self.context.classnames))[[1] * images.shape[0]]

    adapter = vlmtta.Adapter(CLASSES, "test-batched", backbone=tiny_backbone)
    results = adapter.step_batch([rgb_image, np.asarray(rgb_image), rgb_image])
    assert [r.label for r in results] == ["dog"] * 3 and adapter.steps == 3
    assert adapter.method.seen == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="has no batch protocol"):
        vlmtta.Adapter(CLASSES, backbone=tiny_backbone).step_batch([rgb_image])


def test_default_method_is_sts(tiny_model_dir, rgb_image):
    import inspect

    assert inspect.signature(vlmtta.predict).parameters["method"].default == "sts"
    assert inspect.signature(vlmtta.Adapter).parameters["method"].default == "sts"
    result = vlmtta.predict(rgb_image, CLASSES, model=tiny_model_dir, pretrained=None, device="cpu")
    assert result.method == "sts" and result.label in CLASSES
