"""Gradio demo: zero-shot and test-time-adapted top-5 side by side, plus a stream tab for online methods.

Run ``vlmtta demo`` or ``python -m vlmtta.demo [--model ViT-B-16 --pretrained openai --port 7860 --share]``
(needs the ``demo`` extra).  When the model cannot be loaded (no network, no cached weights) the
demo starts on the bundled testbed model and says so at the top of the page.

``DemoApp`` holds every callback as plain Python (testable without a server); ``build_demo`` only
lays them out as Gradio Blocks.  Concurrency: the stream tab keeps one ``Adapter`` per browser
session in ``gr.State``, so sessions never share adaptation state, and every event that runs the
model joins one queue slot (``concurrency_id="model"``, limit 1), so the shared backbone, whose
weights some methods adapt in place, serves one request at a time.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError

from .api import DEFAULT_MODEL, DEFAULT_PRETRAINED, Adapter
from .backbone import AUTO_WEIGHTS, DEFAULT_TAG, MODEL_ALIASES, RANDOM_WEIGHTS, FrozenCLIP, load_backbone
from .images import ImageLoadError
from .methods import get_method_class, list_methods, method_names
from .prompts import dataset_classnames, parse_classes

log = logging.getLogger(__name__)

TESTBED = ("vlmtta-testbed", None)
MAX_PIXELS = 20_000_000
MAX_BYTES = 25 * 1024 * 1024
MAX_VIEWS, MAX_STEPS, TOP_K = 128, 10, 5
STEP_OPTIONS = ("steps", "tta_steps", "n_steps")  # the first one a method accepts is the "steps" slider
PREFERRED_METHODS = ("tpt", "tda", "mta", "zero", "ensemble", "zeroshot")
CROSS_DOMAIN = ("caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
                "stanford_cars", "sun397", "ucf101")
FASHION_MNIST = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
SCENE_CLASSES = "house, sailboat, car, tree, bicycle, dog"
STREAM_HEADERS = ["#", "image", "zero-shot", "adapted", "p(adapted)", "ms"]


@dataclass
class Result:
    """What one click on "Classify" shows."""

    before: dict[str, float]  # zero-shot top-5
    after: dict[str, float]  # the chosen method's top-5
    summary: str  # markdown: labels, times, protocol in one line
    protocol: dict[str, Any]  # Adapter.protocol() of the chosen method


@dataclass
class StreamState:
    """One session's stream: its adapter, the settings it was built for, the rows shown so far."""

    adapter: Adapter | None = None
    key: tuple = ()
    rows: list[list[Any]] = field(default_factory=list)


# ---- input checks (pure) ------------------------------------------------------------------------
def upload_path(value: Any) -> tuple[str, str] | None:
    """(path, display name) of an upload given as a path, a Gradio file dict or file object; None if empty."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        path, name = value.get("path"), value.get("orig_name")
    else:
        path, name = getattr(value, "path", value), getattr(value, "orig_name", None)
    if not path:
        return None
    return str(path), str(name or Path(str(path)).name)


def check_image(value: Any) -> tuple[str, str]:
    """(path, name) of an uploaded image; a readable ``ValueError`` when missing, unreadable or too large."""
    upload = upload_path(value)
    if upload is None:
        raise ValueError("No image: upload one, paste it, take a webcam picture or pick an example.")
    path, name = upload
    if not Path(path).is_file():
        raise ImageLoadError(f"{name}: the uploaded file is gone; upload it again.")
    size = Path(path).stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"{name} is {size / 2**20:.1f} MB; the limit is {MAX_BYTES / 2**20:.0f} MB.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise ValueError(f"{name} is far larger than the {MAX_PIXELS / 1e6:.0f}-megapixel limit.") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise ImageLoadError(f"{name} is not an image (JPEG, PNG, WebP, BMP, TIFF, GIF, ... are accepted).") from None
    if width * height > MAX_PIXELS:
        raise ValueError(f"{name} is {width}x{height} ({width * height / 1e6:.1f} megapixels); "
                         f"the limit is {MAX_PIXELS / 1e6:.0f} megapixels.")
    return path, name


def _count(label: str, value: Any, limit: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a whole number, got {value!r}.") from None
    if not math.isfinite(number) or number != int(number) or not 1 <= number <= limit:
        raise ValueError(f"{label} must be a whole number from 1 to {limit}, got {value!r}.")
    return int(number)


def method_options(method: str, n_views: Any = None, steps: Any = None) -> dict[str, int]:
    """The view/step options ``method`` accepts (others are dropped: a method without steps ignores the slider)."""
    defaults = get_method_class(method).defaults()
    options = {}
    if "n_views" in defaults and n_views is not None:
        options["n_views"] = _count("Number of views", n_views, MAX_VIEWS)
    step_key = next((key for key in STEP_OPTIONS if key in defaults), None)
    if step_key and steps is not None:
        options[step_key] = _count("Steps", steps, MAX_STEPS)
    return options


def method_choices() -> list[tuple[str, str]]:
    """(``name — summary``, name) for every registered method."""
    return [(f"{m['name']} — {m['summary']}" if m["summary"] else m["name"], m["name"]) for m in list_methods()]


def default_method() -> str:
    names = method_names()
    return next((name for name in PREFERRED_METHODS if name in names), names[0])


def method_info(method: str) -> tuple[int | None, int | None, str]:
    """The method's default views and steps (None when it has no such option) and a one-line description."""
    info = get_method_class(method).info()
    defaults = info["defaults"]
    steps = next((defaults[key] for key in STEP_OPTIONS if key in defaults), None)
    text = f"**{info['name']}** · {info['protocol']}" + (f" · {info['paper']}" if info["paper"] else "")
    return defaults.get("n_views"), steps, text


