"""Online class-conditional Gaussians over image features (Gaussian discriminant analysis; used by DOTA and FreeTTA).

``ClassGaussians`` keeps, for ``C`` classes, soft counts ``c_j``, running means ``mu_j`` and a covariance, updated
from a batch of features with soft class weights (pseudo-label probabilities) in a handful of tensor ops:

* means: ``mu_j <- (c_j mu_j + sum_i w_ij x_i) / (c_j + sum_i w_ij)`` (the prior mean weighs ``c_j``);
* per-class scatter, centred on the means *before* the update (as DOTA's official code does):
  ``c_j Sigma_j <- c_j Sigma_j + sum_i w_ij (x_i - mu_j)(x_i - mu_j)^T``.

The shared covariance is ``pooled`` (``sum_j c_j Sigma_j / sum_j c_j``, the count-weighted mean of the per-class
covariances: linear discriminant analysis's pooled estimate, [D, D] memory) or ``class_mean`` (the unweighted mean
``sum_j Sigma_j / C``, which needs every ``Sigma_j``: [C, D, D] memory, 1 GiB at 1000 classes and D = 512).

Scoring is the linear discriminant ``x^T S^-1 mu_j - mu_j^T S^-1 mu_j / 2`` for a shared covariance ``S`` (e.g.
``shrunk_covariance``): the class log-likelihood up to a term that is the same for every class.
``woodbury_update_`` carries a precision (and products with it) across a low-rank covariance update without a new
factorisation (FreeTTA keeps ``Sigma^-1`` this way).
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

    @property
    def priors(self) -> torch.Tensor:
        """The class priors [C]: the soft counts over their sum."""
        return self.counts / self.counts.sum()

    def update(self, features: torch.Tensor, weights: torch.Tensor,
               min_weight: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Add ``features`` [N, D] with soft class weights ``weights`` [N, C] (rows usually sum to 1); returns the
        indices of the classes updated (all of them with ``min_weight = 0``).

        ``min_weight > 0`` updates only the classes that some row weighs above it: with softmax weights at CLIP's
        temperature nearly all classes get weights far below float32 resolution (a weight of 1e-9 changes a count
        of 1 by less than its rounding), and skipping them turns the O(C D^2) update into O(k D^2).  A tensor
        ``min_weight`` [C] sets one threshold per class (e.g. proportional to the counts)."""
        x, w = features.to(self.means.dtype), weights.to(self.means.dtype)
        if isinstance(min_weight, torch.Tensor) or min_weight > 0:
            active = (w > min_weight).any(dim=0).nonzero().squeeze(1)
            w = w[:, active]
        else:
            active = torch.arange(w.shape[1], device=w.device)
        means, counts = self.means[active], self.counts[active]
        mass = w.sum(dim=0)
        if self.mode == "pooled" and x.shape[0] == 1:  # one feature: the rank-k scatter, added in place
            factors = w.t().sqrt() * (x - means)  # [k, D]
            self.scatter.addmm_(factors.t(), factors)
        elif self.mode == "pooled":
            self.scatter += scatter_about(x, w, means)
        else:
            centred = x[:, None, :] - means[None]  # [N, k, D]
            delta = torch.einsum("nc,ncd,nce->cde", w, centred, centred)
            self.class_covariances[active] = (counts[:, None, None] * self.class_covariances[active] + delta) \
                / (counts + mass)[:, None, None]
        self.means[active] = (counts[:, None] * means + w.t() @ x) / (counts + mass)[:, None]
        self.counts[active] = counts + mass
        return active


def scatter_about(features: torch.Tensor, weights: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """``sum_i sum_j w_ij (x_i - m_j)(x_i - m_j)^T`` [D, D] for features [N, D], weights [N, C], centres [C, D],
    without forming the [N, C, D] differences (cost O(N D^2 + C D^2))."""
    row_mass = weights.sum(dim=1)  # [N]
    mixed = weights @ centres  # [N, D]: sum_j w_ij m_j
    cross = features.t() @ mixed  # sum_i x_i (sum_j w_ij m_j)^T
    return (features.t() * row_mass) @ features - cross - cross.t() + centres.t() @ (weights.sum(dim=0)[:, None] * centres)


def shrunk_covariance(covariance: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``(1 - epsilon) Sigma + epsilon I`` (DOTA's regularised covariance)."""
    eye = torch.eye(covariance.shape[0], device=covariance.device, dtype=covariance.dtype)
    return (1 - epsilon) * covariance + epsilon * eye


def discriminant(features: torch.Tensor, means: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Linear discriminant scores ``x^T S^-1 mu_j - mu_j^T S^-1 mu_j / 2`` [N, C] of features [N, D] for a shared
    covariance ``S`` (symmetric positive definite): the Gaussian log-likelihoods up to a per-sample constant.

    Computed through the Cholesky factor ``S = L L^T`` (``z = L^-1 v``: scores ``z_x . z_mu - |z_mu|^2 / 2``), one
    triangular solve for all classes, without forming ``S^-1``."""
    factor = torch.linalg.cholesky(covariance)
    z_means = torch.linalg.solve_triangular(factor, means.t(), upper=False)  # [D, C]
    z_x = torch.linalg.solve_triangular(factor, features.to(means.dtype).t(), upper=False)  # [D, N]
    return z_x.t() @ z_means - 0.5 * z_means.square().sum(dim=0)



def woodbury_update_(precision: torch.Tensor, factors: torch.Tensor, products: torch.Tensor | None = None,
                     quadratic: torch.Tensor | None = None) -> None:
    """In place, for a low-rank covariance update ``S -> S + U U^T`` (``U = factors`` [D, k]): the symmetric
    precision ``P = S^-1`` [D, D] becomes ``P - P U (I + U^T P U)^-1 U^T P`` (Woodbury); ``products = P B``
    [D, n] becomes the new ``P B`` and ``quadratic`` [n] (``b_j^T P b_j``) the new quadratic forms, without ``B``.

    Cost O(D^2 k + k^3 + D k n) and no D x D or D x n temporaries, instead of a new factorisation (O(D^3)) and
    O(D^2 n) for the products; exact in exact arithmetic (use float64 over long streams)."""
    pu = precision @ factors  # [D, k]
    inner = torch.eye(factors.shape[1], dtype=precision.dtype, device=precision.device) + factors.t() @ pu
    if products is not None:
        projections = factors.t() @ products  # [k, n]: U^T P B
        solved = torch.linalg.solve(inner, projections)
        if quadratic is not None:
            quadratic.sub_((projections * solved).sum(dim=0))
        products.addmm_(pu, solved, alpha=-1)
    precision.addmm_(pu, torch.linalg.solve(inner, pu.t()), alpha=-1)
