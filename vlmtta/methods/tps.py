"""TPS: test-time prototype shifting (Sui, Wang & Yeung-Levy, WACV 2025; official code ``elaine-sui/TPS``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..entropy import (check_confidence, confidence_scores, confident_count, take_views, marginal_entropy,
                       select_confident)
from .base import Context, Method, register


@register
class TPS(Method):
    """Learn a shift vector per class prototype on one image's confident views, then predict the original view.

    Per image (episodic): the cached class prototypes ``t_c`` (L2-normalised text embeddings, averaged over
    the templates) get shift vectors ``s_c`` that start at zero; the shifted prototypes are
    ``normalize(t_c + s_c)``.  ``steps`` = 1 AdamW step (lr 5e-3, torch's default weight decay 0.01, as the
    official code) minimises the marginal entropy of the ``confidence_ratio`` = 10 % lowest-entropy of the
    ``n_views`` = 64 views; the prediction is CLIP's on the original view with the shifted prototypes.  Only
    cached view and text features are used: no encoder runs backwards, so TPS runs on precomputed features.

    Options:
        per_class: one shift per class (the paper's best and default, the code's ``--per_label``);
            ``False`` learns one shift shared by every class.
        confidence, q: the per-view uncertainty that ranks views (Shannon; ``tsallis`` with ``q``).

    With several steps the official code re-ranks the views under the current shifts at every step (it
    computes the selection inside each step); vlmtta does too.  With the default single step this is the
    same as TPT's select-once rule.  The paper's best prototypes average the 80 ImageNet templates with
    GPT-4 class descriptors; pass ``templates`` (e.g. ``imagenet80``) to build them; descriptors are not
    shipped.  The official code runs under fp16 autocast with a gradient scaler on CUDA; vlmtta optimises
    the shifts in float32 (the logits follow ``Context.logits_dtype``).

    Many images at once (``predict_features_many``): the shifts get a leading image dimension [B, C, D], each
    image ranks its own views and the per-image losses are summed, so one AdamW over the [B, C, D] tensor
    (elementwise, same step count for every image) gives each image its own step: equal to one image at a time.
    """

    name = "tps"
    summary = "TPS: one AdamW step on per-class shifts of the class prototypes (confident views' marginal entropy)."
    paper = ("Sui, Wang & Yeung-Levy, Just Shift It: Test-Time Prototype Shifting for Zero-Shot Generalization "
             "with Vision-Language Models, WACV 2025")

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", steps: int = 1, lr: float = 5e-3,
                 confidence_ratio: float = 0.1, per_class: bool = True, confidence: str = "shannon", q: float = 1.0):
        super().__init__(n_views=n_views, augmentation=augmentation)
        if int(steps) < 1 or not lr > 0:
            raise ValueError(f"{self.name}: need steps >= 1 and lr > 0, got {steps} and {lr}.")
        confident_count(self.n_views, confidence_ratio)
        check_confidence(confidence, q)
        self.steps, self.lr, self.confidence_ratio = int(steps), float(lr), float(confidence_ratio)
        self.per_class, self.confidence, self.q = bool(per_class), confidence, float(q)

    def bind(self, context: Context) -> None:
        self.prototypes = context.text_features.float().clone()
        super().bind(context)

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(False):
            features = features.float().clone()
            shift = self.adapt(features)
            with torch.no_grad():
                return self.logits(features[:1], self.shifted(shift)).softmax(dim=-1)[0]

    def batched_features(self, features: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, C] of B images from their views' features [B, N, D]: all shifts tuned in one step."""
        with torch.inference_mode(False):
            features = features.float().clone()
            shift = self.adapt(features)
            with torch.no_grad():
                return self.logits(features[:, :1], self.shifted(shift)).softmax(dim=-1)[:, 0]

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        """The shifts [C, D] (or [1, D]) after ``steps`` AdamW steps on the views' features [N, D]; per image
        [B, C, D] from [B, N, D]."""
        rows = self.prototypes.shape[0] if self.per_class else 1
        shape = (*features.shape[:-2], rows, self.prototypes.shape[1])
        shift = torch.zeros(shape, device=features.device, requires_grad=True)
        optimizer = torch.optim.AdamW([shift], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = self.loss(features, shift).sum()  # per image: d(sum)/d(shift_b) = image b's gradient
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return shift.detach()

    def loss(self, features: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Marginal entropy of the confident views' logits under the shifted prototypes (one per image [B])."""
        logits = self.logits(features, self.shifted(shift))
        scores = confidence_scores(logits.detach(), self.confidence, self.q)
        kept = take_views(logits, select_confident(logits, self.confidence_ratio, scores))
        return marginal_entropy(kept.movedim(-2, 0))

    def shifted(self, shift: torch.Tensor) -> torch.Tensor:
        """The shifted, renormalised class prototypes [C, D] (per image [B, C, D])."""
        return F.normalize(self.prototypes + shift, dim=-1)