def testbed_classes() -> list[str]:
    try:
        from .testbed.fashion_mnist import CLASSNAMES
    except ImportError:
        return list(FASHION_MNIST)
    return list(CLASSNAMES)


def class_sets() -> dict[str, list[str]]:
    """Ready-made class lists: ImageNet, the 10 cross-domain datasets and the testbed's (Fashion-MNIST)."""
    sets = {name: dataset_classnames(name) for name in ("imagenet", *CROSS_DOMAIN)}
    return {**sets, "fashion_mnist (testbed)": testbed_classes()}


def examples() -> list[list[str]]:
    """[image path, class text] of the shipped example images that exist."""
    fashion = ", ".join(testbed_classes())
    picks = [("house.png", SCENE_CLASSES), ("sailboat.png", SCENE_CLASSES), ("car.png", SCENE_CLASSES),
             ("fashion_ankle_boot.png", fashion), ("fashion_trouser.png", fashion), ("fashion_bag.png", fashion)]
    return [[str(EXAMPLES_DIR / name), classes] for name, classes in picks if (EXAMPLES_DIR / name).is_file()]


# ---- model loading --------------------------------------------------------------------------------
def model_label(model: str, pretrained: str | None) -> str:
    if pretrained == AUTO_WEIGHTS:  # an architecture's default tag; other models carry their own weights
        pretrained = DEFAULT_TAG if ":" not in model and model not in MODEL_ALIASES else None
    return model if pretrained in RANDOM_WEIGHTS else f"{model} ({pretrained})"


def _load(model: str, pretrained: str | None, device: str) -> FrozenCLIP:
    return load_backbone(model, pretrained, device)  # offline, fails at once (see vlmtta.backbone._hub_access)


def _short(error: Exception, limit: int = 240) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


