"""Online class-conditional Gaussians over image features, shared by DOTA and OGA (Gaussian discriminant analysis).

``ClassGaussians`` keeps, for ``C`` classes, soft counts ``c_j``, running means ``mu_j`` and a covariance, updated
from a batch of features with soft class weights (pseudo-label probabilities) in a handful of tensor ops:

* means: ``mu_j <- (c_j mu_j + sum_i w_ij x_i) / (c_j + sum_i w_ij)`` (the prior mean weighs ``c_j``);
* per-class scatter, centred on the means *before* the update (as DOTA's official code does):
  ``c_j Sigma_j <- c_j Sigma_j + sum_i w_ij (x_i - mu_j)(x_i - mu_j)^T``.

The shared covariance is ``pooled`` (``sum_j c_j Sigma_j / sum_j c_j``, the count-weighted mean of the per-class
covariances: linear discriminant analysis's pooled estimate, [D, D] memory) or ``class_mean`` (the unweighted mean
``sum_j Sigma_j / C``, which needs every ``Sigma_j``: [C, D, D] memory, 1 GiB at 1000 classes and D = 512).

Scoring is the linear discriminant ``x^T P mu_j - mu_j^T P mu_j / 2`` with a precision ``P`` (``shrunk_precision``
or ``ridge_precision``): the class log-likelihood up to a term that is the same for every class.  ``map_fusion``
combines such log-likelihoods with zero-shot probabilities as a prior (Bayes' rule).
"""
from __future__ import annotations

import torch

COVARIANCE_MODES = ("pooled", "class_mean")


class ClassGaussians:
    """Soft counts [C], means [C, D] and a shared covariance [D, D] of C classes, updated online."""

    def __init__(self, means: torch.Tensor, count: float, covariance: torch.Tensor, mode: str = "pooled"):
        """``means`` [C, D] and ``covariance`` [D, D] are the prior, weighing ``count`` samples per class."""
        if mode not in COVARIANCE_MODES:
            raise ValueError(f"Unknown covariance mode {mode!r}; accepted: {', '.join(COVARIANCE_MODES)}.")
        if means.ndim != 2 or covariance.shape != (means.shape[1], means.shape[1]):
            raise ValueError(f"ClassGaussians needs means [C, D] and covariance [D, D], got "
                             f"{tuple(means.shape)} and {tuple(covariance.shape)}.")
        if not count > 0:
            raise ValueError(f"The prior count must be positive, got {count}.")
        self.mode = mode
        self._prior = (means.float().clone(), float(count), covariance.float().clone())
        self.reset()

    def reset(self) -> None:
        """Back to the prior."""
        means, count, covariance = self._prior
        self.means = means.clone()
        self.counts = torch.full((means.shape[0],), count, device=means.device)
        if self.mode == "pooled":  # sum_j c_j Sigma_j
            self.scatter = covariance * self.counts.sum()
        else:  # every Sigma_j
            self.class_covariances = covariance.expand(means.shape[0], -1, -1).clone()

    @property
    def covariance(self) -> torch.Tensor:
        """The shared covariance [D, D]."""
        if self.mode == "pooled":
            return self.scatter / self.counts.sum()
        return self.class_covariances.mean(dim=0)

    def update(self, features: torch.Tensor, weights: torch.Tensor) -> None:
        """Add ``features`` [N, D] with soft class weights ``weights`` [N, C] (rows usually sum to 1)."""
        x, w = features.to(self.means.dtype), weights.to(self.means.dtype)
        mass = w.sum(dim=0)  # [C]
        if self.mode == "pooled":
            self.scatter += scatter_about(x, w, self.means)
        else:
            centred = x[:, None, :] - self.means[None]  # [N, C, D]
            delta = torch.einsum("nc,ncd,nce->cde", w, centred, centred)
            self.class_covariances = (self.counts[:, None, None] * self.class_covariances + delta) \
                / (self.counts + mass)[:, None, None]
        self.means = (self.counts[:, None] * self.means + w.t() @ x) / (self.counts + mass)[:, None]
        self.counts = self.counts + mass


def scatter_about(features: torch.Tensor, weights: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``sum_i sum_j w_ij (x_i - m_j)(x_i - m_j)^T`` [D, D] for features [N, D], weights [N, C], centres [C, D],
    without forming the [N, C, D] differences (cost O(N D^2 + C D^2))."""
    row_mass = weights.sum(dim=1)  # [N]
    mixed = weights @ centres  # [N, D]: sum_j w_ij m_j
    cross = features.t() @ mixed  # sum_i x_i (sum_j w_ij m_j)^T
    return (features.t() * row_mass) @ features - cross - cross.t() + centres.t() @ (weights.sum(dim=0)[:, None] * centres)


def shrunk_precision(covariance: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``((1 - epsilon) Sigma + epsilon I)^-1`` (DOTA)."""
    eye = torch.eye(covariance.shape[0], device=covariance.device, dtype=covariance.dtype)
    return _spd_inverse((1 - epsilon) * covariance + epsilon * eye)


def ridge_precision(covariance: torch.Tensor, n: int) -> torch.Tensor:
    """Empirical-Bayes ridge inverse ``D ((n - 1) Sigma + tr(Sigma) I)^-1`` of a covariance estimated from ``n``
    samples (OGA's estimator for ``n <= 4 D``; Bayes-ridge of Kubokawa & Srivastava, JMVA 2008)."""
    dim = covariance.shape[0]
    eye = torch.eye(dim, device=covariance.device, dtype=covariance.dtype)
    return dim * torch.linalg.pinv((n - 1) * covariance + covariance.diagonal().sum() * eye, hermitian=True)


def _spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive-definite matrix by Cholesky (falls back to ``inv`` if not PD)."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    return torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.inv(matrix)


def discriminant(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Linear discriminant scores ``x^T P mu_j - mu_j^T P mu_j / 2`` [N, C] of features [N, D]: the Gaussian
    log-likelihoods with shared precision ``P`` up to a per-sample constant."""
    projected = means @ precision  # [C, D] (P symmetric)
    return features.to(projected.dtype) @ projected.t() - 0.5 * (projected * means).sum(dim=-1)


def map_fusion(prior_probs: torch.Tensor, log_likelihood: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Posterior ``p_j ∝ prior_j exp(tau * loglik_j)`` along the last dimension."""
    return (prior_probs.clamp_min(torch.finfo(torch.float32).tiny).log() + tau * log_likelihood).softmax(dim=-1)
