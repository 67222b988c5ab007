"""FreeTTA on hand-built features: E/M steps against a plain numpy reference, the Woodbury-carried precision,
the zero-fusion invariant, truncation, views, reset, registry and options."""
from functools import partial

import numpy as np
import pytest
import torch

from conftest import bound_on_text, clustered_features
from vlmtta.gaussian import woodbury_update_
from vlmtta.methods import Need, check_options, create_method, get_method_class

_bound = partial(bound_on_text, "freetta")
EXACT = {"max_rank": 1000, "min_change": 0.0}  # no truncation: the paper's full M-step


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max())
    return e / e.sum()


class NumpyFreeTTA:
    """The method written out directly: explicit inverse, explicit per-class loops, float64."""

    def __init__(self, text, alpha, beta, posterior="fused", sigma=1.0, prior=1.0, log_prior=True):
        c, d = text.shape
        self.log_prior = log_prior
        self.text, self.alpha, self.beta, self.posterior = text, alpha, beta, posterior
        self.mu, self.cov = text.copy(), sigma * np.eye(d)
        self.n, self.t = np.full(c, prior / c), prior

    def step(self, x):
        z = 100 * self.text @ x
        inv = np.linalg.inv(self.cov)
        g = np.array([x @ inv @ m - 0.5 * m @ inv @ m for m in self.mu]) + self.log_prior * np.log(self.n / self.t)
        probs = _softmax(z + self.alpha * g)
        p0 = _softmax(z)
        w = np.exp(-self.beta * -(p0 * np.log(p0)).sum())
        gamma = {"fused": probs, "gaussian": _softmax(g), "zeroshot": p0}[self.posterior]
        v = w * gamma
        scatter = sum(v[y] * np.outer(x - self.mu[y], x - self.mu[y]) for y in range(len(v)))
        self.cov = (self.t * self.cov + scatter) / (self.t + v.sum())
        self.mu = (self.n[:, None] * self.mu + v[:, None] * x) / (self.n + v)[:, None]
        self.n, self.t = self.n + v, self.t + v.sum()
        return probs


def _check_state(m, ref):
    g = m.gaussians
    np.testing.assert_allclose(g.means.numpy(), ref.mu, atol=1e-6)
    np.testing.assert_allclose(g.counts.numpy(), ref.n, rtol=1e-5)
    np.testing.assert_allclose(float(g.counts.sum()), ref.t, rtol=1e-5)
    np.testing.assert_allclose(g.covariance.numpy(), ref.cov, atol=1e-6)
    np.testing.assert_allclose((m.scale * m.precision).numpy(), np.linalg.inv(ref.cov), rtol=1e-5, atol=1e-5)


def test_two_class_first_step_by_hand():
    text = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    x = torch.tensor([0.8, 0.6, 0.0, 0.0, 0.0, 0.0])
    alpha, beta = 0.5, 2.0
    m = _bound(text, alpha=alpha, beta=beta, **EXACT)
    probs = m.predict_features(x[None])
    # Sigma = I, mu = text, N = (1/2, 1/2), t = 1: g_y = x . t_y - 1/2 + log 1/2
    z, g = np.array([80.0, 60.0]), np.array([0.8, 0.6]) - 0.5 + np.log(0.5)
    expected = _softmax(z + alpha * g)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-5)
    p0 = _softmax(z)
    v = np.exp(-beta * -(p0 * np.log(p0)).sum()) * expected
    np.testing.assert_allclose(m.gaussians.counts.numpy(), 0.5 + v, rtol=1e-5)
    mu0 = (0.5 * np.array([1.0, 0, 0, 0, 0, 0]) + v[0] * x.numpy()) / (0.5 + v[0])
    np.testing.assert_allclose(m.gaussians.means[0].numpy(), mu0, atol=1e-6)
    d0, d1 = x.numpy() - text[0].numpy(), x.numpy() - text[1].numpy()
    cov = (np.eye(6) + v[0] * np.outer(d0, d0) + v[1] * np.outer(d1, d1)) / (1 + v.sum())
    np.testing.assert_allclose(m.gaussians.covariance.numpy(), cov, atol=1e-6)


@pytest.mark.parametrize("posterior", ["fused", "gaussian", "zeroshot"])
def test_stream_matches_the_numpy_reference(posterior):
    text, feats = clustered_features(12, 3, 10, noise=0.5)
    m = _bound(text, alpha=0.3, beta=1.0, posterior=posterior, sigma=0.5, **EXACT)
    ref = NumpyFreeTTA(text.double().numpy(), 0.3, 1.0, posterior, sigma=0.5)
    for i in range(feats.shape[0]):
        got = m.predict_features(feats[i:i + 1])
        np.testing.assert_allclose(got.numpy(), ref.step(feats[i].double().numpy()), atol=1e-5, err_msg=str(i))
    _check_state(m, ref)