class DemoApp:
    """The demo's callbacks as plain Python; bad input raises ``ValueError`` with a readable message.

    Args:
        model, pretrained, device: the backbone to start on (see ``vlmtta.load_backbone``).
        fallback: (model, pretrained) used, with a notice, when ``model`` cannot be loaded; None to fail instead.
    """

    def __init__(self, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, device: str = "auto",
                 fallback: tuple[str, str | None] | None = TESTBED):
        self.device, self.notice = device, ""
        self.models: dict[str, tuple[str, str | None]] = {}
        try:
            _load(model, pretrained, device)
            self.models[model_label(model, pretrained)] = (model, pretrained)
        except (ValueError, OSError, RuntimeError) as error:
            if fallback is None or (model, pretrained) == tuple(fallback):
                raise
            self._start_on_fallback(model_label(model, pretrained), error, fallback)
        if fallback is not None and (fallback != TESTBED or importlib.util.find_spec("vlmtta.testbed")):
            self.models.setdefault(model_label(*fallback), tuple(fallback))
        self.model = next(iter(self.models))

    def _start_on_fallback(self, wanted: str, error: Exception, fallback: tuple[str, str | None]) -> None:
        try:
            _load(*fallback, self.device)
        except (ValueError, OSError, RuntimeError) as second:
            raise RuntimeError(f"Could not load {wanted} ({_short(error)}) nor the fallback "
                               f"{model_label(*fallback)} ({_short(second)}).") from second
        name = "the bundled testbed model" if tuple(fallback) == TESTBED else "the fallback model"
        self.models[model_label(*fallback)] = tuple(fallback)
        self.notice = (f"⚠️ Could not load **{wanted}**: {_short(error)}  \nRunning on {name} "
                       f"**{model_label(*fallback)}** instead.")
        log.warning("Could not load %s (%s); running on %s.", wanted, error, model_label(*fallback))

    def backbone(self, model: str | None = None) -> FrozenCLIP:
        """The backbone behind a label of the model dropdown (default: the one the demo started on)."""
        label = model or self.model
        if label not in self.models:
            raise ValueError(f"Unknown model {label!r}; choose one of: {', '.join(self.models)}.")
        try:
            return _load(*self.models[label], self.device)
        except (ValueError, OSError, RuntimeError) as error:
            raise ValueError(f"Could not load {label}: {_short(error, 400)}") from None

    def classify(self, image: Any, classes: str, method: str, n_views: Any = None, steps: Any = None,
                 model: str | None = None) -> Result:
        """Zero-shot and ``method`` on one image (zero-shot uses the method's templates, one view)."""
        path, _ = check_image(image)
        names = parse_classes(classes or "")
        options = method_options(method, n_views, steps)
        backbone = self.backbone(model)
        adapted = Adapter(names, method, backbone=backbone, top_k=TOP_K, **options)
        zero_shot = Adapter(names, "zeroshot", backbone=backbone, templates=adapted.templates, top_k=TOP_K)
        before, after = zero_shot.step(path), adapted.step(path)
        protocol = adapted.protocol()
        summary = (f"**Before** (zero-shot): `{before.label}` in {before.elapsed_s * 1000:.0f} ms · "
                   f"**After** ({after.method}, {protocol['protocol']}): `{after.label}` in "
                   f"{after.elapsed_s * 1000:.0f} ms · {model or self.model}, {protocol.get('n_views', 1)} view(s)")
        return Result(dict(before.top), dict(after.top), summary, protocol)

    def stream(self, state: StreamState | None, files: Any, classes: str, method: str, n_views: Any = None,
               steps: Any = None, model: str | None = None) -> tuple[StreamState, str]:
        """Feed ``files`` in order to the session's adapter, kept across calls until reset or a settings change."""
        uploads = [check_image(item) for item in (files or [])]
        if not uploads:
            raise ValueError("No images in the stream: add one or more image files.")
        names = parse_classes(classes or "")
        options = method_options(method, n_views, steps)
        backbone = self.backbone(model)
        key = (model or self.model, tuple(names), method, tuple(sorted(options.items())))
        note = ""
        if state is None or state.adapter is None or state.key != key:
            note = "Settings changed: started a new adapter. " if state is not None and state.adapter else ""
            state = StreamState(Adapter(names, method, backbone=backbone, top_k=TOP_K, **options), key)
        zero_shot = Adapter(names, "zeroshot", backbone=backbone, templates=state.adapter.templates)
        for path, name in uploads:
            before, after = zero_shot.step(path), state.adapter.step(path)
            state.rows.append([state.adapter.steps, name, before.label, after.label, round(after.top[0][1], 4),
                               round(after.elapsed_s * 1000)])
        return state, note + self._stream_note(state)

    def reset(self, state: StreamState | None) -> tuple[StreamState, str]:
        """Forget what the session's adapter learned; the next images start from zero-shot again."""
        if state is not None and state.adapter is not None:
            state.adapter.reset()
            state.rows.clear()
            return state, f"Adapter reset: **{state.adapter.method.name}** starts from scratch."
        return StreamState(), "Nothing to reset yet."

    @staticmethod
    def _stream_note(state: StreamState) -> str:
        method = state.adapter.method
        if method.episodic:
            return (f"**{method.name}** is episodic: it resets after every image, so order does not matter. "
                    "Pick an online method to carry state across the stream.")
        return (f"**{method.name}** (online): {state.adapter.steps} image(s) adapted so far; "
                "its state is kept until you press Reset.")


