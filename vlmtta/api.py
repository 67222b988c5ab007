"""Public entry points: ``predict`` for one image, ``Adapter`` for a stream of images."""
from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

from .backbone import AUTO_WEIGHTS, FrozenCLIP, load_backbone
from .images import DEFAULT_MAX_PIXELS, ImageInput, load_image
from .methods import Context, Need, create_method
from .prompts import parse_classes, resolve_templates
from .views import make_views, original_view, view_seed

DEFAULT_METHOD = "sts"
DEFAULT_MODEL = "ViT-B-16"
DEFAULT_PRETRAINED = AUTO_WEIGHTS  # openai for architecture names; local-dir:/testbed models use their own


@dataclass
class Prediction:
    """The adapted prediction for one image."""

    label: str  # the most probable class
    index: int  # its position in the class list
    probabilities: dict[str, float]  # every class, in class-list order
    top: list[tuple[str, float]]  # the ``top_k`` most probable classes, best first
    elapsed_s: float  # wall time of the step: image loading, views, encoding, adaptation
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Adapter:
    """A TTA method bound to a backbone and a class list, fed one image at a time.

    Episodic methods are reset before every image; online methods keep their state across
    ``step`` calls until ``reset()``.  Views of the i-th image are drawn with seed
    ``view_seed(seed, i)``, so a stream is reproducible.

    Args:
        classes: class names (a list, or one string separated by commas/newlines, or ``dataset:<key>``).
        method: a registered method name (see ``vlmtta.list_methods()``).
        model, pretrained, device: the backbone (shared across adapters; see ``load_backbone``).
        templates: template set name, one template with ``{}``, or a list; default: the method's own
            default, else ``"a photo of a {}."``.
        seed: seed of the augmented views.
        backbone: an existing ``FrozenCLIP`` to use instead of ``model``/``pretrained``/``device``.
        top_k: how many classes ``Prediction.top`` lists (at least 1).
        max_pixels: images with more pixels are downscaled to that many (aspect ratio kept) before their
            views are made; ``None``: never.
        **method_options: the method's hyperparameters (its constructor arguments).
    """

    def __init__(
        self,
        classes: str | Iterable[str],
        method: str = DEFAULT_METHOD,
        *,
        model: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        templates: str | list[str] | None = None,
        device: str | torch.device = "auto",
        seed: int = 0,
        backbone: FrozenCLIP | None = None,
        top_k: int = 5,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        **method_options: Any,
    ):
        self.classes = parse_classes(classes)
        self.max_pixels = _check_max_pixels(max_pixels)
        self.method = create_method(method, **method_options)
        self.templates = resolve_templates(templates if templates is not None else self.method.default_templates)
        self.backbone = backbone if backbone is not None else load_backbone(model, pretrained, device)
        text_features = self.backbone.class_embeddings(self.classes, self.templates)
        self._bind(Context(self.classes, self.templates, text_features, self.backbone.logit_scale, self.backbone),
                   seed, top_k)
        self.view_config = self.method.view_config(self.backbone)

    @classmethod
    def from_features(cls, classes: str | Iterable[str], text_features: torch.Tensor, method: str = DEFAULT_METHOD, *,
                      logit_scale: float = 100.0, logits_dtype: torch.dtype = torch.float32, top_k: int = 5,
                      **method_options: Any) -> "Adapter":
        """An adapter on precomputed embeddings (no model): feed it with ``step_features``.

        ``text_features`` [C, D] are L2-normalised here; ``logit_scale`` is CLIP's temperature
        (100 for OpenAI weights); ``logits_dtype=torch.float16`` computes CLIP's logits as fp16 CLIP
        inference does.  Only methods that need nothing but view features can run.
        """
        self = cls.__new__(cls)
        self.classes, self.max_pixels = parse_classes(classes), None
        if text_features.ndim != 2 or text_features.shape[0] != len(self.classes):
            raise ValueError(f"text_features must be [C, D] with C = {len(self.classes)} classes, "
                             f"got {tuple(text_features.shape)}.")
        self.method = create_method(method, **method_options)
        if Need.VIEW_FEATURES not in self.method.needs:
            raise ValueError(f"Method {self.method.name!r} needs the model itself; it cannot run on precomputed features.")
        self.templates, self.backbone, self.view_config = [], None, None
        text = torch.nn.functional.normalize(text_features.float(), dim=-1)
        self._bind(Context(self.classes, self.templates, text, float(logit_scale), logits_dtype=logits_dtype), 0, top_k)
        return self

    def _bind(self, context: Context, seed: int, top_k: int) -> None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number of classes, at least 1; got {top_k!r}.")
        self.seed, self.top_k, self.steps = int(seed), int(top_k), 0
        self.method.bind(context)
        self._lock = threading.Lock()

    def step(self, image: ImageInput) -> Prediction:
        """Adapt on one test image and return its prediction."""
        if self.backbone is None:
            raise ValueError("This adapter runs on precomputed features: call step_features(features).")
        start = time.perf_counter()
        pixels = load_image(image, self.max_pixels).to(self.backbone.device)
        views = make_views(pixels, self.view_config, seed=view_seed(self.seed, self.steps))
        return self._prediction(self.adapt_views(views, pixels), time.perf_counter() - start)

    def adapt_views(self, views: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities [C] for one image's preprocessed views [N, 3, S, S] (view 0 = original);
        ``source``: the uint8 image [3, H, W] they were made from, for methods that use it (DiffTPT)."""
        with self._lock:
            if source is not None:
                self.method.observe_source(source)
            if Need.VIEW_FEATURES in self.method.needs:
                return self._adapt(lambda: self.method.predict_features(self.backbone.encode_images(views)))
            return self._adapt(lambda: self.method.predict_views(views))

    def step_many(self, images: Iterable[ImageInput]) -> list[Prediction]:
        """Adapt on several test images at once, with results equal to calling ``step`` on each in turn.

        Episodic methods adapt the images in one vectorised step (independent per-image state); online methods
        see them one after another, in order.  ``elapsed_s`` is the time of the whole call per image."""
        if self.backbone is None:
            raise ValueError("This adapter runs on precomputed features: call adapt_features_many(features).")
        start = time.perf_counter()
        sources = [load_image(image, self.max_pixels).to(self.backbone.device) for image in images]
        if not sources:
            return []
        views = torch.stack([make_views(pixels, self.view_config, seed=view_seed(self.seed, self.steps + k))
                             for k, pixels in enumerate(sources)])
        probs = self.adapt_views_many(views, sources)
        elapsed = (time.perf_counter() - start) / len(probs)
        return [self._prediction(row, elapsed) for row in probs]

    def adapt_views_many(self, views: torch.Tensor, sources: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Class probabilities [B, C] (CPU) for B images' preprocessed views [B, N, 3, S, S]; ``sources``: the
        uint8 images they were made from (DiffTPT).  Equal to ``adapt_views`` on each image in turn."""
        if views.ndim != 5:
            raise ValueError(f"views must be [B, N, 3, S, S], got {tuple(views.shape)}.")
        with self._lock:
            probs = self.method.predict_views_many(views, sources).detach().float().cpu()
            self.steps += len(probs)
        return probs

    def adapt_features_many(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, C] (CPU) for B images given their views' L2-normalised features [B, N, D].
        Equal to ``adapt_features`` on each image in turn."""
        if Need.VIEW_FEATURES not in self.method.needs:
            raise ValueError(f"Method {self.method.name!r} needs the images themselves, not view features.")
        if features.ndim != 3:
            raise ValueError(f"features must be [B, N, D], got {tuple(features.shape)}.")
        with self._lock:
            probs = self.method.predict_features_many(features).detach().float().cpu()
            self.steps += len(probs)
        return probs

    def step_batch(self, images: Iterable[ImageInput]) -> list[Prediction]:
        """Adapt on a batch of test images at once: the batch protocol of methods that have one (SubTTA, Tent,
        SAR, DeYO, BATCLIP, WATT, CLIPArTT).  Each image enters as its original view only; ``elapsed_s`` is the
        batch time per image."""
        start = time.perf_counter()
        probs = self.adapt_batch(self.original_views(images))
        elapsed = (time.perf_counter() - start) / max(1, len(probs))
        return [self._prediction(row, elapsed) for row in probs]

    def original_views(self, images: Iterable[ImageInput]) -> torch.Tensor:
        """The unaugmented preprocessed views [B, 3, S, S] of ``images``, on the model's device."""
        if self.backbone is None:
            raise ValueError("step_batch needs images and a backbone; this adapter runs on precomputed features.")
        config = self.view_config
        return torch.cat([original_view(load_image(image, self.max_pixels).to(self.backbone.device), config.image_size,
                                        config.mean, config.std) for image in images])

    def adapt_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, C] (CPU) of a batch of preprocessed images [B, 3, S, S], adapting on it."""
        if not hasattr(self.method, "predict_batch"):
            raise ValueError(f"Method {self.method.name!r} has no batch protocol; call step() per image.")
        with self._lock:
            probs = self.method.predict_batch(batch).detach().float().cpu()
            self.steps += len(probs)
        return probs

    def step_features(self, features: torch.Tensor) -> Prediction:
        """Adapt on one image given the L2-normalised features [N, D] of its views (view 0 = original)."""
        start = time.perf_counter()
        return self._prediction(self.adapt_features(features), time.perf_counter() - start)

    def adapt_features(self, features: torch.Tensor) -> torch.Tensor:
        """Like ``step_features`` but returns the class probabilities [C] only (the fast path for runners)."""
        if Need.VIEW_FEATURES not in self.method.needs:
            raise ValueError(f"Method {self.method.name!r} needs the images themselves, not view features.")
        features = features.reshape(-1, features.shape[-1])
        with self._lock:
            return self._adapt(lambda: self.method.predict_features(features))

    def _adapt(self, run) -> torch.Tensor:
        """Reset episodic methods, run one image, count it."""
        if self.method.episodic:
            self.method.reset()
        probs = run()
        self.steps += 1
        return probs.detach().float().cpu()

    def reset(self) -> None:
        """Forget everything adapted so far and restart the view seeds."""
        with self._lock:
            self.method.reset()
            self.steps = 0

    def protocol(self) -> dict[str, Any]:
        """Backbone, templates, views and hyperparameters: what a reported number depends on."""
        views = {} if self.view_config is None else {"n_views": self.view_config.n_views,
                                                     "augmentation": self.view_config.policy,
                                                     "max_pixels": self.max_pixels}
        if self.method.context.logits_dtype != torch.float32:
            views["logits_dtype"] = str(self.method.context.logits_dtype).replace("torch.", "")
        backbone = {"model": None, "features": "precomputed"} if self.backbone is None else self.backbone.describe()
        return {**backbone, "method": self.method.name, "protocol": self.method.protocol, "templates": self.templates,
                **views, "seed": self.seed, "hyperparameters": self.method.hyperparameters()}

    def _prediction(self, probs: torch.Tensor, elapsed: float) -> Prediction:
        values, indices = probs.topk(min(self.top_k, len(self.classes)))
        best = int(indices[0])
        return Prediction(
            label=self.classes[best], index=best,
            probabilities={name: float(p) for name, p in zip(self.classes, probs.tolist())},
            top=[(self.classes[int(i)], float(v)) for v, i in zip(values, indices)],
            elapsed_s=elapsed, method=self.method.name,
        )


def predict(
    image: ImageInput,
    classes: str | Iterable[str],
    method: str = DEFAULT_METHOD,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    templates: str | list[str] | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    top_k: int = 5,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    **method_options: Any,
) -> Prediction:
    """Classify one image among ``classes`` with test-time adaptation ``method``.

    The backbone is built on first use and reused by later calls with the same model,
    pretrained weights and device; class text embeddings are cached.

    Example:
        >>> import vlmtta
        >>> vlmtta.predict("dog.jpg", ["cat", "dog", "car"]).label   # doctest: +SKIP
        'dog'
    """
    adapter = Adapter(classes, method, model=model, pretrained=pretrained, templates=templates,
                      device=device, seed=seed, top_k=top_k, max_pixels=max_pixels, **method_options)
    return adapter.step(image)


def _check_max_pixels(max_pixels: int | None) -> int | None:
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1):
        raise ValueError(f"max_pixels must be a whole number of pixels, at least 1, or None; got {max_pixels!r}.")
    return max_pixels
