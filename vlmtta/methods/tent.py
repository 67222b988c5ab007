"""Tent: fully test-time adaptation by entropy minimisation (Wang et al., ICLR 2021; ``DequanWang/tent``).

Per batch: CLIP logits with the adapted normalisation parameters, the mean Shannon entropy of the
predictions as the loss, one SGD step (lr 0.00025, momentum 0.9 at batch 64: the paper's ImageNet
setting, also the CLIP ViT-B/16 ImageNet-C setting of the BATCLIP code).  The output is the
prediction of the forward pass that computed the loss (before the step), as in the official code.
On CLIP the adapted parameters are the image encoder's LayerNorm affines (Tent's BatchNorm affines
on ResNets); the text tower is not touched and carries no gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..entropy import shannon_entropy
from .base import register
from .batch import SGDNormAdaptation

__all__ = ["Tent"]


@register
class Tent(SGDNormAdaptation):
    """Entropy minimisation on the image encoder's normalisation parameters, one step per batch.

    Args:
        lr, momentum: SGD (paper: 0.00025, 0.9 at batch 64).
        reset: ``domain`` (paper: reset per corruption), ``batch`` or ``continual``.
        n_views, augmentation: views of one image when it runs per image (``Adapter.step``).
    """

    name = "tent"
    summary = "Minimises prediction entropy by tuning the image encoder's normalisation layers, per batch."
    paper = "Wang et al., Tent: Fully Test-time Adaptation by Entropy Minimization, ICLR 2021"

    def __init__(self, lr: float = 0.00025, momentum: float = 0.9, reset: str = "domain", n_views: int = 64,
                 augmentation: str = "rrc_flip"):
        super().__init__(reset=reset, n_views=n_views, augmentation=augmentation)
        if lr <= 0:
            raise ValueError(f"tent: lr must be > 0, got {lr}.")
        self.lr, self.momentum = float(lr), float(momentum)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logits(F.normalize(self.encode(images, grad=True), dim=-1))
        loss = shannon_entropy(logits).mean()
        self.last = {"loss": loss.item(), "step": self.step(loss)}
        return logits.detach().softmax(dim=-1)
