"""O-TPT: orthogonality-constrained test-time prompt tuning for calibration (Sharifdeen et al., CVPR 2025)."""
from __future__ import annotations

import torch

from ..entropy import marginal_entropy
from ..prompt_learner import DEFAULT_CTX_INIT
from .base import register
from .tpt import PROMPTS_PER_PASS, FINE_GRAINED, NATURAL_SHIFT, TPT

ORTHOGONALITY_FORMS = ("code", "frobenius")


def orthogonality_penalty(text_features: torch.Tensor, form: str = "code") -> torch.Tensor:
    """How far the normalised class text features [C, D] are from orthonormal, through their Gram matrix ``G``
    (one value per image from [B, C, D]).

    ``code``: ``mean_c | ||G_c|| - 1 |`` over the rows ``G_c``, the value of the official code's construction
    (a Householder reflection of each row ``G_c`` onto ``||G_c|| e_c``, minus the identity, row norms averaged);
    since ``G_cc = 1`` it is ``mean_c sqrt(1 + sum_{k != c} cos^2(t_c, t_k)) - 1``.  ``frobenius``:
    ``||G - I||_F``, the plain orthogonality penalty.
    """
    gram = text_features @ text_features.mT
    if form == "code":
        return (torch.linalg.vector_norm(gram, dim=-1) - 1).abs().mean(dim=-1)
    if form == "frobenius":
        return torch.linalg.matrix_norm(gram - torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype))
    raise ValueError(f"Unknown orthogonality form {form!r}; accepted: {', '.join(ORTHOGONALITY_FORMS)}.")


@register
class OTPT(TPT):
    """O-TPT: TPT whose loss adds ``otpt_lambda`` x an orthogonality penalty on the class text features.

    Loss = marginal entropy of the confident views + ``otpt_lambda`` x ``orthogonality_penalty(text)``; all else
    is TPT's (64 views, ratio 0.1, one AdamW step at lr 5e-3, "a photo of a" context, truncated text context).
    Defaults follow the official scripts: AugMix views on every set (``--I_augmix`` on the ImageNet family),
    lambda 18 on the fine-grained sets and 2 on natural shift (``dataset_defaults``).

    The paper's own equation could not be read while writing this (only its abstract and project page:
    "orthogonality constraints on the textual features").  The default penalty is what the released code
    computes (``orthogonality="code"``, see ``orthogonality_penalty``); ``"frobenius"`` is the textbook
    ``||T T^T - I||_F``, offered as an option, not confirmed as the paper's.
    """

    name = "otpt"
    summary = "O-TPT: TPT plus an orthogonality penalty on the class text features (better calibration)."
    paper = ("Sharifdeen et al., O-TPT: Orthogonality Constraints for Calibrating Test-time Prompt Tuning in "
             "Vision-Language Models, CVPR 2025")
    dataset_defaults = {**{name: {"otpt_lambda": 18.0} for name in FINE_GRAINED},
                        **{name: {"otpt_lambda": 2.0} for name in NATURAL_SHIFT}}

    def __init__(self, n_views: int = 64, augmentation: str = "augmix", steps: int = 1, lr: float = 5e-3,
                 confidence_ratio: float = 0.1, n_ctx: int = 4, ctx_init: str | None = DEFAULT_CTX_INIT,
                 coop_ctx: str | None = None, otpt_lambda: float = 18.0, orthogonality: str = "code",
                 reference_impl: bool = False, cache_init_graph: bool = True, init_seed: int = 0,
                 prompts_per_pass: int = PROMPTS_PER_PASS):
        super().__init__(n_views=n_views, augmentation=augmentation, steps=steps, lr=lr,
                         confidence_ratio=confidence_ratio, n_ctx=n_ctx, ctx_init=ctx_init, coop_ctx=coop_ctx,
                         reference_impl=reference_impl, cache_init_graph=cache_init_graph, init_seed=init_seed,
                         prompts_per_pass=prompts_per_pass)
        if otpt_lambda < 0 or orthogonality not in ORTHOGONALITY_FORMS:
            raise ValueError(f"{self.name}: need otpt_lambda >= 0 and orthogonality in {ORTHOGONALITY_FORMS}; "
                             f"got {otpt_lambda}, {orthogonality!r}.")
        self.otpt_lambda, self.orthogonality = float(otpt_lambda), orthogonality

    def loss(self, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Marginal entropy of the selected views + ``otpt_lambda`` x the orthogonality penalty (per image from
        [B, K, C] and [B, C, D], as TPT's)."""
        return marginal_entropy(logits.float().movedim(-2, 0)) + self.otpt_lambda * orthogonality_penalty(text.float(), self.orthogonality)
