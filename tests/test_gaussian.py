"""The online Gaussian core (vlmtta.gaussian) against direct batch computations."""
import pytest
import torch

from vlmtta import gaussian
from vlmtta.gaussian import (ClassGaussians, LinearDiscriminant, bayes_ridge_covariance, discriminant, scatter_about,
                             shrunk_covariance)


def _data(n=7, c=3, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.rand(n, c, generator=g, dtype=torch.float64).softmax(-1)
    m = torch.randn(c, d, generator=g, dtype=torch.float64)
    return x, w, m


def test_scatter_about_matches_the_explicit_double_sum():
    x, w, m = _data()
    direct = sum(w[i, j] * torch.outer(x[i] - m[j], x[i] - m[j]) for i in range(x.shape[0]) for j in range(m.shape[0]))
    assert torch.allclose(scatter_about(x, w, m), direct, atol=1e-10)


@pytest.mark.parametrize("mode", ["pooled", "class_mean"])
def test_online_updates_equal_the_batch_estimate(mode):
    """Sample-by-sample updates give the prior-weighted soft means and (old-mean centred) covariances computed
    directly from the whole history."""
    x, w, _ = _data(n=6, c=3, d=4, seed=1)
    c, d = w.shape[1], x.shape[1]
    prior_mean, prior_cov, count = torch.full((c, d), 0.1, dtype=torch.float64), 0.5 * torch.eye(d, dtype=torch.float64), 2.0
    g = ClassGaussians(prior_mean.float(), count, prior_cov.float(), mode)
    g.means, g.counts = g.means.double(), g.counts.double()
    if mode == "pooled":
        g.scatter = g.scatter.double()
    else:
        g.class_scatter = g.class_scatter.double()
    means, counts = prior_mean.clone(), torch.full((c,), count, dtype=torch.float64)
    class_scatter = [count * prior_cov.clone() for _ in range(c)]
    for i in range(x.shape[0]):
        g.update(x[i:i + 1], w[i:i + 1])
        for j in range(c):  # direct bookkeeping
            diff = x[i] - means[j]
            class_scatter[j] = class_scatter[j] + w[i, j] * torch.outer(diff, diff)
        means = (counts[:, None] * means + w[i][:, None] * x[i]) / (counts + w[i])[:, None]
        counts = counts + w[i]
    total = counts.sum()
    expected_cov = sum(class_scatter) / total if mode == "pooled" else \
        sum(s / n for s, n in zip(class_scatter, counts)) / c
    # the means equal the closed form: (count * prior + sum_i w_ij x_i) / (count + sum_i w_ij)
    closed = (count * prior_mean + w.t() @ x) / (count + w.sum(0))[:, None]
    assert torch.allclose(g.means, closed, atol=1e-10)
    assert torch.allclose(g.counts, count + w.sum(0), atol=1e-12)
    assert torch.allclose(g.covariance, expected_cov, atol=1e-10)


def test_batch_update_of_several_rows_equals_the_sum_of_their_contributions():
    x, w, _ = _data(n=5, c=2, d=3, seed=2)
    a = ClassGaussians(torch.zeros(2, 3), 1.0, torch.eye(3))
    a.update(x.float(), w.float())
    closed = (w.t() @ x).float() / (1 + w.sum(0)).float()[:, None]
    assert torch.allclose(a.means, closed, atol=1e-6)
    # all rows scatter about the prior means (zeros) in one batch update
    expected = (2 * torch.eye(3) + scatter_about(x, w, torch.zeros(2, 3, dtype=torch.float64)).float()) / a.counts.sum()
    assert torch.allclose(a.covariance, expected, atol=1e-6)


def test_reset_restores_the_prior():
    g = ClassGaussians(torch.ones(3, 2), 1.0, 0.3 * torch.eye(2))
    g.update(torch.randn(4, 2), torch.rand(4, 3))
    g.reset()
    assert torch.equal(g.means, torch.ones(3, 2))
    assert torch.equal(g.counts, torch.ones(3))
    assert torch.allclose(g.covariance, 0.3 * torch.eye(2))


def test_discriminant_is_the_gaussian_log_likelihood_up_to_a_per_sample_constant():
    x, _, m = _data(n=4, c=3, d=5, seed=3)
    a = torch.randn(5, 5, dtype=torch.float64)
    cov = a @ a.t() + torch.eye(5, dtype=torch.float64)
    loglik = torch.stack([torch.distributions.MultivariateNormal(m[j], cov).log_prob(x) for j in range(3)], dim=1)
    scores = discriminant(x, m, cov)
    assert torch.allclose((scores - loglik).std(dim=1), torch.zeros(4, dtype=torch.float64), atol=1e-8)


def test_discriminant_equals_the_explicit_precision_form():
    x, _, m = _data(n=3, c=4, d=6, seed=4)
    a = torch.randn(6, 6, dtype=torch.float64)
    cov = shrunk_covariance(a @ a.t() / 6, 0.1)
    assert torch.allclose(cov, 0.9 * a @ a.t() / 6 + 0.1 * torch.eye(6, dtype=torch.float64))
    precision = torch.linalg.inv(cov)
    expected = x @ precision @ m.t() - 0.5 * torch.einsum("cd,de,ce->c", m, precision, m)
    assert torch.allclose(discriminant(x, m, cov), expected, atol=1e-8)


@pytest.mark.parametrize("mode", ["pooled", "class_mean"])
def test_skipping_negligible_weights_changes_nothing_at_float32_resolution(mode):
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    w = (100 * x @ text.t()).softmax(-1)
    exact, truncated = (ClassGaussians(torch.full((50, 16), 1e-3), 1.0, 2e-3 * torch.eye(16), mode) for _ in range(2))
    for i in range(40):
        exact.update(x[i:i + 1], w[i:i + 1])
        truncated.update(x[i:i + 1], w[i:i + 1], min_weight=1e-9)
    assert torch.allclose(truncated.means, exact.means, rtol=1e-6, atol=1e-9)
    assert torch.allclose(truncated.counts, exact.counts, rtol=1e-6)
    assert torch.allclose(truncated.covariance, exact.covariance, rtol=1e-5, atol=1e-9)


def test_bad_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="covariance mode"):
        ClassGaussians(torch.zeros(2, 2), 1.0, torch.eye(2), "diagonal")


