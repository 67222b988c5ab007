"""OnZeta: online zero-shot transfer (Qian & Hu, Online Zero-Shot Classification with CLIP, ECCV 2024; official code
``idstcv/OnZeta``)."""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..data.catalog import DATASETS
from .base import Method, register


@register
class OnZeta(Method):
    """Online label learning (a dual variable on the label distribution) plus an online vision proxy, one view.

    Per test image ``x`` (the ``t``-th, from 1), with step sizes ``cw / sqrt(t)`` and ``cr / sqrt(t)``:

    1. text label ``q = softmax(x . text / tau_t) * exp(rho)``, renormalised: the zero-shot prediction re-weighted
       by the dual variable ``rho`` [C] of the constraint that every class gets at least ``alpha / C`` of the stream;
    2. ``rho <- max(0, rho - cr / sqrt(t) * (q - alpha / C))``;
    3. vision label ``v = softmax(x . w / tau_i)`` with the vision proxy ``w`` [C, D] (initialised to the text
       embeddings);
    4. prediction ``beta_t v + (1 - beta_t) q`` with ``beta_t = beta * sqrt(t / stream_length)`` (capped at ``beta``);
    5. ``w <- normalise(w - cw / sqrt(t) / tau_i * (v - q) x^T)``: one online gradient step of the cross-entropy of
       the proxy's prediction against ``q``.

    ``beta_t`` needs the stream length ``T`` in advance, as in the paper and the official code (which sets
    ``n = len(dataset)``): ``stream_length`` defaults to ImageNet's 50,000 validation images, and
    ``dataset_defaults`` holds each dataset's published test-split size (no labels involved).  Pass
    ``stream_length`` for any other stream.  Defaults (``tau_t = 0.01``, ``tau_i = 0.04``, ``cw = 0.5``, ``cr = 20``,
    ``alpha = 1``, ``beta = 0.8``) are the official code's, used for every backbone; the text temperature ``tau_t``
    replaces the model's logit scale (0.01 = CLIP's 100).  The official code evaluates with the 7-template ensemble.
    """

    name = "onzeta"
    summary = "Online label-distribution dual variable + online vision proxy learned from text pseudo-labels (OnZeta)."
    paper = "Qian & Hu, Online Zero-Shot Classification with CLIP, ECCV 2024"
    episodic = False
    default_templates = "ensemble7"
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        key: {"stream_length": spec.test_count} for key, spec in DATASETS.items()}

    def __init__(self, n_views: int = 1, augmentation: str = "rrc_flip", tau_t: float = 0.01, tau_i: float = 0.04,
                 cw: float = 0.5, cr: float = 20.0, alpha: float = 1.0, beta: float = 0.8, stream_length: int = 50000):
        super().__init__(n_views=n_views, augmentation=augmentation)
        if not tau_t > 0 or not tau_i > 0:
            raise ValueError(f"{self.name}: temperatures must be positive, got tau_t={tau_t}, tau_i={tau_i}.")
        if cw < 0 or cr < 0 or alpha < 0 or not 0 <= beta <= 1:
            raise ValueError(f"{self.name}: need cw, cr, alpha >= 0 and 0 <= beta <= 1; got {cw}, {cr}, {alpha}, {beta}.")
        if int(stream_length) < 1:
            raise ValueError(f"{self.name}: stream_length must be at least 1, got {stream_length}.")
        self.tau_t, self.tau_i, self.cw, self.cr = float(tau_t), float(tau_i), float(cw), float(cr)
        self.alpha, self.beta, self.stream_length = float(alpha), float(beta), int(stream_length)
        self.proxy: torch.Tensor | None = None  # w [C, D]
        self.dual: torch.Tensor | None = None  # rho [C]
        self.seen = 0

    def reset(self) -> None:
        if self.context is not None:
            self.proxy = self.context.text_features.float().clone()
            self.dual = torch.zeros(self.proxy.shape[0], device=self.proxy.device)
        self.seen = 0

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        x = features[0].float()
        self.seen += 1
        step = 1.0 / math.sqrt(self.seen)
        text = (x @ self.context.text_features.float().t() / self.tau_t).softmax(-1) * self.dual.exp()
        text = text / text.sum()
        self.dual = (self.dual - self.cr * step * (text - self.alpha / text.shape[0])).clamp_min(0)
        vision = (self.proxy @ x / self.tau_i).softmax(-1)
        weight = self.beta * math.sqrt(min(1.0, self.seen / self.stream_length))
        probs = weight * vision + (1 - weight) * text
        self.proxy = F.normalize(self.proxy - (self.cw * step / self.tau_i) * torch.outer(vision - text, x), dim=-1)
        return probs
