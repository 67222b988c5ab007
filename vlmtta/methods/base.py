"""The method protocol and the registry of test-time adaptation methods.

A method is a class whose constructor arguments are its hyperparameters (defaults = the paper's),
registered under a short name with ``@register``.  The runner binds it to a backbone and a class
set (``bind``), feeds it one test image at a time and calls ``reset`` when its protocol says so:

* episodic methods forget everything after each image (TPT, Zero, STS, ...);
* online methods keep caches or statistics across the stream until ``reset`` (TDA, DMN, ...).

``needs`` declares what a method consumes, so runners compute and cache as little as possible:
``VIEW_FEATURES`` methods see only the image features of the views and can run on cached
embeddings; the others get the preprocessed views themselves.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..options import parse_options
from ..views import VIEW_POLICIES, ViewConfig

if TYPE_CHECKING:
    from ..backbone import FrozenCLIP


class Need(str, Enum):
    """What a method consumes besides the cached class text embeddings."""

    VIEW_FEATURES = "view_features"  # image features of the views only (can run on cached embeddings)
    TEXT_GRAD = "text_grad"  # the text encoder, differentiable w.r.t. prompt context
    IMAGE_INTERNALS = "image_internals"  # the vision transformer's blocks and tokens
    TRAINABLE_NORMS = "trainable_norms"  # the image encoder's normalisation parameters (restored on reset)


@dataclass
class Context:
    """What a method is bound to: the class set, its text embeddings and (unless running on
    precomputed features) the backbone."""

    classnames: list[str]
    templates: list[str]
    text_features: torch.Tensor  # [C, D], L2-normalised, on the features' device
    logit_scale: float  # CLIP's temperature, exp(logit_scale) of the model (100 for OpenAI weights)
    backbone: "FrozenCLIP | None" = None  # None when running on precomputed features
    # Precision of CLIP's logits: fp16 reproduces fp16 CLIP inference on fp16 embeddings (where rounding
    # decides near-ties); results are always returned as float32.
    logits_dtype: torch.dtype = torch.float32

    def require_backbone(self, method: str) -> "FrozenCLIP":
        """The backbone, or a clear error for methods that cannot run on precomputed features."""
        if self.backbone is None:
            raise ValueError(f"Method {method!r} needs the model itself, not only precomputed features.")
        return self.backbone


class Method:
    """Base class of every TTA method.  Subclasses set the class attributes and override hooks."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line, shown by `vlmtta methods` and the demo
    paper: ClassVar[str] = ""
    episodic: ClassVar[bool] = True
    needs: ClassVar[frozenset[Need]] = frozenset({Need.VIEW_FEATURES})
    default_templates: ClassVar[str | None] = None  # template set used when the caller gives none
    # Per-dataset hyperparameters from the paper (e.g. TDA's alpha/beta), keyed by dataset key
    # (``eurosat``, ``imagenet_a``, ...); runners apply them under any option the user gives.
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, n_views: int = 1, augmentation: str = "rrc_flip"):
        if int(n_views) < 1:
            raise ValueError(f"{self.name}: n_views must be at least 1, got {n_views}.")
        if augmentation not in VIEW_POLICIES:
            raise ValueError(f"{self.name}: unknown augmentation {augmentation!r}; accepted: {', '.join(VIEW_POLICIES)}.")
        self.n_views = int(n_views)
        self.augmentation = augmentation
        self.context: Context | None = None

    # ---- description ------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        return "episodic" if self.episodic else "online"

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Hyperparameter names and default values, read from the constructor signature."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}

    @classmethod
    def options_for(cls, dataset: str | None, **overrides: Any) -> dict[str, Any]:
        """The paper's per-dataset settings for ``dataset`` (if any), overridden by ``overrides``."""
        return {**cls.dataset_defaults.get(dataset or "", {}), **overrides}

    def hyperparameters(self) -> dict[str, Any]:
        """Current hyperparameter values."""
        return {name: getattr(self, name) for name in self.defaults()}

    @classmethod
    def info(cls) -> dict[str, Any]:
        return {"name": cls.name, "summary": cls.summary, "paper": cls.paper,
                "protocol": "episodic" if cls.episodic else "online",
                "needs": sorted(need.value for need in cls.needs), "defaults": cls.defaults()}

    def view_config(self, backbone: "FrozenCLIP") -> ViewConfig:
        """How many views of each test image this method wants, and how they are augmented."""
        policy = "none" if self.n_views == 1 else self.augmentation
        return ViewConfig(n_views=self.n_views, policy=policy, image_size=backbone.image_size,
                          mean=backbone.mean, std=backbone.std)

    # ---- lifecycle ----------------------------------------------------------------------------
    def bind(self, context: Context) -> None:
        """Attach to a backbone and class set; resets all adaptation state."""
        self.context = context
        self.reset()

    def reset(self) -> None:
        """Forget all adaptation state (per image for episodic methods, per stream for online ones)."""

    # ---- prediction -----------------------------------------------------------------------------
    def observe_source(self, pixels: torch.Tensor) -> None:
        """See the test image itself (uint8 [3, H, W], any device) before ``predict_views`` gets its views.

        Default: nothing.  DiffTPT keys its generated-image cache on it (independent of the device
        the views are made on)."""

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities [C] from the L2-normalised features [N, D] of one image's views (view 0 = original)."""
        raise NotImplementedError(f"{self.name} does not run on view features alone")

    def predict_views(self, views: torch.Tensor) -> torch.Tensor:
        """Class probabilities [C] from one image's preprocessed views [N, 3, S, S]."""
        return self.predict_features(self.context.require_backbone(self.name).encode_images(views))

    # ---- many images at once (``Adapter.step_many``, ``vlmtta bench --batch-images``) ----------------------
    def predict_features_many(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, C] of B images from their views' features [B, N, D], in stream order.

        Must equal ``predict_features`` on each image in turn, with ``reset()`` before each image for episodic
        methods.  Episodic methods vectorise it by defining ``batched_features`` (one step whose per-image state
        carries a leading batch dimension); it is used while the object is episodic and its ``predict_features``
        is still that class's own (a subclass that changes it, or makes the method online, goes image by image).
        Otherwise this runs ``predict_features`` one image at a time."""
        owner = next((cls for cls in type(self).__mro__ if "batched_features" in vars(cls)), None)
        if owner is not None and self.episodic and type(self).predict_features is owner.predict_features:
            return self.batched_features(features)
        return torch.stack([self._one_image(lambda f=f: self.predict_features(f)) for f in features])

    def predict_views_many(self, views: torch.Tensor, sources: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Class probabilities [B, C] of B images from their preprocessed views [B, N, 3, S, S] (``sources``: the
        uint8 images they were made from, for ``observe_source``).  Same contract as ``predict_features_many``.

        Default: methods that need only view features get all B x N views encoded in one batch, then
        ``predict_features_many``; the others run ``predict_views`` one image at a time."""
        if Need.VIEW_FEATURES in self.needs:
            backbone = self.context.require_backbone(self.name)
            b, n = views.shape[:2]
            return self.predict_features_many(backbone.encode_images(views.flatten(0, 1)).reshape(b, n, -1))
        sources = [None] * len(views) if sources is None else sources

        def one(v: torch.Tensor, source: torch.Tensor | None) -> torch.Tensor:
            if source is not None:
                self.observe_source(source)
            return self.predict_views(v)

        return torch.stack([self._one_image(lambda v=v, s=s: one(v, s)) for v, s in zip(views, sources)])

    def _one_image(self, run) -> torch.Tensor:
        """``run()`` after a reset for episodic methods; its probabilities detached, float32."""
        if self.episodic:
            self.reset()
        return run().detach().float()

    def logits(self, features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """CLIP logits ``scale * features @ text.T`` [N, C]; features [B, N, D] give [B, N, C] (text [C, D], or
        one class set per image [B, C, D])."""
        text = self.context.text_features if text_features is None else text_features
        dtype = self.context.logits_dtype
        return (self.context.logit_scale * features.to(dtype) @ text.to(dtype).mT).float()


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not cls.name or cls.name != cls.name.lower():
        raise ValueError(f"{cls.__name__} needs a lower-case `name` to be registered.")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"A method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}).")
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """The registered class for ``name``; a clear error listing the registered names otherwise."""
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, method_names(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown method {name!r}.{hint} Registered methods: {', '.join(method_names())}.")
    return _REGISTRY[key]


def check_options(name: str, **options: Any) -> dict[str, Any]:
    """``options`` for method ``name`` converted to the types its constructor declares (``vlmtta.options``):
    strings such as ``-o`` values are parsed, other values checked; a one-line ``ValueError`` for an option the
    method does not have or a value of the wrong type."""
    cls = get_method_class(name)
    accepted = cls.defaults()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"Unknown option(s) {', '.join(unknown)} for method {cls.name!r}; "
                         f"accepted: {', '.join(f'{k}={v!r}' for k, v in accepted.items())}.")
    return parse_options(cls.name, cls.__init__, options)


def create_method(name: str, **options: Any) -> Method:
    """Instantiate a registered method with ``check_options``'s typed options."""
    return get_method_class(name)(**check_options(name, **options))


def list_methods() -> list[dict[str, Any]]:
    """Name, summary, paper, protocol, needs and default hyperparameters of every registered method."""
    return [_REGISTRY[name].info() for name in method_names()]
