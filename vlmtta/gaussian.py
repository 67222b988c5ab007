"""Online class-conditional Gaussians over image features (Gaussian discriminant analysis; used by DOTA and FreeTTA).

``ClassGaussians`` keeps, for ``C`` classes, soft counts ``c_j``, running means ``mu_j`` and a covariance, updated
from a batch of features with soft class weights (pseudo-label probabilities) in a handful of tensor ops:

* means: ``mu_j <- (c_j mu_j + sum_i w_ij x_i) / (c_j + sum_i w_ij)`` (the prior mean weighs ``c_j``);
* per-class scatter, centred on the means *before* the update (as DOTA's official code does):
  ``c_j Sigma_j <- c_j Sigma_j + sum_i w_ij (x_i - mu_j)(x_i - mu_j)^T`` (``Delta_j``), i.e.
  ``Sigma_j <- (c_j Sigma_j + Delta_j) / (c_j + sum_i w_ij)``.

The shared covariance is ``class_mean`` (the unweighted mean ``sum_j Sigma_j / C`` of the per-class covariances,
DOTA's estimate; it needs every ``Sigma_j``: [C, D, D] memory, 1 GiB at 1000 classes and D = 512) or ``pooled``
(``sum_j c_j Sigma_j / sum_j c_j``, the count-weighted mean: linear discriminant analysis's pooled estimate, [D, D]
memory).  ``class_mean`` keeps the per-class scatters ``S_j = c_j Sigma_j`` (so an update adds ``Delta_j`` in place,
a batched rank-N update, instead of rescaling every ``Sigma_j``) and forms the mean as one weighted reduction
``sum_j S_j / c_j / C``: equal to the recurrence above, two passes over the [C, D, D] buffer per update.  An
update that touches only a few classes (``min_weight`` above the far tail of the soft labels) instead
carries ``sum_j S_j / c_j`` in float64 and swaps the updated classes' terms: reads only those ``k`` scatters
instead of all ``C`` (worth it below ``C / CARRY_BELOW`` classes, measured).  The carried sum starts from the full
path's float32 reduction and each swap subtracts a term recomputed from the same stored ``S_j``, ``c_j``: it stays
within float32 rounding of the direct mean, and restarts from the reduction after every wide update.  An update
of many classes runs in place over all of them (zero weight for the others: exact zeros added), never through a
[k, D, D] temporary.

Scoring is the linear discriminant ``x^T S^-1 mu_j - mu_j^T S^-1 mu_j / 2`` for a shared covariance ``S`` (e.g.
``shrunk_covariance`` or ``bayes_ridge_covariance``): the class log-likelihood up to a term that is the same for every
class.  ``LinearDiscriminant`` factorises ``S`` once for fixed means and scores any number of features afterwards
(Cholesky, or the Moore-Penrose pseudo-inverse for a singular ``S``); ``discriminant`` is the one-shot form.
``woodbury_update_`` carries a precision (and products with it) across a low-rank covariance update without a new
factorisation (FreeTTA keeps ``Sigma^-1`` this way).
"""
from __future__ import annotations

import torch

