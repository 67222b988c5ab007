"""BCA on hand-built features: zero-shot start, the two gated running means, reset."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from conftest import bound_on_text, clustered_features
from vlmtta.methods import create_method

_bound = partial(bound_on_text, "bca", logit_scale=10.0)
_data = partial(clustered_features, n=6, c=3, d=5, noise=0.3)


def test_first_prediction_is_zero_shot_and_the_updates_follow_the_running_means():
    text, feats = _data()
    m = _bound(text, likelihood_count=3.0, prior_count=2.0, likelihood_threshold=0.0, prior_threshold=0.0)
    x = feats[0]
    zs = (10 * x @ text.t()).softmax(-1)
    assert torch.allclose(m.predict_features(feats[:1]), zs, atol=1e-6)
    s = int(zs.argmax())
    expected_mu = F.normalize((3 * text[s] + x) / 4, dim=-1)
    assert torch.allclose(m.embeddings[s], expected_mu, atol=1e-6)
    row = (2 * torch.eye(3)[s] + zs) / 3
    assert torch.allclose(m.prior[s], row / row.sum(), atol=1e-6)
    others = [i for i in range(3) if i != s]
    assert torch.equal(m.embeddings[others], text[others]) and torch.equal(m.prior[others], torch.eye(3)[others])
    assert m.likelihood_counts[s] == 4 and m.prior_counts[s] == 3
    # the second prediction uses both adapted factors
    y = feats[1]
    expected = (10 * y @ m.embeddings.t()).softmax(-1) @ m.prior
    assert torch.allclose(m.predict_features(feats[1:2]), expected / expected.sum(), atol=1e-6)


def test_thresholds_gate_the_updates():
    text, feats = _data()
    m = _bound(text, likelihood_threshold=1.0, prior_threshold=1.0)  # never exceeded
    for i in range(feats.shape[0]):
        assert torch.allclose(m.predict_features(feats[i:i + 1]), (10 * feats[i] @ text.t()).softmax(-1), atol=1e-6)
    assert torch.equal(m.embeddings, text) and torch.equal(m.prior, torch.eye(3))


def test_several_views_average_the_confident_ones():
    text, feats = _data(n=10)
    m = _bound(text, n_views=10, confident_ratio=0.2, likelihood_threshold=1.0, prior_threshold=1.0)
    logits = 10 * feats @ text.t()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    x = F.normalize(feats[entropy.argsort()[:2]].mean(0), dim=-1)
    assert torch.allclose(m.predict_features(feats), (10 * x @ text.t()).softmax(-1), atol=1e-6)


def test_reset_restores_zero_shot():
    text, feats = _data()
    m = _bound(text, likelihood_count=1.0, likelihood_threshold=0.0, prior_threshold=0.0)
    first = m.predict_features(feats[:1])
    for i in range(1, feats.shape[0]):
        m.predict_features(feats[i:i + 1])
    assert not torch.equal(m.embeddings, text)
    m.reset()
    assert torch.equal(m.predict_features(feats[:1]), first)
    with pytest.raises(ValueError, match="counts"):
        create_method("bca", prior_count=0.0)


def test_defaults_are_the_cited_constants():
    """thresholds 0.05 / 0.65, initial counts 20000 / 1, 10 % confident views (TTABC's bca config, see the
    docstring); a change here must update the cited source."""
    m = create_method("bca")
    assert (m.likelihood_threshold, m.prior_threshold) == (0.05, 0.65)
    assert (m.likelihood_count, m.prior_count, m.confident_ratio) == (20000.0, 1.0, 0.1)
