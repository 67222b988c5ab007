"""DOTA: DistributiOnal Test-time Adaptation (Han et al., DOTA: Distributional Test-Time Adaptation of
Vision-Language Models, NeurIPS 2025, arXiv 2409.19375; official code ``skylineeeeen/DOTA``)."""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..entropy import select_confident
from ..gaussian import COVARIANCE_MODES, ClassGaussians, discriminant, shrunk_covariance
from .base import Context, Method, register

_CONFIGS = {  # ViT-B/16 configs of the official code (configs/vit/*.yaml): (epsilon, eta, rho); sigma is 0.002 on all
    "caltech101": (0.002, 0.3, 0.02), "dtd": (1e-4, 0.3, 0.02), "eurosat": (1e-4, 3.0, 0.05),
    "fgvc_aircraft": (1e-4, 0.2, 0.01), "food101": (4e-5, 0.1, 0.01), "oxford_flowers": (1e-4, 0.2, 0.02),
    "oxford_pets": (1e-4, 0.3, 0.02), "stanford_cars": (1e-4, 0.3, 0.01), "sun397": (1e-4, 0.2, 0.01),
    "ucf101": (1e-4, 0.4, 0.02), "imagenet": (1e-4, 0.2, 0.005),
}
_IMAGENET_VARIANTS = {  # the original + 63 AugMix views, the 10 % most confident kept
    "imagenet_a": (1e-4, 0.5, 0.02), "imagenet_v2": (1e-4, 0.1, 0.01), "imagenet_r": (1e-4, 0.3, 0.0025),
    "imagenet_sketch": (1e-4, 0.8, 0.03),
}
INIT_MEANS = ("constant", "text")


@register
class DOTA(Method):
    """Per-class Gaussians of the test features, estimated online from zero-shot soft labels, fused with CLIP.

    Per test image: CLIP logits of its views; with ``n_views > 1`` the ``confident_ratio`` lowest-entropy views are
    kept (CLIP logits = their mean, query = their mean feature), with one view the original is used.  DOTA's logits
    are the Gaussian discriminant ``x^T P mu_j - mu_j^T P mu_j / 2`` with the precision
    ``P = ((1 - epsilon) Sigma + epsilon I)^-1`` of the shared covariance; the prediction is
    ``softmax(clip + w * dota)`` with ``w = min(rho * mean_j(c_j) / V, eta)`` (``c_j``: the soft count of class
    ``j`` including its prior count 1, ``V``: the views used), so the estimate weighs more as samples accumulate.
    Then (after predicting, as in the official code) every kept view updates the means and covariance with its
    zero-shot probabilities as soft labels (one EM-like step, ``vlmtta.gaussian.ClassGaussians``) and ``P`` is
    recomputed.

    Prior: every class starts with count 1, covariance ``sigma I`` and mean ``init_scale`` on every coordinate
    (``init_means="constant"``: the official code passes a constant 0.001 matrix; ``"text"``: the class text
    embeddings, which the code's constructor comment describes).

    Paper vs official code: the code keeps one covariance per class (centred on the class mean before the update)
    and uses their unweighted average; that is ``covariance="class_mean"`` here ([C, D, D] memory: 1 GiB at 1000
    classes, D = 512, and O(C D^2) per image).  The default ``"pooled"`` weighs each class's covariance by its soft
    count (linear discriminant analysis's pooled estimate) and keeps only [D, D].  The paper text could not be
    checked here, so neither reading is confirmed as the paper's; the pooled one is the default for its memory.
    The code computes ``P`` and the scores in fp16; vlmtta in fp32, through a Cholesky factor of the regularised
    covariance (no explicit inverse).  Each update skips the classes whose soft label is below ``min_weight``
    (1e-9: far below float32 resolution of the counts and means they would change; 0 = update every class), so
    an image costs one Cholesky factorisation and one triangular solve with C right-hand sides.  Defaults are the ImageNet ViT-B/16 config;
    ``dataset_defaults`` holds every dataset's.
    """

    name = "dota"
    summary = "Online per-class Gaussians of test features from zero-shot soft labels, discriminant fused with CLIP."
    paper = "Han et al., DOTA: Distributional Test-Time Adaptation of Vision-Language Models, NeurIPS 2025"
    episodic = False
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        **{key: {"epsilon": e, "eta": eta, "rho": rho, "n_views": 1} for key, (e, eta, rho) in _CONFIGS.items()},
        **{key: {"epsilon": e, "eta": eta, "rho": rho, "n_views": 64, "augmentation": "augmix"}
           for key, (e, eta, rho) in _IMAGENET_VARIANTS.items()},
    }

    def __init__(self, n_views: int = 1, augmentation: str = "augmix", confident_ratio: float = 0.1,
                 epsilon: float = 1e-4, sigma: float = 0.002, eta: float = 0.2, rho: float = 0.005,
                 init_means: str = "constant", init_scale: float = 0.001, covariance: str = "pooled",
                 min_weight: float = 1e-9):
        super().__init__(n_views=n_views, augmentation=augmentation)
        if not 0 < confident_ratio <= 1:
            raise ValueError(f"{self.name}: confident_ratio must lie in (0, 1], got {confident_ratio}.")
        if not 0 <= epsilon <= 1 or not sigma > 0 or eta < 0 or rho < 0:
            raise ValueError(f"{self.name}: need 0 <= epsilon <= 1, sigma > 0, eta >= 0, rho >= 0; "
                             f"got {epsilon}, {sigma}, {eta}, {rho}.")
        if init_means not in INIT_MEANS:
            raise ValueError(f"{self.name}: init_means must be one of {INIT_MEANS}, got {init_means!r}.")
        if min_weight < 0:
            raise ValueError(f"{self.name}: min_weight must be >= 0, got {min_weight}.")
        if covariance not in COVARIANCE_MODES:
            raise ValueError(f"{self.name}: covariance must be one of {COVARIANCE_MODES}, got {covariance!r}.")
        self.confident_ratio, self.epsilon, self.sigma = float(confident_ratio), float(epsilon), float(sigma)
        self.eta, self.rho = float(eta), float(rho)
        self.init_means, self.init_scale, self.covariance = init_means, float(init_scale), covariance
        self.min_weight = float(min_weight)
        self.gaussians: ClassGaussians | None = None

    def bind(self, context: Context) -> None:
        text = context.text_features.float()
        means = text.clone() if self.init_means == "text" else torch.full_like(text, self.init_scale)
        eye = torch.eye(text.shape[1], device=text.device)
        self.gaussians = ClassGaussians(means, 1.0, self.sigma * eye, self.covariance)
        super().bind(context)

    def reset(self) -> None:
        if self.gaussians is not None:
            self.gaussians.reset()

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.logits(features)
        if features.shape[0] > 1:
            keep = select_confident(logits, self.confident_ratio)
            features, logits = features[keep], logits[keep]
        clip_logits = logits.mean(dim=0)
        covariance = shrunk_covariance(self.gaussians.covariance, self.epsilon)
        scores = discriminant(features.float().mean(dim=0, keepdim=True), self.gaussians.means, covariance)[0]
        weight = (self.rho * self.gaussians.counts.mean() / features.shape[0]).clamp(max=self.eta)
        probs = (clip_logits + weight * scores).softmax(dim=-1)
        self.gaussians.update(features, logits.softmax(dim=-1), self.min_weight)
        return probs