COVARIANCE_MODES = ("pooled", "class_mean")
# class_mean: carry sum_j S_j / c_j through updates of fewer than C / CARRY_BELOW classes.  Measured on the
# ImageNet stream (C 1000, D 512, one CPU thread, DOTA): 8 classes per update 34 ms per image vs 110 ms for the
# in-place pass over all classes; at 41 and 168 classes carrying was slower (176 and 703 ms, measured with a
# float64 restart that cost more than the float32 one used now).
CARRY_BELOW = 32


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
        else:  # every S_j = c_j Sigma_j
            self.class_scatter = (covariance * count).expand(means.shape[0], -1, -1).clone()
        self._covariance: torch.Tensor | None = None
        self._scaled_sum: torch.Tensor | None = None  # class_mean: sum_j S_j / c_j in float64, while carried

    @property
    def covariance(self) -> torch.Tensor:
        """The shared covariance [D, D] (computed once per update)."""
        if self._covariance is None:
            if self.mode == "pooled":
                self._covariance = self.scatter / self.counts.sum()
            elif self._scaled_sum is not None:
                self._covariance = (self._scaled_sum / self.counts.shape[0]).to(self.class_scatter.dtype)
            else:
                n_classes, dim = self.class_scatter.shape[:2]
                flat = self.class_scatter.view(n_classes, dim * dim)
                self._covariance = ((1.0 / self.counts) @ flat).view(dim, dim) / n_classes
        return self._covariance

    @property
    def class_covariances(self) -> torch.Tensor:
        """Every class's covariance ``Sigma_j`` [C, D, D] (``class_mean`` mode; a new tensor)."""
        return self.class_scatter / self.counts[:, None, None]

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
        active: torch.Tensor | slice = slice(None)
        if isinstance(min_weight, torch.Tensor) or min_weight > 0:
            keep = (w > min_weight).any(dim=0)
            if not bool(keep.all()):
                active = keep.nonzero().squeeze(1)
                w = w[:, active]
        means, counts = self.means[active], self.counts[active]
        mass = w.sum(dim=0)
        carried = False
        if self.mode == "pooled" and x.shape[0] == 1:  # one feature: the rank-k scatter, added in place
            factors = w.t().sqrt() * (x - means)  # [k, D]
            self.scatter.addmm_(factors.t(), factors)
        elif self.mode == "pooled":
            self.scatter += scatter_about(x, w, means)
        else:
            carried = self._carry_scaled_sum(active)
            if carried:
                self._scaled_sum -= self._scaled_terms(active)
            self._add_class_scatter(x, w, means, active)
        self.means[active] = (counts[:, None] * means + w.t() @ x) / (counts + mass)[:, None]
        self.counts[active] = counts + mass
        if carried:
            self._scaled_sum += self._scaled_terms(active)
        self._covariance = None
        return torch.arange(w.shape[1], device=w.device) if isinstance(active, slice) else active

    def _carry_scaled_sum(self, active: torch.Tensor | slice) -> bool:
        """Whether this update swaps terms of the carried ``sum_j S_j / c_j`` (fewer than ``C / CARRY_BELOW``
        classes updated); starts carrying it (one full pass) when needed, drops it before a wider update."""
        if not self._narrow(active):
            self._scaled_sum = None
            return False
        if self._scaled_sum is None:  # the full path's float32 reduction: starting costs no more than not carrying
            flat = self.class_scatter.view(self.counts.shape[0], -1)
            self._scaled_sum = ((1.0 / self.counts) @ flat).view_as(self.class_scatter[0]).double()
        return True

    def _narrow(self, active: torch.Tensor | slice) -> bool:
        """An update of so few classes (under ``C / CARRY_BELOW``) that touching only theirs pays."""
        return not isinstance(active, slice) and CARRY_BELOW * active.numel() < self.counts.shape[0]

    def _scaled_terms(self, classes: torch.Tensor) -> torch.Tensor:
        """``sum_{j in classes} S_j / c_j`` [D, D] in float64 (32 classes at a time: no [k, D, D] copy)."""
        dim = self.class_scatter.shape[-1]
        total = torch.zeros(dim, dim, dtype=torch.float64, device=self.class_scatter.device)
        for part in classes.split(32):  # each class's S_j / c_j in the stored precision, summed in float64
            total += (self.class_scatter[part] / self.counts[part][:, None, None]).sum(dim=0, dtype=torch.float64)
        return total

    def _add_class_scatter(self, x: torch.Tensor, w: torch.Tensor, means: torch.Tensor,
                           active: torch.Tensor | slice) -> None:
        """``S_j += sum_i w_ij (x_i - mu_j)(x_i - mu_j)^T`` for the active classes: one batched rank-N update
        (in place over every class, inactive ones at weight 0 — adding exact zeros — unless only a few are active),
        no [C, D, D] temporary."""
        if not isinstance(active, slice) and not self._narrow(active):  # in place, 0 elsewhere:
            full = w.new_zeros(w.shape[0], self.counts.shape[0]).index_copy_(1, active, w)  # no [k, D, D] temporary
            self._add_class_scatter(x, full, self.means, slice(None))
            return
        centred = (x[:, None, :] - means[None]).transpose(0, 1)  # [k, N, D]
        weighted = (centred * w.t()[:, :, None]).transpose(1, 2)  # [k, D, N]
        if isinstance(active, slice):
            self.class_scatter.baddbmm_(weighted, centred)
        else:  # a few classes: each one's block in place
            for k, j in enumerate(active.tolist()):
                self.class_scatter[j].addmm_(weighted[k], centred[k])


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


