"""The Gradio demo: its callbacks as plain Python, then the served app through gradio_client."""
from __future__ import annotations

import pytest
import torch

from vlmtta import demo
from vlmtta.images import load_image
from vlmtta.methods import base

HOUSE = str(demo.EXAMPLES_DIR / "house.png")
CAR = str(demo.EXAMPLES_DIR / "car.png")
ONLINE = "demo_test_online"


class _CountingOnline(base.Method):
    """Online toy method: its n-th image since reset is predicted as class n-1 (mod C), so state is visible."""

    name = ONLINE
    summary = "test-only online method"
    episodic = False

    def __init__(self, n_views: int = 1, augmentation: str = "rrc_flip", steps: int = 1):
        super().__init__(n_views=n_views, augmentation=augmentation)
        self.steps = steps

    def reset(self) -> None:
        self.seen = 0

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        classes = self.context.text_features.shape[0]
        self.seen += 1
        one_hot = torch.nn.functional.one_hot(torch.tensor((self.seen - 1) % classes), classes).float()
        return one_hot * 0.9 + 0.1 / classes


@pytest.fixture
def online_method():
    base.register(_CountingOnline)
    yield ONLINE
    base._REGISTRY.pop(ONLINE, None)


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    return demo.DemoApp(tiny_model_dir, None, "cpu", fallback=None)


def test_classify_shows_zero_shot_and_method_top5_with_protocol(app):
    result = app.classify(HOUSE, demo.SCENE_CLASSES, "zeroshot", 3, 2)
    assert len(result.before) == len(result.after) == 5
    assert set(result.after) <= set(demo.SCENE_CLASSES.split(", "))
    assert list(result.after.values()) == sorted(result.after.values(), reverse=True)
    assert result.protocol["method"] == "zeroshot" and result.protocol["n_views"] == 3
    assert "steps" not in result.protocol["hyperparameters"]  # zeroshot has no steps: the slider is not passed
    assert "episodic" in result.summary and " ms" in result.summary


def test_method_options_pass_only_what_a_method_accepts(online_method):
    assert demo.method_options("zeroshot", 4, 3) == {"n_views": 4}
    assert demo.method_options(online_method, 4.0, 3) == {"n_views": 4, "steps": 3}
    assert demo.method_info(online_method)[:2] == (1, 1)
    assert (f"{ONLINE} — test-only online method", ONLINE) in demo.method_choices()


@pytest.mark.parametrize("image, classes, method, views, message", [
    (None, "cat, dog", "zeroshot", 1, "No image"),
    (HOUSE, "", "zeroshot", 1, "class list is empty"),
    (HOUSE, "cat, Cat", "zeroshot", 1, "Duplicate class names"),
    (HOUSE, "cat", "zeroshot", 1, "at least two class names"),
    (HOUSE, "cat, dog", "no_such_method", 1, "Unknown method"),
    (HOUSE, "cat, dog", "zeroshot", 0, "Number of views must be a whole number from 1"),
    (HOUSE, "cat, dog", "zeroshot", float("nan"), "Number of views must be a whole number"),
    ("NOT_AN_IMAGE", "cat, dog", "zeroshot", 1, "notes.png is not an image"),
])
def test_bad_input_gives_a_readable_message(app, tmp_path, image, classes, method, views, message):
    if image == "NOT_AN_IMAGE":
        image = tmp_path / "notes.png"
        image.write_text("this is text, not a picture")
    with pytest.raises(ValueError, match=message):
        app.classify({"path": str(image), "orig_name": "notes.png"} if image and image != HOUSE else image,
                     classes, method, views, 1)


def test_images_above_the_size_limits_are_refused(app, monkeypatch):
    monkeypatch.setattr(demo, "MAX_PIXELS", 320 * 240 - 1)
    with pytest.raises(ValueError, match=r"320x240 \(0.1 megapixels\); the limit is"):
        app.classify(HOUSE, "cat, dog", "zeroshot")
    monkeypatch.setattr(demo, "MAX_BYTES", 100)
    with pytest.raises(ValueError, match="the limit is 0 MB"):
        demo.check_image(HOUSE)


