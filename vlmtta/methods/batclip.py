"""BATCLIP: bimodal online test-time adaptation of CLIP (Maharana et al., ICCV 2025; ``sarthaxxxxx/BATCLIP``).

Per batch, one AdamW step (lr 5e-4, weight decay 0.01, beta1 0.9) on the LayerNorm parameters of
*both* encoders (the class text features are re-encoded with gradients every batch), minimising

    mean entropy  -  projection matching  -  inter-class separation

* projection matching: for each pseudo-class ``k`` present in the batch, the dot product of the mean
  (unnormalised) image feature of its samples with the normalised text feature ``t_k``, averaged
  over the classes present;
* inter-class separation: ``sum_{k != l} (1 - cos(mu_k, mu_l))`` over the pseudo-class means.

Pseudo-labels are the argmax of CLIP's logits; the output is the prediction of that forward pass
(before the step).  The formulas follow the official code (``utils/losses.py``: ``I2TLoss``,
``InterMeanLoss``); it runs under fp16 autocast with a GradScaler, vlmtta in the backbone's precision.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..entropy import shannon_entropy
from ..norms import TrainableNorms, norm_parameters
from ..prompts import resolve_templates
from ..text import encode_tokens
from .base import register
from .batch import NormAdaptation
from .subtta import class_means

__all__ = ["BATCLIP", "projection_matching", "prototype_separation"]


def projection_matching(features: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the pseudo-classes present of ``mean(features of class k) . text[k]``."""
    means, _ = class_means(features, labels)
    return (means * text[labels.unique()]).sum(dim=1).mean()


def prototype_separation(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_{k != l} (1 - cos(mu_k, mu_l))`` over the pseudo-class means ``mu`` (0 for a single class)."""
    means = F.normalize(class_means(features, labels)[0], dim=-1)
    gaps = 1 - means @ means.t()
    return gaps.sum() - gaps.diagonal().sum()


@register
class BATCLIP(NormAdaptation):
    """Bimodal TTA: entropy, prototype-to-text alignment and prototype separation on both encoders' LayerNorms.

    Args:
        lr, weight_decay, beta1: AdamW (paper: 5e-4, 0.01, 0.9; beta2 0.999).
        adapt_text: also adapt the text encoder's LayerNorms (paper: yes; ``False`` = the unimodal ablation,
            no gradients through the text tower).
        reset: ``domain`` (paper: ``reset_each_shift``), ``batch`` or ``continual``.
        n_views, augmentation: views of one image when it runs per image (``Adapter.step``).
    """

    name = "batclip"
    summary = "Entropy plus prototype-text alignment and prototype separation, tuning both encoders' LayerNorms."
    paper = "Maharana et al., BATCLIP: Bimodal Online Test-Time Adaptation for CLIP, ICCV 2025"

    def __init__(self, lr: float = 5e-4, weight_decay: float = 0.01, beta1: float = 0.9, adapt_text: bool = True,
                 reset: str = "domain", n_views: int = 64, augmentation: str = "rrc_flip"):
        super().__init__(reset=reset, n_views=n_views, augmentation=augmentation)
        if lr <= 0:
            raise ValueError(f"batclip: lr must be > 0, got {lr}.")
        self.lr, self.weight_decay, self.beta1, self.adapt_text = float(lr), float(weight_decay), float(beta1), \
            bool(adapt_text)

    def build_norms(self, backbone) -> TrainableNorms:
        """Norm affines of the whole model (image and text towers), or of the image tower only."""
        params = norm_parameters(backbone.model)
        if not self.adapt_text:
            params = {name: p for name, p in params.items() if name.startswith("visual.")}
        return TrainableNorms(backbone.model, params)

    def bind(self, context) -> None:
        backbone = context.require_backbone(self.name)
        templates = context.templates or resolve_templates(None)  # contexts built from features carry none
        texts = [t.replace("{}", name) for name in context.classnames for t in templates]
        self.tokens = backbone.tokenize(texts)
        super().bind(context)

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, betas=(self.beta1, 0.999), weight_decay=self.weight_decay)

    def encode(self, images: torch.Tensor, grad: bool = False) -> torch.Tensor:
        backbone = self.context.require_backbone(self.name)
        with backbone.autocast():
            features = self.norms(lambda model, x: model.visual(x), images.to(backbone.device), grad=grad)
        return features.float()

    def text_features(self, grad: bool = False) -> torch.Tensor:
        """Class text features [C, D] with the adapted text LayerNorms (template-averaged, L2-normalised)."""
        if not self.adapt_text:
            return self.context.text_features.float()
        backbone = self.context.require_backbone(self.name)
        with backbone.autocast():
            text = self.norms(encode_tokens, self.tokens, grad=grad).float()
        n_classes = len(self.context.classnames)
        return F.normalize(F.normalize(text, dim=-1).view(n_classes, -1, text.shape[-1]).mean(dim=1), dim=-1)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        text = self.text_features(grad=True)
        features = self.encode(images, grad=True)
        logits = self.logits(F.normalize(features, dim=-1), text)
        labels = logits.detach().argmax(dim=1)
        entropy = shannon_entropy(logits).mean()
        matching, separation = projection_matching(features, text, labels), prototype_separation(features, labels)
        loss = entropy - matching - separation
        self.last = {"entropy": entropy.item(), "matching": matching.item(), "separation": separation.item(),
                     "loss": loss.item(), "step": self.step(loss)}
        return logits.detach().softmax(dim=-1)
