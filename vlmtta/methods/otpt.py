"""O-TPT: orthogonality-constrained test-time prompt tuning for calibration (Sharifdeen et al., CVPR 2025)."""
from __future__ import annotations

import torch

from ..entropy import marginal_entropy
from ..prompt_learner import DEFAULT_CTX_INIT
from .base import register
from .tpt import PROMPTS_PER_PASS, FINE_GRAINED, NATURAL_SHIFT, TPT

ORTHOGONALITY_FORMS = ("paper", "code", "frobenius")


def orthogonality_penalty(text_features: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """How far the normalised class text features [C, D] are from orthonormal, through their Gram matrix ``G``
    (one value per image from [B, C, D]).

    ``paper``: ``||G - I||_F^2``, the squared Frobenius norm summed over all C x C entries; with unit-norm rows the
    diagonal vanishes, so it is ``sum_{i != j} cos^2(t_i, t_j)`` (no mean, no square root).  ``code``:
    ``mean_c | ||G_c|| - 1 |`` over the rows ``G_c``, the value of the official code's construction (a Householder
    reflection of each row ``G_c`` onto ``||G_c|| e_c``, minus the identity, row norms averaged); since
    ``G_cc = 1`` it is ``mean_c sqrt(1 + sum_{k != c} cos^2(t_c, t_k)) - 1``.  ``frobenius``: ``||G - I||_F``.
    """
    gram = text_features @ text_features.mT
    if form == "code":
        return (torch.linalg.vector_norm(gram, dim=-1) - 1).abs().mean(dim=-1)
    if form not in ("paper", "frobenius"):
        raise ValueError(f"Unknown orthogonality form {form!r}; accepted: {', '.join(ORTHOGONALITY_FORMS)}.")
    residual = gram - torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    return residual.square().sum(dim=(-2, -1)) if form == "paper" else torch.linalg.matrix_norm(residual)


@register
class OTPT(TPT):
    """O-TPT: TPT whose loss adds ``otpt_lambda`` x an orthogonality penalty on the class text features.

    Loss = marginal entropy of the confident views + ``otpt_lambda`` x ``orthogonality_penalty(text)``; all else
    is TPT's (64 views, ratio 0.1, one AdamW step at lr 5e-3, "a photo of a" context, truncated text context).
    Per-dataset settings follow the official scripts, which split the sets as the paper's tables do: ImageNet
    and the fine-grained sets take lambda 18, the natural-shift variants (-A, -V2, -R, -Sketch) lambda 2
    (``dataset_defaults``); AugMix views everywhere except ImageNet itself, which the fine-grained script runs
    without ``--I_augmix`` (random resized crops + flips, TPT's ImageNet views).

    Penalty (``orthogonality``): the default ``"paper"`` is ``||T T^T - I||_F^2`` over the C normalised class
    text features (= the sum over class pairs i != j of cos^2).  The paper's text could not be read here; this
    form is the paper's equation as restated by a later paper that analyses it (Fillioux et al., SoC, CVPR 2026:
    ``L_ortho = ||S - I_K||_F^2 = sum_{i != j} s_ij^2``).  The released code computes something else with the
    same lambda: ``"code"``, the mean over classes of ``| ||row of T T^T|| - 1 |`` from its Householder
    construction (use it to reproduce the released numbers: the scripts' lambda 18 / 2 ran with it).  The sum
    grows with C^2 (its gradient with C), so at 1000 classes the penalty dominates the one AdamW step's
    direction; under CUDA fp16 the first steps may overflow and be skipped until the gradient scaler backs off.
    ``"frobenius"`` = ``||T T^T - I||_F`` (not squared).
    """

    name = "otpt"
    summary = "O-TPT: TPT plus an orthogonality penalty on the class text features (better calibration)."
    paper = ("Sharifdeen et al., O-TPT: Orthogonality Constraints for Calibrating Test-time Prompt Tuning in "
             "Vision-Language Models, CVPR 2025")
    dataset_defaults = {**{name: {"otpt_lambda": 2.0} for name in NATURAL_SHIFT},
                        **{name: {"otpt_lambda": 18.0} for name in FINE_GRAINED},
                        "imagenet": {"otpt_lambda": 18.0, "augmentation": "rrc_flip"}}

    def __init__(self, n_views: int = 64, augmentation: str = "augmix", steps: int = 1, lr: float = 5e-3,
                 confidence_ratio: float = 0.1, n_ctx: int = 4, ctx_init: str | None = DEFAULT_CTX_INIT,
                 coop_ctx: str | None = None, otpt_lambda: float = 18.0, orthogonality: str = "paper",
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