INVERSES = ("cholesky", "pinv", "auto")


def bayes_ridge_covariance(covariance: torch.Tensor, n: int | float) -> torch.Tensor:
    """``((n - 1) Sigma + tr(Sigma) I) / d`` for the sample covariance ``Sigma`` [D, D] of ``n`` samples: the
    covariance whose inverse ``d ((n - 1) Sigma + tr(Sigma) I)^-1`` is the empirical-Bayes ridge precision estimate
    for few samples (Kubokawa & Srivastava, J. Multivariate Anal. 2008, doi 10.1016/j.jmva.2008.01.016), as OGA's
    code computes it.  Positive definite whenever ``Sigma`` is positive semi-definite and not zero."""
    d = covariance.shape[0]
    eye = torch.eye(d, device=covariance.device, dtype=covariance.dtype)
    return ((n - 1) * covariance + covariance.diagonal().sum() * eye) / d


class LinearDiscriminant:
    """Scores ``x^T P mu_j - mu_j^T P mu_j / 2`` [N, C] of fixed means ``mu`` [C, D] under the precision ``P`` of a
    shared covariance ``S`` [D, D], with ``S`` factorised once: ``P = W^T W`` and ``z = W v``, so a score is
    ``z_x . z_mu - |z_mu|^2 / 2`` (one [D, D] solve per feature and a [D, C] product, the cost of CLIP scoring).

    ``inverse``: ``"cholesky"`` (``W = L^-1`` for ``S = L L^T``; ``S`` must be positive definite), ``"pinv"`` (the
    Moore-Penrose pseudo-inverse through ``eigh``: eigenvalues at or below ``D * eps * max`` count as zero, the
    default cutoff of ``torch.linalg.pinv``), ``"auto"`` (Cholesky, the pseudo-inverse if ``S`` is not positive
    definite: both equal ``S^-1`` for a positive definite ``S``)."""

    def __init__(self, means: torch.Tensor, covariance: torch.Tensor, inverse: str = "cholesky"):
        if inverse not in INVERSES:
            raise ValueError(f"Unknown inverse {inverse!r}; accepted: {', '.join(INVERSES)}.")
        self._factor = self._eigen = None
        if inverse == "cholesky":
            self._factor = torch.linalg.cholesky(covariance)
        elif inverse == "auto":
            factor, info = torch.linalg.cholesky_ex(covariance)
            if int(info) == 0:
                self._factor = factor
        if self._factor is None:
            values, vectors = torch.linalg.eigh(covariance)
            kept = values > covariance.shape[0] * torch.finfo(values.dtype).eps * values.abs().max()
            self._eigen = (vectors[:, kept].t(), values[kept].rsqrt())
        self.z_means = self.whiten(means.t())  # [D', C]
        self.half_norms = 0.5 * self.z_means.square().sum(dim=0)

    def whiten(self, vectors: torch.Tensor) -> torch.Tensor:
        """``W v`` of column vectors [D, M]."""
        if self._factor is not None:
            return torch.linalg.solve_triangular(self._factor, vectors.to(self._factor.dtype), upper=False)
        basis, scales = self._eigen
        return scales[:, None] * (basis @ vectors.to(basis.dtype))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Discriminant scores [N, C] of features [N, D]."""
        return self.whiten(features.t()).t() @ self.z_means - self.half_norms


def discriminant(features: torch.Tensor, means: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Linear discriminant scores ``x^T S^-1 mu_j - mu_j^T S^-1 mu_j / 2`` [N, C] of features [N, D] for a shared
    covariance ``S`` (symmetric positive definite): the Gaussian log-likelihoods up to a per-sample constant.

    Computed through the Cholesky factor ``S = L L^T`` (``z = L^-1 v``: scores ``z_x . z_mu - |z_mu|^2 / 2``), one
    triangular solve for all classes, without forming ``S^-1`` (``LinearDiscriminant`` keeps the factor)."""
    return LinearDiscriminant(means, covariance).scores(features.to(means.dtype))


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