# ---- Gradio layer ------------------------------------------------------------------------------------
def _readable(fn: Callable, gr: Any) -> Callable:
    """Show input errors as a message in the app, never a stack trace."""
    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except (ValueError, OSError, RuntimeError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        except Exception as error:  # a bug: keep the traceback in the server log, show one line
            log.exception("demo callback failed")
            raise gr.Error(f"Unexpected {type(error).__name__}: {_short(error)}") from None
    return wrapper


def build_demo(model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, device: str = "auto", *,
               app: DemoApp | None = None, fallback: tuple[str, str | None] | None = TESTBED) -> Any:
    """The Gradio Blocks app (queued; every endpoint has an explicit ``api_name``; no Gradio analytics unless
    ``GRADIO_ANALYTICS_ENABLED`` says otherwise)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    app = app or DemoApp(model, pretrained, device, fallback=fallback)
    method = default_method()
    views, steps, info = method_info(method)
    sets = class_sets()
    with gr.Blocks(title="vlmtta demo") as demo:
        gr.Markdown("# vlmtta: test-time adaptation for CLIP\nZero-shot CLIP (before) next to the chosen "
                    "test-time adaptation method (after), on your image and your class names.")
        gr.Markdown(app.notice, visible=bool(app.notice), elem_id="notice")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "webcam", "clipboard"], label="Image",
                                 elem_id="image")
                preset = gr.Dropdown(list(sets), value=None, label="Ready-made class set", elem_id="preset")
                classes = gr.Textbox(label="Class names (comma or newline separated)", lines=3, max_lines=8,
                                     placeholder="cat, dog, car", elem_id="classes")
                method_box = gr.Dropdown(method_choices(), value=method, label="Method", elem_id="method")
                method_text = gr.Markdown(info)
                with gr.Accordion("Model and options", open=False):
                    model_box = gr.Dropdown(list(app.models), value=app.model, label="Model (pretrained)")
                    views_box = gr.Slider(1, MAX_VIEWS, value=views or 1, step=1, label="Number of views",
                                          interactive=views is not None)
                    steps_box = gr.Slider(1, MAX_STEPS, value=steps or 1, step=1, label="Adaptation steps",
                                          interactive=steps is not None)
                run = gr.Button("Classify", variant="primary", elem_id="run")
                gr.Examples(examples(), inputs=[image, classes], label="Examples (drawn scenes, Fashion-MNIST)")
            with gr.Column():
                with gr.Tab("Before / after"):
                    with gr.Row():
                        before = gr.Label(num_top_classes=TOP_K, label="Before: zero-shot", elem_id="before")
                        after = gr.Label(num_top_classes=TOP_K, label="After: chosen method", elem_id="after")
                    summary = gr.Markdown(elem_id="summary")
                    with gr.Accordion("Protocol (what the numbers depend on)", open=False):
                        protocol = gr.JSON(label="Protocol")
                with gr.Tab("Stream (online methods)"):
                    files = gr.File(file_count="multiple", file_types=["image"], label="Images, adapted in this order")
                    with gr.Row():
                        step = gr.Button("Adapt on these images", variant="primary")
                        reset = gr.Button("Reset adapter")
                    stream_note = gr.Markdown()
                    table = gr.Dataframe(headers=STREAM_HEADERS, interactive=False, label="Stream")
                    state = gr.State(None, time_to_live=3600)

        def classify(*args: Any) -> tuple:
            result = app.classify(*args)
            return result.before, result.after, result.summary, result.protocol

        def describe(name: str) -> tuple:
            views, steps, text = method_info(name)
            return (gr.update(value=views or 1, interactive=views is not None),
                    gr.update(value=steps or 1, interactive=steps is not None), text)

        def stream(*args: Any) -> tuple:
            session, note = app.stream(*args)
            return session, _table(session.rows), note

        def reset_stream(session: StreamState | None) -> tuple:
            session, note = app.reset(session)
            return session, _table(session.rows), note

        settings = [classes, method_box, views_box, steps_box, model_box]
        model_events = dict(concurrency_id="model", concurrency_limit=1, preprocess=False)
        run.click(_readable(classify, gr), [image, *settings], [before, after, summary, protocol],
                  api_name="classify", **model_events)
        step.click(_readable(stream, gr), [state, files, *settings], [state, table, stream_note],
                   api_name="stream", **model_events)
        reset.click(_readable(reset_stream, gr), [state], [state, table, stream_note], api_name="reset_stream",
                    **model_events)
        method_box.change(_readable(describe, gr), [method_box], [views_box, steps_box, method_text],
                          api_name="method_info")
        preset.change(_readable(lambda name: "\n".join(sets[name]) if name else gr.update(), gr), [preset],
                      [classes], api_name="class_set")
    return demo.queue(default_concurrency_limit=1)


def _table(rows: list[list[Any]]) -> dict[str, Any]:
    return {"headers": STREAM_HEADERS, "data": rows or [[""] * len(STREAM_HEADERS)]}


def launch(model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED, device: str = "auto", *,
           host: str = "127.0.0.1", port: int | None = None, share: bool = False, block: bool = True,
           **options: Any) -> Any:
    """Build and serve the demo; with ``block=False`` return at once (``demo.close()`` stops it)."""
    demo = build_demo(model, pretrained, device)
    demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_BYTES,
                prevent_thread_lock=not block, **options)
    return demo


# ---- command line ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    """Serve the demo until interrupted; 2 with a one-line message when it cannot start."""
    if importlib.util.find_spec("gradio") is None:
        print("vlmtta demo: error: Gradio is not installed; pip install 'vlmtta[demo]'", file=sys.stderr)
        return 2
    pretrained = None if str(args.pretrained).lower() in ("none", "random", "") else args.pretrained
    try:
        launch(args.model, pretrained, args.device, host=args.host, port=args.port, share=args.share)
    except (ValueError, OSError, RuntimeError) as error:
        print(f"vlmtta demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmtta.demo", description="Gradio demo of vlmtta.")
    from .cli import add_demo_arguments

    return run(add_demo_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