def test_without_the_log_prior_the_stream_matches_the_reference_without_it():
    text, feats = clustered_features(12, 3, 10, noise=0.5)
    m = _bound(text, alpha=0.3, beta=1.0, log_prior=False, **EXACT)
    ref = NumpyFreeTTA(text.double().numpy(), 0.3, 1.0, log_prior=False)
    with_prior = _bound(text, alpha=0.3, beta=1.0, **EXACT)
    differs = False
    for i in range(feats.shape[0]):
        got = m.predict_features(feats[i:i + 1])
        np.testing.assert_allclose(got.numpy(), ref.step(feats[i].double().numpy()), atol=1e-5, err_msg=str(i))
        differs |= not torch.allclose(got, with_prior.predict_features(feats[i:i + 1]), atol=1e-4)
    _check_state(m, ref)
    assert differs  # the term matters on this stream, so the test above could fail


def test_woodbury_update_equals_a_new_inverse():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    cov, u, b = a @ a.t() + torch.eye(7, dtype=torch.float64), torch.randn(7, 2, generator=g,
                                                                            dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    precision = torch.linalg.inv(cov)
    products, quadratic = precision @ b, (b * (precision @ b)).sum(0)
    woodbury_update_(precision, u, products, quadratic)
    new = torch.linalg.inv(cov + u @ u.t())
    torch.testing.assert_close(precision, new)
    torch.testing.assert_close(products, new @ b)
    torch.testing.assert_close(quadratic, (b * (new @ b)).sum(0))


def test_carried_precision_stays_the_inverse_over_a_long_stream():
    text, feats = clustered_features(200, 5, 16, noise=0.7, seed=3)
    m = _bound(text, beta=0.5, max_rank=3)
    for i in range(feats.shape[0]):
        m.predict_features(feats[i:i + 1])
    exact = torch.linalg.inv(m.gaussians.covariance.double())
    assert float((m.scale * m.precision - exact).norm() / exact.norm()) < 1e-5
    means = m.gaussians.means.double()
    torch.testing.assert_close(m.scale * m.projected, exact @ means.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.scale * m.quadratic, (means * (exact @ means.t()).t()).sum(1), rtol=1e-4, atol=1e-4)


def test_zero_fusion_weight_is_zero_shot_all_along():
    text, feats = clustered_features(20, 4, 8, noise=0.6)
    m = _bound(text, alpha=0.0)
    for i in range(feats.shape[0]):
        expected = (100 * feats[i] @ text.t()).softmax(-1)
        torch.testing.assert_close(m.predict_features(feats[i:i + 1]), expected)
    assert float(m.gaussians.counts.sum()) > 1.0  # it still adapted


def test_truncation_keeps_the_largest_weights_only():
    text, feats = clustered_features(6, 5, 12, noise=0.9)
    m = _bound(text, beta=0.0, max_rank=1, min_change=0.0, posterior="zeroshot")
    before = m.gaussians.means.clone()
    m.predict_features(feats[:1])
    moved = (m.gaussians.means - before).norm(dim=1) > 0
    assert moved.sum() == 1 and moved.nonzero().item() == int((feats[0] @ text.t()).argmax())
    assert float(m.gaussians.counts.sum()) == pytest.approx(1 + float((100 * feats[0] @ text.t()).softmax(-1).max()))


def test_several_views_use_the_confident_ones():
    text, feats = clustered_features(8, 4, 8, noise=0.8)
    m = _bound(text, n_views=8, confident_ratio=0.25, alpha=0.0)
    logits = 100 * feats @ text.t()
    keep = (-(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)).argsort()[:2]
    torch.testing.assert_close(m.predict_features(feats), logits[keep].mean(0).softmax(-1))


def test_reset_restores_the_initial_state_and_replays_the_stream():
    text, feats = clustered_features(15, 3, 8, noise=0.5)
    m = _bound(text)
    first = [m.predict_features(feats[i:i + 1]) for i in range(feats.shape[0])]
    assert not torch.equal(m.gaussians.means, text)
    m.reset()
    assert torch.equal(m.gaussians.means, text) and m.scale == 1.0
    assert torch.equal(m.precision, torch.eye(8, dtype=torch.float64))
    torch.testing.assert_close(m.gaussians.covariance, torch.eye(8))
    again = [m.predict_features(feats[i:i + 1]) for i in range(feats.shape[0])]
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b)


def test_registry_and_options():
    cls = get_method_class("freetta")
    assert not cls.episodic and cls.needs == frozenset({Need.VIEW_FEATURES}) and cls.dataset_defaults == {}
    d = cls.defaults()
    assert (d["alpha"], d["beta"], d["n_views"], d["posterior"], d["sigma"], d["prior_weight"], d["log_prior"]) == \
        (0.2, 4.5, 1, "fused", 1.0, 1.0, True)
    assert check_options("freetta", posterior="gaussian", alpha="0.5") == {"posterior": "gaussian", "alpha": 0.5}
    for bad in ({"posterior": "map"}, {"alpha": -1.0}, {"sigma": 0.0}, {"max_rank": 0}, {"min_change": 1.0},
                {"confident_ratio": 0.0}):
        with pytest.raises(ValueError):
            create_method("freetta", **bad)
