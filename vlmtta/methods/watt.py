"""WATT: weight average test-time adaptation of CLIP (Osowiechi et al., NeurIPS 2024; ``Mehrdad-Noori/WATT``).

Per batch (episodic: from the pre-trained LayerNorm parameters of the image encoder), for each of
H text templates (the paper's 8), ``L`` = 2 Adam steps (lr 1e-3) of the CLIPArTT loss with K = 1
(each image's pseudo-label is its argmax class under that template; ``transductive_loss``), then the
H adapted parameter sets are averaged; this repeats ``M`` = 5 times:

* ``sequential`` (WATT-S, the official code's default): within a repetition the templates are
  visited one after another from the current weights; the weights after each are averaged;
* ``parallel`` (WATT-P): every template starts from the previous average.

The Adam state is fresh whenever the weights start from the batch's starting point (each template of
the first parallel round, the first sequential round) and carries over otherwise, as in the code.
Prediction: the averaged weights, against the text ensemble (mean of the per-template class
embeddings) of all templates.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..norms import average_states
from ..prompts import resolve_templates
from .base import register
from .batch import NormAdaptation
from .clipartt import transductive_loss

__all__ = ["WATT", "WATT_TEMPLATES"]

WATT_TEMPLATES = ("a photo of a {}", "itap of a {}", "a bad photo of the {}.", "a origami {}.",
                  "a photo of the large {}.", "a {} in a video game.", "art of the {}.", "a photo of the small {}.")
WATT_MODES = ("sequential", "parallel")


@register
class WATT(NormAdaptation):
    """CLIPArTT-style pseudo-label updates under several templates, with weight averaging across them.

    Args:
        mode: ``sequential`` (WATT-S, code default) or ``parallel`` (WATT-P).
        steps: adaptation iterations per template (paper L = 2).
        repeats: adaptation + averaging rounds (paper M = 5).
        lr: Adam learning rate (paper 1e-3; betas 0.9, 0.999, no weight decay).
        temperature: of the transductive targets (0.01).
        template_set: ``watt8`` (the paper's 8 templates) or any template set name / one template.
        reference_eval: predict with the single template "a photo of a {}" instead of the ensemble.
        reset: ``batch`` (paper: episodic per batch), ``domain`` or ``continual``.
        n_views, augmentation: views of one image when it runs per image (``Adapter.step``).
    """

    name = "watt"
    summary = "Adapts the image encoder's LayerNorms under several text templates and averages the weights."
    paper = "Osowiechi et al., WATT: Weight Average Test-Time Adaptation of CLIP, NeurIPS 2024"

    def __init__(self, mode: str = "sequential", steps: int = 2, repeats: int = 5, lr: float = 1e-3,
                 temperature: float = 0.01, template_set: str = "watt8", reference_eval: bool = False,
                 reset: str = "batch", n_views: int = 64, augmentation: str = "rrc_flip"):
        super().__init__(reset=reset, n_views=n_views, augmentation=augmentation)
        if mode not in WATT_MODES:
            raise ValueError(f"watt: mode must be one of {WATT_MODES}, got {mode!r}.")
        if int(steps) < 1 or int(repeats) < 1 or lr <= 0 or temperature <= 0:
            raise ValueError("watt: needs steps >= 1, repeats >= 1, lr > 0 and temperature > 0.")
        self.mode, self.steps, self.repeats, self.lr = mode, int(steps), int(repeats), float(lr)
        self.temperature, self.template_set, self.reference_eval = float(temperature), template_set, bool(reference_eval)
        self.templates = list(WATT_TEMPLATES) if template_set == "watt8" else resolve_templates(template_set)

    def bind(self, context) -> None:
        backbone = context.require_backbone(self.name)
        self.template_text = torch.stack([backbone.class_embeddings(context.classnames, [t]) for t in self.templates])
        eval_templates = [WATT_TEMPLATES[0]] if self.reference_eval else self.templates
        self.eval_text = backbone.class_embeddings(context.classnames, eval_templates)
        super().bind(context)

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def adapt_template(self, images: torch.Tensor, text: torch.Tensor) -> float:
        """``steps`` updates with the pseudo-labels of one template's class features ``text`` [C, D]; last loss."""
        for _ in range(self.steps):
            features = F.normalize(self.encode(images, grad=True), dim=-1)
            labels = self.logits(features.detach(), text).argmax(dim=1)
            loss = transductive_loss(features, text[labels].to(features.dtype), self.context.logit_scale,
                                     self.temperature)
            self.step(loss)
        return loss.item()

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        average = self.norms.state()
        self.optimizer = self.make_optimizer(self.norms.values())
        for repeat in range(self.repeats):
            states = []
            self.norms.load(average)
            for text in self.template_text:
                if self.mode == "parallel":
                    self.norms.load(average)
                    if repeat == 0:  # every template starts afresh from the batch's starting weights
                        self.optimizer = self.make_optimizer(self.norms.values())
                self.last = {"loss": self.adapt_template(images, text)}
                states.append(self.norms.state())
            average = average_states(states)
        self.norms.load(average)
        with torch.no_grad():
            return self.logits(F.normalize(self.encode(images), dim=-1), self.eval_text).softmax(dim=-1)
