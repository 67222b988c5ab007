"""CLIPArTT: adaptation of CLIP to new domains at test time (Hakim et al., WACV 2025; ``dosowiechi/CLIPArTT``).

Per batch (episodic: the image encoder's LayerNorm parameters start from the pre-trained ones), 10
iterations of:

1. predict with CLIP; each image's top-K classes (K = 3) form one pseudo-label prompt,
   ``"a photo of a {c1} or {c2} or {c3}"``, encoded by the frozen text tower (no gradients there);
2. transductive target: ``Q = softmax(((F F^T + T T^T) / 2) / tau)`` (tau 0.01) from the image-image
   and prompt-prompt similarities of the batch;
3. loss: cross-entropy between ``Q`` and the image-to-prompt CLIP logits ``scale * F T^T``; one Adam
   step (lr 1e-3) on the image encoder's LayerNorm parameters.

The prediction is CLIP's on the batch re-encoded after the last step, against the class text
features.  As in the official code, the targets are computed from the features with gradients
(the loss is backpropagated through them too).  The pseudo-labels come from the same forward
pass as the loss (the official code runs a second, gradient-free pass with the same parameters,
which gives the same features).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import register
from .batch import NormAdaptation

__all__ = ["CLIPArTT", "transductive_loss"]


def transductive_loss(features: torch.Tensor, prompts: torch.Tensor, logit_scale: float,
                      temperature: float = 0.01) -> torch.Tensor:
    """CLIPArTT / WATT loss of L2-normalised image features [B, D] and their pseudo-label prompt features [B, D].

    ``Q = softmax(((F F^T + T T^T) / 2) / temperature)`` row-wise; image ``i`` is scored against every
    prompt ``j`` with ``logit_scale * f_i . t_j`` and the loss is ``mean_i -sum_j Q[j, i] log_softmax_j``.
    """
    targets = ((features @ features.t() + prompts @ prompts.t()) / 2 / temperature).softmax(dim=-1)
    log_probs = (logit_scale * features @ prompts.t()).log_softmax(dim=-1)  # [image, prompt]
    return -(targets.t() * log_probs).sum(dim=1).mean()


@register
class CLIPArTT(NormAdaptation):
    """Transductive pseudo-labels from top-K class prompts; the image encoder's LayerNorms tuned per batch.

    Args:
        top_k: classes per pseudo-label prompt (paper 3).
        steps: adaptation iterations per batch (paper 10).
        lr: Adam learning rate (paper 1e-3; betas 0.9, 0.999, no weight decay).
        temperature: of the transductive targets (paper 0.01).
        prompt: template of the pseudo-label prompt; the class names are joined with " or " (official code).
        reset: ``batch`` (paper: episodic per batch), ``domain`` or ``continual``.
        n_views, augmentation: views of one image when it runs per image (``Adapter.step``).
    """

    name = "clipartt"
    summary = "Top-K class prompts as transductive pseudo-labels; tunes the image encoder's LayerNorms per batch."
    paper = "Hakim et al., CLIPArTT: Adaptation of CLIP to New Domains at Test Time, WACV 2025"

    def __init__(self, top_k: int = 3, steps: int = 10, lr: float = 1e-3, temperature: float = 0.01,
                 prompt: str = "a photo of a {}", reset: str = "batch", n_views: int = 64,
                 augmentation: str = "rrc_flip"):
        super().__init__(reset=reset, n_views=n_views, augmentation=augmentation)
        if int(top_k) < 1 or int(steps) < 1 or lr <= 0 or temperature <= 0 or prompt.count("{}") != 1:
            raise ValueError("clipartt: needs top_k >= 1, steps >= 1, lr > 0, temperature > 0 and a prompt with one {}.")
        self.top_k, self.steps, self.lr = int(top_k), int(steps), float(lr)
        self.temperature, self.prompt = float(temperature), prompt
        self._prompt_cache: dict[tuple[int, ...], torch.Tensor] = {}

    def bind(self, context) -> None:
        self._prompt_cache = {}
        super().bind(context)

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)

    def prompt_features(self, top: torch.Tensor) -> torch.Tensor:
        """L2-normalised features [B, D] of each row's prompt "a photo of a {c1} or {c2} ..." (encoded once each)."""
        keys = [tuple(row) for row in top.tolist()]
        missing = sorted(set(keys) - set(self._prompt_cache))
        if missing:
            names = self.context.classnames
            texts = [self.prompt.format(" or ".join(names[c] for c in key)) for key in missing]
            encoded = self.context.require_backbone(self.name).encode_text(texts)
            self._prompt_cache.update(zip(missing, encoded))
        return torch.stack([self._prompt_cache[key] for key in keys])

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, len(self.context.classnames))
        for _ in range(self.steps):
            features = F.normalize(self.encode(images, grad=True), dim=-1)
            top = self.logits(features.detach()).topk(k, dim=1).indices
            prompts = self.prompt_features(top).to(features.dtype)
            loss = transductive_loss(features, prompts, self.context.logit_scale, self.temperature)
            self.last = {"loss": loss.item(), "step": self.step(loss)}
        with torch.no_grad():
            return self.logits(F.normalize(self.encode(images), dim=-1)).softmax(dim=-1)
