"""DeYO: destroy your object (Lee et al., ICLR 2024; ``Jhyun17/DeYO``).

Per batch, on the image encoder's normalisation parameters (top quarter of the blocks and the final
norm left out, as SAR):

1. entropy filter: keep samples whose prediction entropy is below ``tau_ent = 0.5 ln C``;
2. object-destroying view: split each kept image into a 4 x 4 grid of patches and shuffle them;
3. PLPD (pseudo-label probability difference): ``p(y_hat | x) - p(y_hat | x_shuffled)`` with
   ``y_hat`` the prediction on ``x``; keep samples with PLPD above ``tau_plpd`` (0.2);
4. weighted entropy: ``mean(H * (exp(-(H - 0.4 ln C)) + exp(PLPD)))`` over the kept samples,
   one SGD step (lr 0.001 at batch 64 for ViT-B, momentum 0.9).

The output is the prediction of the first forward pass (before the step), as in the official code.
The shuffled views are encoded without gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..entropy import shannon_entropy
from .base import register
from .batch import SGDNormAdaptation

__all__ = ["DeYO", "patch_shuffle", "plpd"]


def patch_shuffle(images: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """Each image [N, C, H, W] cut into ``grid`` x ``grid`` patches, put back in its own random order.

    Sides not divisible by ``grid`` are resized to the nearest smaller multiple first and back after
    (bilinear), as the official code does.
    """
    n, c, h, w = images.shape
    side_h, side_w = (h // grid) * grid, (w // grid) * grid
    x = images if (side_h, side_w) == (h, w) else F.interpolate(images, (side_h, side_w), mode="bilinear",
                                                                  antialias=True, align_corners=False)
    ph, pw = side_h // grid, side_w // grid
    patches = x.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    order = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1).to(images.device)
    patches = patches[torch.arange(n, device=images.device)[:, None], order]
    x = patches.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, side_h, side_w)
    return x if (side_h, side_w) == (h, w) else F.interpolate(x, (h, w), mode="bilinear", antialias=True,
                                                              align_corners=False)


def plpd(probs: torch.Tensor, probs_destroyed: torch.Tensor) -> torch.Tensor:
    """Pseudo-label probability difference [N]: ``p[y_hat] - p_destroyed[y_hat]`` with ``y_hat = argmax p``."""
    label = probs.argmax(dim=1, keepdim=True)
    return (probs.gather(1, label) - probs_destroyed.gather(1, label)).squeeze(1)


@register
class DeYO(SGDNormAdaptation):
    """Entropy minimisation on samples whose prediction depends on the object's shape (PLPD filter).

    Args:
        lr, momentum: SGD (paper, ViT-B at batch 64: 0.001, 0.9).
        entropy_threshold: ``tau_ent`` as a share of ``ln C`` (paper 0.5).
        entropy_margin: ``Ent_0`` of the entropy weight, share of ``ln C`` (paper 0.4).
        plpd_threshold: ``tau_plpd`` (paper 0.2 in the wild settings; the repo's mild ImageNet-C script uses 0.3).
        patch_grid: patches per side of the shuffled view (paper 4).
        reweight_entropy, reweight_plpd: the two terms of the sample weight (paper: both).
        frozen_top: share of the top transformer blocks left out, with the final norm (as SAR: 3 of 12).
        seed: seed of the patch permutations (restarted on ``reset``).
        reset: ``domain`` (paper: reset per corruption), ``batch`` or ``continual``.
        n_views, augmentation: views of one image when it runs per image (``Adapter.step``).
    """

    name = "deyo"
    summary = "Entropy minimisation on samples whose prediction drops when patches are shuffled (PLPD), per batch."
    paper = "Lee et al., Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled " \
            "Factors, ICLR 2024"

    def __init__(self, lr: float = 0.001, momentum: float = 0.9, entropy_threshold: float = 0.5,
                 entropy_margin: float = 0.4, plpd_threshold: float = 0.2, patch_grid: int = 4,
                 reweight_entropy: bool = True, reweight_plpd: bool = True, frozen_top: float = 0.25, seed: int = 0,
                 reset: str = "domain", n_views: int = 64, augmentation: str = "rrc_flip"):
        super().__init__(reset=reset, n_views=n_views, augmentation=augmentation)
        if lr <= 0 or int(patch_grid) < 1 or not 0 <= frozen_top < 1:
            raise ValueError("deyo: needs lr > 0, patch_grid >= 1 and frozen_top in [0, 1).")
        self.lr, self.momentum = float(lr), float(momentum)
        self.entropy_threshold, self.entropy_margin = float(entropy_threshold), float(entropy_margin)
        self.plpd_threshold, self.patch_grid = float(plpd_threshold), int(patch_grid)
        self.reweight_entropy, self.reweight_plpd = bool(reweight_entropy), bool(reweight_plpd)
        self.frozen_top, self.seed = float(frozen_top), int(seed)

    def reset(self) -> None:
        super().reset()
        self.generator = torch.Generator().manual_seed(self.seed)

    def weights(self, entropy: torch.Tensor, plpd_values: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Sample weights ``exp(-(H - Ent_0)) + exp(PLPD)`` (either term switchable; 1 when both are off)."""
        weight = torch.zeros_like(entropy)
        if self.reweight_entropy:
            weight = weight + torch.exp(-(entropy - self.entropy_margin * math.log(n_classes)))
        if self.reweight_plpd:
            weight = weight + torch.exp(plpd_values)
        return weight if (self.reweight_entropy or self.reweight_plpd) else torch.ones_like(entropy)

    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.logits(F.normalize(self.encode(images, grad=True), dim=-1))
        probs, n_classes = logits.detach().softmax(dim=-1), logits.shape[1]
        entropy = shannon_entropy(logits)
        keep = entropy.detach() < self.entropy_threshold * math.log(n_classes)
        self.last = {"after_entropy": int(keep.sum()), "after_plpd": 0, "step": False}
        if not keep.any():
            return probs
        destroyed = patch_shuffle(images.to(logits.device)[keep], self.patch_grid, self.generator)
        with torch.no_grad():
            probs_destroyed = self.logits(F.normalize(self.encode(destroyed), dim=-1)).softmax(dim=-1)
        difference = plpd(probs[keep], probs_destroyed)
        selected = difference > self.plpd_threshold
        self.last["after_plpd"] = int(selected.sum())
        if selected.any():
            kept = entropy[keep][selected]
            loss = (kept * self.weights(kept.detach(), difference[selected], n_classes)).mean()
            self.last.update(loss=loss.item(), step=self.step(loss))
        return probs
