"""DOTA on hand-built features: zero-shot start, the fusion formula, the Gaussian state, reset."""
from functools import partial

import pytest
import torch

from conftest import bound_on_text, clustered_features
from vlmtta.methods import create_method
from vlmtta.gaussian import ClassGaussians, discriminant, shrunk_covariance
from vlmtta.methods.dota import DOTA

_bound = partial(bound_on_text, "dota")
_stream = partial(clustered_features, n=6, c=4, d=8, noise=0.4)


def test_first_prediction_is_zero_shot_with_constant_prior_means():
    text, feats = _stream()
    m = _bound(text)
    expected = (100 * feats[0] @ text.t()).softmax(-1)
    assert torch.allclose(m.predict_features(feats[:1]), expected, atol=1e-6)


@pytest.mark.parametrize("covariance", ["class_mean", "pooled"])
def test_prediction_follows_the_fusion_formula_and_state_is_the_soft_label_estimate(covariance):
    text, feats = _stream()
    rho, eta, eps, sigma = 0.3, 0.5, 1e-3, 0.01
    m = _bound(text, rho=rho, eta=eta, epsilon=eps, sigma=sigma, min_weight=0.0, covariance=covariance)
    ref = ClassGaussians(torch.full_like(text, 0.001), 1.0, sigma * torch.eye(text.shape[1]), covariance)
    for i in range(feats.shape[0]):
        x = feats[i:i + 1]
        clip = 100 * x @ text.t()
        weight = min(rho * float(ref.counts.mean()), eta)
        scores = discriminant(x, ref.means, shrunk_covariance(ref.covariance, eps))
        expected = (clip + weight * scores).softmax(-1)[0]
        assert torch.allclose(m.predict_features(x), expected, atol=1e-5), i
        ref.update(x, clip.softmax(-1))
    assert torch.allclose(m.gaussians.means, ref.means, atol=1e-6)
    assert torch.allclose(m.gaussians.counts, ref.counts, atol=1e-6)
    assert torch.allclose(m.gaussians.covariance, ref.covariance, atol=1e-7)
    assert float(m.gaussians.counts.sum()) == pytest.approx(text.shape[0] + feats.shape[0], rel=1e-5)


def test_fusion_weight_is_capped_at_eta():
    text, feats = _stream(n=3)
    m = _bound(text, rho=100.0, eta=0.25)
    for i in range(2):
        m.predict_features(feats[i:i + 1])
    x = feats[2:3]
    scores = discriminant(x, m.gaussians.means, shrunk_covariance(m.gaussians.covariance, 1e-4))
    expected = (100 * x @ text.t() + 0.25 * scores).softmax(-1)[0]
    assert torch.allclose(m.predict_features(x), expected, atol=1e-5)


def test_several_views_keep_the_confident_ones_and_update_with_each():
    text, feats = _stream(n=10)
    m = _bound(text, n_views=10, confident_ratio=0.2)
    logits = 100 * feats @ text.t()
    entropy = -(logits.log_softmax(-1).exp() * logits.log_softmax(-1)).sum(-1)
    keep = entropy.argsort()[:2]
    expected = logits[keep].mean(0).softmax(-1)  # constant prior means: the discriminant is flat
    assert torch.allclose(m.predict_features(feats), expected, atol=1e-6)
    assert float(m.gaussians.counts.sum()) == pytest.approx(text.shape[0] + 2, rel=1e-6)


def test_default_covariance_is_the_unweighted_mean_of_the_class_covariances():
    """The paper's and the official code's estimate: Sigma = mean_j Sigma_j, each Sigma_j from the recurrence
    Sigma_j <- (c_j Sigma_j + p_j (x - mu_j)(x - mu_j)^T) / (c_j + p_j), written out per class."""
    text, feats = _stream()
    m = _bound(text, sigma=0.01, min_weight=0.0)
    c, d = text.shape
    means, counts = torch.full((c, d), 0.001), torch.ones(c)
    covs = [0.01 * torch.eye(d) for _ in range(c)]
    for i in range(feats.shape[0]):
        m.predict_features(feats[i:i + 1])
        p = (100 * feats[i] @ text.t()).softmax(-1)
        for j in range(c):
            diff = feats[i] - means[j]
            covs[j] = (counts[j] * covs[j] + p[j] * torch.outer(diff, diff)) / (counts[j] + p[j])
            means[j] = (counts[j] * means[j] + p[j] * feats[i]) / (counts[j] + p[j])
            counts[j] = counts[j] + p[j]
    assert m.covariance == "class_mean"
    assert torch.allclose(m.gaussians.covariance, torch.stack(covs).mean(0), atol=1e-7)
    pooled = sum(n * s for n, s in zip(counts, covs)) / counts.sum()
    assert not torch.allclose(m.gaussians.covariance, pooled, atol=1e-7)  # the two estimates differ here


def test_pooled_covariance_and_text_init_run_and_reset_restores_the_prior():
    text, feats = _stream()
    for options in ({"covariance": "pooled"}, {"init_means": "text"}):
        m = _bound(text, **options)
        before = (m.gaussians.means.clone(), m.gaussians.counts.clone(), m.gaussians.covariance.clone())
        for i in range(feats.shape[0]):
            m.predict_features(feats[i:i + 1])
        assert not torch.equal(m.gaussians.means, before[0])
        m.reset()
        for now, then in zip((m.gaussians.means, m.gaussians.counts, m.gaussians.covariance), before):
            assert torch.equal(now, then)
    assert torch.equal(_bound(text, init_means="text").gaussians.means, text)


def test_dataset_defaults_and_bad_options():
    assert DOTA.options_for("eurosat") == {"epsilon": 1e-4, "eta": 3.0, "rho": 0.05, "n_views": 1}
    assert DOTA.options_for("imagenet_a")["n_views"] == 64
    assert set(DOTA.dataset_defaults) >= {"imagenet", "caltech101", "imagenet_sketch"}
    with pytest.raises(ValueError, match="covariance"):
        create_method("dota", covariance="diagonal")
    with pytest.raises(ValueError, match="init_means"):
        create_method("dota", init_means="zeros")