def test_stream_keeps_online_state_until_reset_or_new_settings(app, online_method):
    classes = "house, sailboat, car"
    state, note = app.stream(None, [HOUSE, {"path": CAR, "orig_name": "car.png"}], classes, online_method, 1, 1)
    assert [row[3] for row in state.rows] == ["house", "sailboat"] and state.rows[1][1] == "car.png"
    assert "2 image(s) adapted so far" in note
    state, _ = app.stream(state, [HOUSE], classes, online_method, 1, 1)
    assert (state.rows[-1][0], state.rows[-1][3]) == (3, "car")  # the third image: state carried over
    state, note = app.reset(state)
    assert state.rows == [] and "reset" in note
    state, _ = app.stream(state, [HOUSE], classes, online_method, 1, 1)
    assert state.rows[-1][3] == "house"
    state, note = app.stream(state, [HOUSE], "car, house", online_method, 1, 1)
    assert note.startswith("Settings changed") and state.rows[-1][3] == "car"
    with pytest.raises(ValueError, match="No images"):
        app.stream(state, [], classes, online_method)


def test_unloadable_model_falls_back_with_a_notice(tiny_model_dir, tmp_path):
    missing = f"local-dir:{tmp_path}"
    fallback = demo.DemoApp(missing, None, "cpu", fallback=(tiny_model_dir, None))
    assert fallback.model == tiny_model_dir and missing not in fallback.models
    assert "Could not load" in fallback.notice and tiny_model_dir in fallback.notice
    with pytest.raises(FileNotFoundError):
        demo.DemoApp(missing, None, "cpu", fallback=None)
    with pytest.raises(ValueError, match="Unknown model"):
        fallback.backbone("ViT-B-16 (openai)")


def test_examples_and_class_sets_are_usable():
    examples = demo.examples()
    assert len(examples) == 6
    for path, classes in examples:
        assert load_image(path).shape[0] == 3 and len(demo.parse_classes(classes)) >= 5
    sets = demo.class_sets()
    assert len(sets["imagenet"]) == 1000 and set(demo.CROSS_DOMAIN) < set(sets)
    assert demo.parse_classes("\n".join(sets["imagenet"])) == sets["imagenet"]  # shipped duplicates accepted
    assert "ankle boot" in sets["fashion_mnist (testbed)"]


def test_served_app_through_gradio_client(app, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    client_module = pytest.importorskip("gradio_client")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    blocks = demo.build_demo(app=app)
    _, url, _ = blocks.launch(server_name="127.0.0.1", prevent_thread_lock=True, max_file_size=demo.MAX_BYTES)
    try:
        client = client_module.Client(url, verbose=False)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/classify", "/stream", "/reset_stream", "/method_info", "/class_set"} <= set(endpoints)
        before, after, summary, protocol = client.predict(
            client_module.handle_file(HOUSE), demo.SCENE_CLASSES, "zeroshot", 2, 1, app.model, api_name="/classify")
        for label in (before, after):
            assert label["label"] == label["confidences"][0]["label"] and len(label["confidences"]) == 5
        assert protocol["n_views"] == 2 and "zeroshot" in summary
        with pytest.raises(client_module.exceptions.AppError, match="Duplicate class names"):
            client.predict(client_module.handle_file(HOUSE), "cat, cat", "zeroshot", 1, 1, app.model,
                           api_name="/classify")
        table, note = client.predict([client_module.handle_file(HOUSE), client_module.handle_file(CAR)],
                                     demo.SCENE_CLASSES, "zeroshot", 1, 1, app.model, api_name="/stream")
        assert [row[1] for row in table["data"]] == ["house.png", "car.png"] and "episodic" in note
    finally:
        blocks.close()
