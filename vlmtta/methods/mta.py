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
        return self.batched_features(features[None])[0]

    def batched_features(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, N, D] of B images -> [B, C]: one MeanShift per image, run side by side."""
        features = features.float()
        probs = self.logits(features).softmax(dim=-1)
        mode = self.mode(features, probs @ probs.mT)
        return self.logits(mode).softmax(dim=-1)

    def mode(self, features: torch.Tensor, affinity: torch.Tensor) -> torch.Tensor:
        """The inlierness-weighted MeanShift mode [D] of ``features`` [N, D] (unit norm) with view affinities
        [N, N]; or B modes [B, D] of [B, N, D] with [B, N, N].  Each image's inner loops stop on their own
        (its updates freeze once one moves less than ``tol``), so B images give what B calls would."""
        if features.ndim == 2:
            return self.mode(features[None], affinity[None])[0]
        if features.shape[1] == 1:
            return features[:, 0]
        h2 = bandwidths(features, self.knn_ratio)
        y = torch.full(features.shape[:2], 1.0 / features.shape[1], dtype=features.dtype, device=features.device)
        mode = features[:, 0]
        for _ in range(self.outer_steps):
            density = kernel(features, mode, h2)
            # A y as a product and a row sum, not a batched matmul: a row's result then does not depend on B
            y = self._until_still(y, lambda y: F.softmax((density + self.lambda_q * (affinity * y[:, None, :]).sum(-1))
                                                         / self.lambda_y, dim=-1))
            mode = self._until_still(mode, lambda m: F.normalize(
                _weighted_mean(features, kernel(features, m, h2) * y), dim=-1))
        return mode

    def _until_still(self, value: torch.Tensor, update) -> torch.Tensor:
        """Apply ``update`` to ``value`` [B, K] up to ``inner_steps`` times; an image's row stops changing after
        the first update that moves it less than ``tol`` (the per-image loop's ``break``)."""
        active = torch.ones(value.shape[0], dtype=torch.bool, device=value.device)
        for _ in range(self.inner_steps):
            new = update(value)
            still = torch.linalg.vector_norm(new - value, dim=-1) < self.tol
            value = torch.where(active[:, None], new, value)
            active = active & ~still
            if not bool(active.any()):
                break
        return value


def _weighted_mean(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i x_i / sum_i w_i`` per image: features [B, N, D], weights [B, N] -> [B, D]."""
    return (weights[:, None, :] @ features)[:, 0] / weights.sum(dim=-1, keepdim=True)


def bandwidths(features: torch.Tensor, knn_ratio: float = 0.3) -> torch.Tensor:
    """Squared bandwidth per view: half the mean squared distance to its ``int(knn_ratio (N-1))`` nearest others
    (features [N, D] -> [N], or [B, N, D] -> [B, N])."""
    k = max(1, int(knn_ratio * (features.shape[-2] - 1)))
    dist2 = torch.cdist(features, features).square()
    nearest = dist2.topk(k + 1, dim=-1, largest=False).values[..., 1:]  # drop the distance to itself
    return (0.5 * nearest.mean(dim=-1)).clamp_min(1e-12)  # duplicate views: no 0/0


def kernel(features: torch.Tensor, mode: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """Gaussian kernel ``exp(-|x_i - mode|^2 / (2 h_i^2))`` of every view: [N] (or [B, N] for B images)."""
    return torch.exp(-(features - mode[..., None, :]).square().sum(dim=-1) / (2 * h2))
