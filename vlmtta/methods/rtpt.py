"""R-TPT: robust test-time prompt tuning (Sheng et al., CVPR 2025; official code ``TomSheng21/R-TPT``)."""
from __future__ import annotations

import torch

from ..entropy import shannon_entropy
from ..prompt_learner import DEFAULT_CTX_INIT
from .base import register
from .tpt import PROMPTS_PER_PASS, FINE_GRAINED, TPT


def reliability_weights(features: torch.Tensor, neighbours: int, temperature: float) -> torch.Tensor:
    """R-TPT's view weights [N]: softmax over views of ``mean cos`` to their ``neighbours`` most similar other views
    (features [N, D], L2-normalised) divided by ``temperature``; per image [B, N] from [B, N, D]."""
    similarity = features @ features.mT
    similarity.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    k = min(neighbours, features.shape[-2] - 1)
    return (similarity.topk(k, dim=-1).values.mean(dim=-1) / temperature).softmax(dim=-1)


@register
class RTPT(TPT):
    """R-TPT: TPT with a pointwise-entropy loss and a reliability-weighted ensemble of every view's prediction.

    Loss: the mean of the per-view entropies of the ``confidence_ratio`` = 10 % lowest-entropy views (R-TPT keeps
    only this term of the marginal entropy's decomposition, dropping the KL term that the paper shows makes
    prompts vulnerable).  One AdamW step at lr 5e-3 from "a photo of a", 64 views (AugMix on the fine-grained
    sets), as TPT.  Prediction: every view's logits under the tuned context, averaged with weights
    ``softmax(s_i / temperature)``, ``s_i`` the mean cosine similarity of view ``i``'s image feature to its
    ``neighbours`` = 20 nearest other views (temperature 0.01); the softmax of that average.

    The official code drops "self" by masking similarities >= 1.0, which keeps a view's own similarity when it
    rounds below 1 (fp16) and drops exact duplicates; vlmtta masks the diagonal.  No adversarial attack is
    part of the method (the paper's attacks are evaluation settings).
    """

    name = "rtpt"
    summary = "R-TPT: TPT with a pointwise-entropy loss and a reliability-weighted ensemble of the views."
    paper = ("Sheng et al., R-TPT: Improving Adversarial Robustness of Vision-Language Models through Test-Time "
             "Prompt Tuning, CVPR 2025")
    dataset_defaults = {name: {"augmentation": "augmix"} for name in FINE_GRAINED}
    predicts_from_all_views = True

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", steps: int = 1, lr: float = 5e-3,
                 confidence_ratio: float = 0.1, n_ctx: int = 4, ctx_init: str | None = DEFAULT_CTX_INIT,
                 coop_ctx: str | None = None, neighbours: int = 20, temperature: float = 0.01,
                 reference_impl: bool = False, cache_init_graph: bool = True, init_seed: int = 0,
                 prompts_per_pass: int = PROMPTS_PER_PASS):
        super().__init__(n_views=n_views, augmentation=augmentation, steps=steps, lr=lr,
                         confidence_ratio=confidence_ratio, n_ctx=n_ctx, ctx_init=ctx_init, coop_ctx=coop_ctx,
                         reference_impl=reference_impl, cache_init_graph=cache_init_graph, init_seed=init_seed,
                         prompts_per_pass=prompts_per_pass)
        if int(neighbours) < 1 or not temperature > 0:
            raise ValueError(f"{self.name}: need neighbours >= 1 and temperature > 0, got {neighbours}, {temperature}.")
        self.neighbours, self.temperature = int(neighbours), float(temperature)

    def loss(self, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Mean per-view entropy of the selected views (one per image from [B, K, C])."""
        return shannon_entropy(logits.float()).mean(dim=-1)

    @torch.no_grad()
    def predict_after_tuning(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[0] == 1:
            return self.predict_tuned(features)
        with self.context.backbone.autocast():
            text = self.learner()
        weights = reliability_weights(features.float(), self.neighbours, self.temperature)
        return (weights @ self.logits(features, text).float()).softmax(dim=-1)

    def predict_many(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Each image's reliability-weighted ensemble of its views' logits under its tuned text features."""
        if features.shape[-2] == 1:
            return super().predict_many(features, text)
        weights = reliability_weights(features.float(), self.neighbours, self.temperature)
        return (weights.unsqueeze(-2) @ self.logits(features, text).float()).squeeze(-2).softmax(dim=-1)
