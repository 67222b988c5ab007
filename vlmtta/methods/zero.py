"""Zero: test-time augmentation with zero temperature (Farina et al., NeurIPS 2024)."""
from __future__ import annotations

import torch

from ..entropy import check_confidence, confidence_scores, confident_count, take_views
from .base import Method, register

@register
class Zero(Method):
    """Keep the ``ratio`` most confident views, let each vote one-hot (temperature -> 0), majority wins.

    Steps (paper, Sec. 3): encode the original and 63 random-resized-crop + flip views once;
    rank them by the entropy of their CLIP predictions and keep the 30 % most confident
    (``ratio=0.3``, the value the official code and README moved to from the paper's first 0.1);
    zero the softmax temperature, so each kept view is a one-hot vote; sum the votes.

    Ties between classes with the same vote count are broken greedily, as in the paper and the
    official code (whose ``sorted_idx`` is the full confidence ranking): the discarded views are
    visited from the most confident on, and the first whose prediction is one of the tied classes
    decides.  If no such view exists, the tied class with the highest logit in the first visited
    view wins.

    Returns the normalised vote counts (the winner of a broken tie gets one extra vote, as in the
    code).  ``confidence="tsallis"`` with ``q`` ranks the views by Tsallis entropy instead (TE).

    Precision: the official GPU runs compute the logits under fp16 autocast and divide them by
    ``torch.finfo(dtype).eps`` as the "zero temperature": in fp16 that is 2**-10, so classes whose
    cosines differ by less than a few thousandths share a view's vote (soft votes between near-ties).
    vlmtta follows the paper's one-hot votes (each kept view votes for its argmax).
    """

    name = "zero"
    summary = "Zero: majority vote of the 30% most confident views at zero softmax temperature (no backprop)."
    paper = "Farina et al., Frustratingly Easy Test-Time Adaptation of Vision-Language Models, NeurIPS 2024"

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", ratio: float = 0.3,
                 confidence: str = "shannon", q: float = 1.0):
        super().__init__(n_views=n_views, augmentation=augmentation)
        confident_count(self.n_views, ratio)  # validates the ratio
        check_confidence(confidence, q)
        self.ratio, self.confidence, self.q = float(ratio), confidence, float(q)

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.logits(features)
        order = torch.argsort(confidence_scores(logits, self.confidence, self.q), stable=True)
        kept = confident_count(logits.shape[0], self.ratio)
        votes = torch.bincount(logits[order[:kept]].argmax(dim=-1), minlength=logits.shape[1]).to(logits.dtype)
        tied = votes == votes.max()
        if int(tied.sum()) > 1:
            rest = order[kept:]
            votes[break_tie(tied, logits[rest] if len(rest) else logits[order])] += 1
        return votes / votes.sum()

    def batched_features(self, features: torch.Tensor) -> torch.Tensor:
        """``predict_features`` of B images at once: features [B, N, D] -> normalised votes [B, C]."""
        logits = self.logits(features)
        b, n, c = logits.shape
        order = torch.argsort(confidence_scores(logits, self.confidence, self.q), dim=-1, stable=True)
        kept = confident_count(n, self.ratio)
        ranked = logits.argmax(dim=-1).gather(1, order)  # each view's prediction, most confident view first
        votes = torch.zeros(b, c, dtype=logits.dtype, device=logits.device)
        votes.scatter_add_(1, ranked[:, :kept], torch.ones(b, kept, dtype=logits.dtype, device=logits.device))
        tied = votes == votes.max(dim=-1, keepdim=True).values
        broken = tied.sum(dim=-1) > 1
        if bool(broken.any()):
            visit = slice(kept, None) if kept < n else slice(None)  # the discarded views (all views if none)
            winners = break_ties(tied, ranked[:, visit], take_views(logits, order[:, visit][:, :1])[:, 0])
            rows = broken.nonzero().flatten()
            votes[rows, winners[rows]] += 1
        return votes / votes.sum(dim=-1, keepdim=True)


def break_ties(tied: torch.Tensor, predictions: torch.Tensor, first_logits: torch.Tensor) -> torch.Tensor:
    """``break_tie`` for B images: tied classes [B, C], the predictions [B, M] of the views visited in order
    and the logits [B, C] of the first visited view -> the winning class of each image [B]."""
    hits = tied.gather(1, predictions)
    first_hit = predictions.gather(1, hits.int().argmax(dim=-1, keepdim=True))[:, 0]
    fallback = first_logits.masked_fill(~tied, float("-inf")).argmax(dim=-1)
    return torch.where(hits.any(dim=-1), first_hit, fallback)


def break_tie(tied: torch.Tensor, logits: torch.Tensor) -> int:
    """The tied class (mask ``tied`` [C]) predicted by the first row of ``logits`` [M, C] that predicts one;
    if none does, the tied class with the highest logit in the first row."""
    hits = tied[logits.argmax(dim=-1)]
    if bool(hits.any()):
        return int(logits[int(hits.int().argmax())].argmax())
    return int(logits[0].masked_fill(~tied, float("-inf")).argmax())
