"""SubTTA: subspace alignment for test-time adaptation of VLMs (Zeng et al., arXiv 2601.08139;
official code ``zhichenz98/SubTTA_EMNLP26``, ``classification/methods/subtta.py``).

Per batch of test images:

1. text subspace (once per class set): SVD of the centred class text features, basis rows
   ``[1, 1 + r)`` (the first principal direction dropped), ``r = min(C - 1, 256)``;
2. visual subspace: an EMA (momentum 0.5) of the image-feature covariance, initialised from the
   text covariance; its top singular directions (the first dropped likewise);
3. geometric alignment: one AdamW step (lr 5e-4, wd 0.01) on the squared chordal distance
   ``r - ||B_T B_V^T||_F^2``, backpropagated through the SVD into the image encoder's normalisation
   affine parameters;
4. semantic projection: re-encode, project the features onto the text subspace
   (``P_T = B_T^T B_T``), normalise, pseudo-label with the projected logits;
5. a second AdamW step with a plug-in TTA loss on the projected features (``mint`` default:
   intra-class minus total variance; ``tent``; ``batclip``; ``source`` = none);
6. output: the ordinary CLIP logits of the batch re-encoded after both updates (official code).

The shared backbone is never written to: the adapted norm parameters are this method's own tensors
(``vlmtta.norms.TrainableNorms``, shared with the other batch methods through ``NormAdaptation``);
``reset()`` copies the originals back (bit-exact) and clears the optimiser and covariance state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..entropy import shannon_entropy
from .base import register
from .batch import NormAdaptation

__all__ = [
    "SubTTA",
    "batclip_loss",
    "chordal_distance_sq",
    "class_means",
    "covariance",
    "mint_loss",
    "project",
    "text_subspace",
    "top_subspace",
]

SUBTTA_LOSSES = ("mint", "tent", "batclip", "source")

# ---- geometry ------------------------------------------------------------------------------------
def covariance(features: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """Sample covariance [D, D] of ``features`` [N, D] (divisor N - 1 + 1e-6, as the official code),
    plus ``ridge`` times the identity."""
    centred = features - features.mean(dim=0, keepdim=True)
    cov = centred.t() @ centred / (features.shape[0] - 1 + 1e-6)
    return cov + ridge * torch.eye(features.shape[1], dtype=cov.dtype, device=cov.device) if ridge else cov

def top_subspace(matrix: torch.Tensor, rank: int, skip_first: bool = True) -> torch.Tensor:
    """Orthonormal rows [r, D]: right singular vectors ``[s, s + rank)`` of ``matrix`` (s = 1 if ``skip_first``)."""
    start = int(skip_first)
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh[start:start + rank]

def text_subspace(text_features: torch.Tensor, max_rank: int = 256, remove_first_pc: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Text basis [r, D] (``r = min(C - 1, max_rank)`` without the first principal direction) and the
    text covariance [D, D] that initialises the visual EMA."""
    n_classes, dim = text_features.shape
    rank = min(n_classes - int(remove_first_pc), max_rank, dim - int(remove_first_pc))
    centred = text_features - text_features.mean(dim=0, keepdim=True)
    return top_subspace(centred, rank, remove_first_pc), covariance(text_features, ridge=0.0)

def chordal_distance_sq(basis_a: torch.Tensor, basis_b: torch.Tensor) -> torch.Tensor:
    """Squared chordal distance ``r - ||A B^T||_F^2`` between subspaces with orthonormal rows (r = rows of A)."""
    return basis_a.shape[0] - (basis_a @ basis_b.t()).pow(2).sum()

