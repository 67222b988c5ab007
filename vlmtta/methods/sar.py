"""SAR: sharpness-aware and reliable entropy minimisation (Niu et al., ICLR 2023; ``mr-eggplant/SAR``).

Per batch, on the image encoder's normalisation parameters (the top quarter of the blocks and the
final norm left out: blocks 9-11 and ``norm`` of ViT-B in the paper):

1. reliable samples: entropy below ``E0 = margin * ln C`` (paper 0.4 ln 1000);
2. sharpness-aware step (SAM, rho 0.05): gradient of their mean entropy, climb to
   ``w + rho g / ||g||``, recompute the entropies there, keep those still below ``E0``, and apply the
   gradient taken at the perturbed point to ``w`` with SGD (lr 0.001 at batch 64 for ViT-B,
   momentum 0.9);
3. model recovery: an EMA (0.9) of that second loss; when it falls below ``e_m = 0.2`` the model
   has collapsed to trivial solutions and is reset to the pre-trained parameters.

The output is the prediction of the first forward pass (before the step), as in the official code.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..entropy import shannon_entropy
from .base import register
from .batch import SGDNormAdaptation

__all__ = ["SAR", "sam_perturbation"]


def sam_perturbation(grads: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """SAM's ascent step ``rho * g / (||g||_2 + 1e-12)`` with the norm over all gradients together."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    return [g * (rho / (norm + 1e-12)) for g in grads]


@register
class SAR(SGDNormAdaptation):
    """Sharpness-aware entropy minimisation on reliable samples, with model recovery.

    Args:
        lr, momentum: SGD (paper, ViT-B at batch 64: 0.001, 0.9).
        rho: SAM neighbourhood radius (paper 0.05).
        margin: reliable-sample threshold as a share of ``ln C`` (paper 0.4).
        recovery_threshold: reset when the EMA of the second loss falls below it (paper ``e_m`` 0.2).
        ema_momentum: momentum of that EMA (official code 0.9).
        frozen_top: share of the top transformer blocks left out, with the final norm (paper: 3 of 12).
        reset: ``domain`` (paper: reset per corruption), ``batch`` or ``continual``.
        n_views, augmentation: views of one image when it runs per image (``Adapter.step``).

    Differences from the official code: a batch with no reliable sample (or none left at the
    perturbed point) makes no step (the code backpropagates the NaN mean of an empty set, so only
    SGD momentum moves the weights).
    """

    name = "sar"
    summary = "Sharpness-aware entropy minimisation on reliable samples, with model recovery, per batch."
    paper = "Niu et al., Towards Stable Test-Time Adaptation in Dynamic Wild World, ICLR 2023"

    def __init__(self, lr: float = 0.001, momentum: float = 0.9, rho: float = 0.05, margin: float = 0.4,
                 recovery_threshold: float = 0.2, ema_momentum: float = 0.9, frozen_top: float = 0.25,
                 reset: str = "domain", n_views: int = 64, augmentation: str = "rrc_flip"):
        super().__init__(reset=reset, n_views=n_views, augmentation=augmentation)
        if lr <= 0 or rho < 0 or margin <= 0 or not 0 <= frozen_top < 1 or not 0 <= ema_momentum < 1:
            raise ValueError("sar: needs lr > 0, rho >= 0, margin > 0, frozen_top and ema_momentum in [0, 1).")
        self.lr, self.momentum, self.rho, self.margin = float(lr), float(momentum), float(rho), float(margin)
        self.recovery_threshold, self.ema_momentum = float(recovery_threshold), float(ema_momentum)
        self.frozen_top = float(frozen_top)
        self.recoveries = 0

    def reset(self) -> None:
        super().reset()
        self.ema: float | None = None

    def entropies(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, C] and prediction entropies [B] with the current parameters (differentiable)."""
        logits = self.logits(F.normalize(self.encode(images, grad=True), dim=-1))
        return logits, shannon_entropy(logits)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        logits, entropy = self.entropies(images)
        threshold = self.margin * math.log(logits.shape[1])
        reliable = entropy < threshold
        self.last = {"reliable": int(reliable.sum()), "step": False, "recovered": False}
        if reliable.any():
            self._sharpness_aware_step(images, entropy[reliable].mean(), reliable, threshold)
        return logits.detach().softmax(dim=-1)

    def _sharpness_aware_step(self, images: torch.Tensor, loss: torch.Tensor, reliable: torch.Tensor,
                              threshold: float) -> None:
        params = self.norms.values()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return
        origin = self.norms.state()
        with torch.no_grad():
            for p, e in zip(params, sam_perturbation(grads, self.rho)):
                p.add_(e)  # climb to w + e(w)
        self.optimizer.zero_grad(set_to_none=True)
        second = self.entropies(images)[1][reliable]
        still = second < threshold
        self.last["reliable_second"] = int(still.sum())
        if still.any():
            loss_second = second[still].mean()
            loss_second.backward()
        self.norms.load(origin)  # back to w; the step uses the gradient taken at w + e(w)
        if still.any() and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
            self.optimizer.step()
            self.last["step"] = True
            self._track(loss_second.item())
        self.optimizer.zero_grad(set_to_none=True)

    def _track(self, loss_second: float) -> None:
        """EMA of the second loss; reset the model when it falls below the recovery threshold."""
        m = self.ema_momentum
        self.ema = loss_second if self.ema is None else m * self.ema + (1 - m) * loss_second
        self.last["ema"] = self.ema
        if self.ema < self.recovery_threshold:
            last = self.last
            self.reset()
            self.recoveries += 1
            self.last = {**last, "recovered": True}
