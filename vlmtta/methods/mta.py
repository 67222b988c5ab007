"""MTA: MeanShift for test-time augmentation (Zanella & Ben Ayed, CVPR 2024)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Method, register


@register
class MTA(Method):
    """Seek the mode of the view embeddings with a MeanShift whose points are weighted by inlierness.

    Paper (Sec. 3) and official code, which agree:

    * bandwidth of view i: ``h_i^2 = 0.5 * mean squared distance to its k = int(0.3 (N-1))``
      nearest other views (``knn_ratio``);
    * affinity between views ``A = softmax(L) softmax(L)^T`` from their CLIP logits ``L``;
    * alternate (``outer_steps`` times): inlierness ``y = softmax_views((K(mode) + lambda_q A y) /
      lambda_y)`` with the Gaussian kernel ``K_i(m) = exp(-|x_i - m|^2 / (2 h_i^2))``
      (``inner_steps`` fixed-point updates), then the mode ``m = normalize(sum_i y_i K_i(m) x_i /
      sum_i y_i K_i(m))`` (``inner_steps`` MeanShift updates); each inner loop also stops when the
      update moves less than ``tol``;
    * the mode starts at the original view's embedding, the inlierness at uniform;
    * predict ``softmax(scale * cos(mode, class text))``.
    """

    name = "mta"
    summary = "MTA: MeanShift mode of the view embeddings, weighted by jointly optimised inlierness scores."
    paper = "Zanella & Ben Ayed, On the Test-Time Zero-Shot Generalization of Vision-Language Models: Do We Really Need Prompt Learning?, CVPR 2024"

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", lambda_y: float = 0.2,
                 lambda_q: float = 4.0, outer_steps: int = 5, inner_steps: int = 5, knn_ratio: float = 0.3,
                 tol: float = 1e-6):
        super().__init__(n_views=n_views, augmentation=augmentation)
        if not (lambda_y > 0 and lambda_q >= 0 and 0 < knn_ratio <= 1 and tol >= 0):
            raise ValueError("mta: need lambda_y > 0, lambda_q >= 0, 0 < knn_ratio <= 1 and tol >= 0.")
        if int(outer_steps) < 1 or int(inner_steps) < 1:
            raise ValueError("mta: outer_steps and inner_steps must be at least 1.")
        self.lambda_y, self.lambda_q, self.knn_ratio, self.tol = float(lambda_y), float(lambda_q), float(knn_ratio), float(tol)
        self.outer_steps, self.inner_steps = int(outer_steps), int(inner_steps)

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        features = features.float()
        probs = self.logits(features).softmax(dim=-1)
        mode = self.mode(features, probs @ probs.t())
        return self.logits(mode[None])[0].softmax(dim=-1)

    def mode(self, features: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
        """The inlierness-weighted MeanShift mode [D] of ``features`` [N, D] (unit norm)."""
        if features.shape[0] == 1:
            return features[0]
        h2 = bandwidths(features, self.knn_ratio)
        y = torch.full((features.shape[0],), 1.0 / features.shape[0], dtype=features.dtype, device=features.device)
        mode = features[0]
        for _ in range(self.outer_steps):
            density = kernel(features, mode, h2)
            for _ in range(self.inner_steps):
                y, old = F.softmax((density + self.lambda_q * affinity @ y) / self.lambda_y, dim=0), y
                if torch.linalg.vector_norm(y - old) < self.tol:
                    break
            for _ in range(self.inner_steps):
                weights = kernel(features, mode, h2) * y
                mode, old = F.normalize(weights @ features / weights.sum(), dim=0), mode
                if torch.linalg.vector_norm(mode - old) < self.tol:
                    break
        return mode


def bandwidths(features: torch.Tensor, knn_ratio: float = 0.3) -> torch.Tensor:
    """Squared bandwidth per view: half the mean squared distance to its ``int(knn_ratio (N-1))`` nearest others."""
    k = max(1, int(knn_ratio * (features.shape[0] - 1)))
    dist2 = torch.cdist(features, features).square()
    nearest = dist2.topk(k + 1, dim=1, largest=False).values[:, 1:]  # drop the distance to itself
    return (0.5 * nearest.mean(dim=1)).clamp_min(1e-12)  # duplicate views: no 0/0


def kernel(features: torch.Tensor, mode: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """Gaussian kernel ``exp(-|x_i - mode|^2 / (2 h_i^2))`` of every view [N]."""
    return torch.exp(-(features - mode).square().sum(dim=-1) / (2 * h2))
