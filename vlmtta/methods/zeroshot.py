"""Zero-shot CLIP, with a single template or a prompt ensemble: the baseline every method is compared to."""
from __future__ import annotations

import torch

from .base import Method, register


@register
class ZeroShot(Method):
    """Softmax of ``scale * cos(image, class text)``; with ``n_views > 1`` the view probabilities are averaged."""

    name = "zeroshot"
    summary = "CLIP zero-shot: cosine similarity to each class's text embedding (no adaptation)."
    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"

    def __init__(self, n_views: int = 1, augmentation: str = "rrc_flip"):
        super().__init__(n_views=n_views, augmentation=augmentation)

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=-1).mean(dim=0)

    def batched_features(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).softmax(dim=-1).mean(dim=-2)


@register
class Ensemble(ZeroShot):
    """Zero-shot CLIP whose class embeddings average the 7-template ensemble (unless templates are given)."""

    name = "ensemble"
    summary = "CLIP zero-shot with the 7-template prompt ensemble (CLIP's selected ImageNet templates)."
    default_templates = "ensemble7"