@pytest.mark.parametrize("min_weight", [0.0, 0.05])
def test_class_mean_scatter_equals_the_per_class_covariance_recurrence(min_weight):
    """The in-place per-class scatter (batched rank-N update, index_add_ when only some classes are active) gives
    the official code's recurrence Sigma_j <- (c_j Sigma_j + Delta_j) / (c_j + m_j) and its unweighted mean."""
    g = torch.Generator().manual_seed(6)
    c, d = 5, 4
    prior_mean, prior_cov = torch.randn(c, d, generator=g, dtype=torch.float64), 0.2 * torch.eye(d, dtype=torch.float64)
    model = ClassGaussians(prior_mean.float(), 1.0, prior_cov.float(), "class_mean")
    model.means, model.counts, model.class_scatter = (model.means.double(), model.counts.double(),
                                                      model.class_scatter.double())
    means, counts, covs = prior_mean.clone(), torch.ones(c, dtype=torch.float64), [prior_cov.clone() for _ in range(c)]
    skipped = 0
    for step in range(4):
        x = torch.randn(3, d, generator=g, dtype=torch.float64)  # three rows (views) per update
        w = (4 * torch.randn(3, c, generator=g, dtype=torch.float64)).softmax(-1)
        model.update(x, w, min_weight)
        for j in range(c):
            if not bool((w[:, j] > min_weight).any()):
                skipped += 1
                continue
            delta = sum(w[i, j] * torch.outer(x[i] - means[j], x[i] - means[j]) for i in range(3))
            covs[j] = (counts[j] * covs[j] + delta) / (counts[j] + w[:, j].sum())
            means[j] = (counts[j] * means[j] + w[:, j] @ x) / (counts[j] + w[:, j].sum())
            counts[j] = counts[j] + w[:, j].sum()
    assert (skipped > 0) == (min_weight > 0)  # the subset (index_add_) path was taken
    assert torch.allclose(model.means, means, atol=1e-12)
    assert torch.allclose(model.class_covariances, torch.stack(covs), atol=1e-12)
    assert torch.allclose(model.covariance, torch.stack(covs).mean(dim=0), atol=1e-12)


def test_bayes_ridge_covariance_inverts_to_the_ridge_precision():
    a = torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cov = torch.cov(a.t())  # 6 samples in 5 dimensions
    expected = 5 * torch.linalg.inv(5 * cov + cov.trace() * torch.eye(5, dtype=torch.float64))
    assert torch.allclose(torch.linalg.inv(bayes_ridge_covariance(cov, 6)), expected, atol=1e-10)


@pytest.mark.parametrize("inverse", ["pinv", "auto"])
def test_linear_discriminant_on_a_singular_covariance_uses_the_pseudo_inverse(inverse):
    x, _, m = _data(n=4, c=3, d=5, seed=5)
    a = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    cov = a.t() @ a  # rank 3 in 5 dimensions
    p = torch.linalg.pinv(cov, hermitian=True)
    expected = x @ p @ m.t() - 0.5 * torch.einsum("cd,de,ce->c", m, p, m)
    assert torch.allclose(LinearDiscriminant(m, cov, inverse=inverse).scores(x), expected, atol=1e-8)
    with pytest.raises(torch.linalg.LinAlgError):
        LinearDiscriminant(m, cov, inverse="cholesky")


def test_linear_discriminant_auto_is_the_inverse_for_a_positive_definite_covariance():
    x, _, m = _data(n=4, c=3, d=5, seed=7)
    a = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    cov = a @ a.t() + 0.1 * torch.eye(5, dtype=torch.float64)
    fitted = LinearDiscriminant(m, cov, inverse="auto")
    assert fitted._factor is not None
    assert torch.allclose(fitted.scores(x), discriminant(x, m, cov), atol=1e-10)
    assert torch.allclose(LinearDiscriminant(m, cov, inverse="pinv").scores(x), discriminant(x, m, cov), atol=1e-8)


def test_class_mean_covariance_carried_over_narrow_updates_equals_the_direct_mean(monkeypatch):
    """Updates touching few classes (here: under half) swap their terms in a carried float64 sum instead of reading
    every scatter; over a long stream that alternates narrow and wide updates it stays the direct mean."""
    monkeypatch.setattr(gaussian, "CARRY_BELOW", 2)  # 1000 classes in use; 40 here
    g = torch.Generator().manual_seed(3)
    c, d = 40, 6
    model = ClassGaussians(torch.randn(c, d, generator=g), 1.0, 0.1 * torch.eye(d), "class_mean")
    carried = wide = 0
    for step in range(300):
        x = torch.randn(1, d, generator=g)
        sharpness = 30.0 if step % 7 else 0.5  # mostly a few classes above min_weight, sometimes most of them
        w = (sharpness * torch.randn(1, c, generator=g)).softmax(-1)
        model.update(x, w, 1e-3)
        carried += model._scaled_sum is not None
        wide += model._scaled_sum is None
        direct = (model.class_scatter.double() / model.counts.double()[:, None, None]).mean(dim=0)
        assert torch.allclose(model.covariance.double(), direct, rtol=1e-5, atol=1e-7), step
    assert carried > 200 and wide > 10  # both paths taken, and the carry restarted after wide updates