def project(features: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of ``features`` [N, D] onto the row space of ``basis`` [r, D] (``f B^T B``)."""
    return features @ basis.t() @ basis

# ---- plug-in losses ------------------------------------------------------------------------------
def class_means(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean feature [K, D] of each label present (in ``labels.unique()`` order) and each sample's row in it [N]."""
    present, inverse = labels.unique(return_inverse=True)
    onehot = F.one_hot(inverse, present.numel()).to(features.dtype)  # [N, K]
    return onehot.t() @ features / onehot.sum(dim=0)[:, None], inverse

def mint_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """MINT: mean squared distance to the pseudo-class mean minus mean squared distance to the batch mean
    (a constant 0, so no step, for fewer than 2 samples or pseudo-classes)."""
    if features.shape[0] < 2 or labels.unique().numel() < 2:
        return features.new_zeros(())
    means, inverse = class_means(features, labels)
    intra = (features - means[inverse]).pow(2).sum(dim=1).mean()
    total = (features - features.mean(dim=0)).pow(2).sum(dim=1).mean()
    return intra - total

def batclip_loss(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BATCLIP: mean pairwise cosine between the normalised pseudo-class means (constant 0 for < 2 classes)."""
    if labels.unique().numel() < 2:
        return features.new_zeros(())
    means = F.normalize(class_means(features, labels)[0], dim=-1)
    upper = torch.triu_indices(means.shape[0], means.shape[0], offset=1, device=means.device)
    return (means @ means.t())[upper[0], upper[1]].mean()

@register
class SubTTA(NormAdaptation):
    """Subspace alignment TTA: image-encoder norm parameters aligned to the text subspace, then a TTA loss.

    Protocols:

    * ``predict_batch(images [B, 3, S, S]) -> [B, C]``: the paper's online batch protocol (batch 64);
      state persists across batches until ``reset()`` (runners call it between domain shifts).
    * ``predict_views(views [N, 3, S, S]) -> [C]``: per-image streaming mode, used by ``predict`` and
      ``Adapter.step``: one image's ``n_views`` views (view 0 the original) form the batch, and the
      original view's adapted probabilities are returned.  Updates persist across images (online).

    Args:
        n_views, augmentation: views of one image in streaming mode (default 64 = the paper's batch size).
        rank: cap of the subspace rank (paper: 256; r = min(C - 1, rank)).
        remove_first_pc: drop the first principal direction of both subspaces (paper: yes).
        cov_momentum: EMA momentum of the visual covariance (paper 0.5; 0 disables the alignment step).
        lr, weight_decay, beta1: AdamW (paper: 5e-4, 0.01, 0.9; beta2 0.999).
        loss: plug-in loss of the second step: ``mint`` (paper default), ``tent`` (entropy of
            ``ent_scale`` x projected cosine logits; the official code applies it to
            ``softmax(ent_scale * feature)`` over feature dimensions), ``batclip`` or ``source`` (none).
        ent_scale: temperature of ``tent`` (official code: 3).
        predict_projected: predict from the projected logits instead of the ordinary ones (the
            official code returns the ordinary logits).
        reset: reset policy, ``domain`` (paper: ``reset_each_shift``), ``batch`` or ``continual``
            (see ``vlmtta.methods.batch``).

    Differences from the official code: gradients are zeroed before each step (the code lets the
    alignment step accumulate onto the previous batch's loss gradients); a step whose gradients are
    not finite is skipped (what the code's fp16 GradScaler does); a degenerate plug-in loss (one
    pseudo-class in the batch) makes no step (the code would call backward on a constant).
    """

    name = "subtta"
    summary = "Aligns the image-feature subspace to the text subspace by tuning the image encoder's norm layers."
    paper = "Zeng et al., Subspace Alignment for Vision-Language Model Test-time Adaptation, arXiv 2601.08139"

    def __init__(self, n_views: int = 64, augmentation: str = "rrc_flip", rank: int = 256,
                 remove_first_pc: bool = True, cov_momentum: float = 0.5, lr: float = 5e-4,
                 weight_decay: float = 0.01, beta1: float = 0.9, loss: str = "mint", ent_scale: float = 3.0,
                 predict_projected: bool = False, reset: str = "domain"):
        super().__init__(reset=reset, n_views=n_views, augmentation=augmentation)
        if loss not in SUBTTA_LOSSES:
            raise ValueError(f"subtta: loss must be one of {SUBTTA_LOSSES}, got {loss!r}.")
        if not 0 <= cov_momentum < 1:
            raise ValueError(f"subtta: cov_momentum must lie in [0, 1), got {cov_momentum}.")
        if int(rank) < 1 or lr <= 0:
            raise ValueError("subtta: rank must be >= 1 and lr > 0.")
        self.rank, self.remove_first_pc, self.cov_momentum = int(rank), bool(remove_first_pc), float(cov_momentum)
        self.lr, self.weight_decay, self.beta1 = float(lr), float(weight_decay), float(beta1)
        self.loss, self.ent_scale, self.predict_projected = loss, float(ent_scale), bool(predict_projected)

    # ---- state ---------------------------------------------------------------------------------
    def bind(self, context) -> None:
        text = context.text_features.float()
        self.text_basis, self.text_cov = text_subspace(text, self.rank, self.remove_first_pc)
        super().bind(context)

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, betas=(self.beta1, 0.999), weight_decay=self.weight_decay)

    def reset(self) -> None:
        """Restore the original norm parameters (bit-exact), a fresh optimiser, the covariance from text."""
        super().reset()
        self.running_cov: torch.Tensor | None = None

    # ---- pieces ----------------------------------------------------------------------------------
    def visual_subspace(self, features: torch.Tensor) -> torch.Tensor:
        """Mix the batch covariance into the running one (EMA) and return its top subspace."""
        running = self.text_cov if self.running_cov is None else self.running_cov
        cov = self.cov_momentum * running + (1 - self.cov_momentum) * covariance(features)
        self.running_cov = cov.detach()
        return top_subspace(cov, self.text_basis.shape[0], self.remove_first_pc)

    def _tta_loss(self, projected: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.loss == "mint":
            return mint_loss(projected, labels)
        if self.loss == "batclip":
            return batclip_loss(projected, labels)
        return shannon_entropy(logits * (self.ent_scale / self.context.logit_scale)).mean()  # tent

    # ---- prediction ----------------------------------------------------------------------------
    def adapt(self, images: torch.Tensor) -> torch.Tensor:
        """Alignment step, plug-in loss step, then the ordinary (or projected) probabilities [B, C]."""
        text = self.context.text_features.float()
        basis = self.text_basis
        if self.cov_momentum > 0:
            vis = self.visual_subspace(self.encode(images, grad=True))
            distance = chordal_distance_sq(basis, vis)
            self.last["chordal_distance_sq"] = distance.item()
            self.last["align_step"] = self.step(distance / (basis.shape[0] * (1 - self.cov_momentum)))
        if self.loss != "source":
            projected = F.normalize(project(self.encode(images, grad=True), basis), dim=-1)
            logits = self.logits(projected, text)
            loss = self._tta_loss(projected, logits, logits.detach().argmax(dim=1))
            self.last["tta_loss"] = loss.item()
            self.last["tta_step"] = self.step(loss)
        with torch.no_grad():
            features = self.encode(images)
            features = project(features, basis) if self.predict_projected else features
            return self.logits(F.normalize(features, dim=-1), text).softmax(dim=-1)
