"""OGA on hand-built features: the memory, means, covariance estimators and MAP rule against a plain numpy
formulation recomputed from scratch at every image; zero-shot limits; reset; options."""
from functools import partial

import numpy as np
import pytest
import torch

from conftest import bound_on_text, clustered_features
from vlmtta.methods import Need, create_method, get_method_class, method_names

_bound = partial(bound_on_text, "oga", logit_scale=10.0)


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def reference_oga(text, feats, scale, tau, capacity, estimator, divisor):
    """OGA as the official runner with batch size 1: memory update, refit, MAP; every statistic recomputed from the
    memory's contents (float64)."""
    text, feats = text.double().numpy(), feats.double().numpy()
    k_classes, d = text.shape
    memory = [[] for _ in range(k_classes)]  # per class: [entropy, feature] entries
    means, precision, out = text.copy(), d * np.eye(d), []
    for x in feats:
        y = _softmax(scale * text @ x)
        k, h = int(y.argmax()), float(-(y * np.log(y)).sum())
        entries, changed = memory[k], True
        if len(entries) < capacity:
            entries.append([h, x])
        else:
            worst = int(np.argmax([e[0] for e in entries]))
            changed = h < entries[worst][0]
            if changed:
                entries[worst] = [h, x]
        if changed:
            for j, stored in enumerate(memory):
                if len(stored) >= 2:
                    means[j] = sum(e[1] for e in stored) / (capacity if divisor == "capacity" else len(stored))
            if max(len(stored) for stored in memory) > 2:
                offsets = np.stack([e[1] - means[j] for j, stored in enumerate(memory) for e in stored])
                n = offsets.shape[0]
                cov = np.cov(offsets.T)  # centred again, divided by n - 1
                if estimator == "ridge" or (estimator == "ridge_pinv" and n <= 4 * d):
                    precision = d * np.linalg.inv((n - 1) * cov + np.trace(cov) * np.eye(d))
                else:
                    precision = np.linalg.pinv(cov, rcond=d * np.finfo(np.float32).eps, hermitian=True)
        loglik = x @ precision @ means.T - 0.5 * np.einsum("cd,de,ce->c", means, precision, means)
        z = y * _softmax(tau * loglik)
        out.append(z / z.sum())
    return np.stack(out), means, sum(len(stored) for stored in memory)


@pytest.mark.parametrize("estimator,divisor", [("ridge_pinv", "capacity"), ("ridge_pinv", "stored"),
                                               ("ridge", "capacity"), ("pinv", "stored")])
def test_stream_equals_the_direct_formulation(estimator, divisor):
    text, feats = clustered_features(n=70, c=3, d=4, noise=0.6)
    m = _bound(text, tau=1.0, estimator=estimator, mean_divisor=divisor)
    got = torch.stack([m.predict_features(feats[i:i + 1]) for i in range(feats.shape[0])])
    expected, means, stored = reference_oga(text, feats, 10.0, 1.0, 8, estimator, divisor)
    assert stored == m.stored > 16  # past 4 d stored samples: the ridge-to-pinv switch is exercised
    np.testing.assert_allclose(m.means.numpy(), means, atol=1e-6)
    np.testing.assert_allclose(got.numpy(), expected, atol=2e-5)
    zero_shot = (10 * feats @ text.t()).softmax(-1)
    assert (got - zero_shot).abs().max() > 0.1  # the Gaussian term weighs in this toy


def test_evictions_keep_the_lowest_entropy_features_and_the_incremental_scatter():
    text, feats = clustered_features(n=60, c=3, d=4, noise=0.6, seed=1)
    m = _bound(text, tau=1.0, shot_capacity=3)
    for i in range(feats.shape[0]):
        m.predict_features(feats[i:i + 1])
    logits = 10 * feats @ text.t()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    labels, stored_offsets = logits.argmax(-1), []
    for k in range(3):
        best = entropy[labels == k].sort().values[:3]
        kept = m.memory.entropy[k][m.memory.filled[k]].sort().values
        torch.testing.assert_close(kept, best)
        stored_offsets.append(m.memory.keys[k][m.memory.filled[k]].double() - m.means[k].double())
    offsets = torch.cat(stored_offsets)
    torch.testing.assert_close(m.scatter, offsets.t() @ offsets)
    torch.testing.assert_close(m.offset_sum, offsets.sum(0))


def test_tau_zero_is_zero_shot_and_an_empty_memory_only_sharpens_it():
    text, feats = clustered_features(n=30, c=5, d=6, noise=0.4)
    flat, zs = _bound(text, tau=0.0), bound_on_text("zeroshot", text, logit_scale=10.0)
    for i in range(feats.shape[0]):
        torch.testing.assert_close(flat.predict_features(feats[i:i + 1]), zs.predict_features(feats[i:i + 1]))
    text, feats = clustered_features(n=5, c=5, d=6, noise=0.2)
    assert torch.equal((feats @ text.t()).argmax(-1), torch.arange(5))  # one image per class: no mean estimated
    m = _bound(text)
    for i in range(5):
        expected = ((10 + 0.05 * 6) * feats[i] @ text.t()).softmax(-1)
        torch.testing.assert_close(m.predict_features(feats[i:i + 1]), expected)
    assert m.fitted is None and m.stored == 5 and torch.equal(m.means, text)


def test_several_views_use_the_confident_mean_feature():
    text, feats = clustered_features(n=10, c=3, d=5, noise=0.3)
    m = _bound(text, n_views=10, confident_ratio=0.2)
    logits = 10 * feats @ text.t()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    keep = entropy.argsort()[:2]
    prior = logits[keep].softmax(-1).mean(0)
    x = feats[keep].mean(0)
    expected = (prior.log() + 0.05 * 5 * (x @ text.t() - 0.5)).softmax(-1)
    torch.testing.assert_close(m.predict_features(feats), expected)
    assert torch.equal(m.memory.keys[int(prior.argmax()), 0], x)


def test_reset_restores_the_initial_state():
    text, feats = clustered_features(n=40, c=3, d=4, noise=0.6)
    m = _bound(text, tau=1.0)
    first = torch.stack([m.predict_features(feats[i:i + 1]) for i in range(feats.shape[0])])
    assert m.fitted is not None and not torch.equal(m.means, text)
    m.reset()
    assert torch.equal(m.means, text) and m.fitted is None and m.stored == 0 and not m.memory.filled.any()
    assert not m.scatter.any() and not m.offset_sum.any()
    again = torch.stack([m.predict_features(feats[i:i + 1]) for i in range(feats.shape[0])])
    assert torch.equal(first, again)


def test_registry_and_options():
    assert "oga" in method_names()
    cls = get_method_class("oga")
    assert cls.episodic is False and cls.needs == frozenset({Need.VIEW_FEATURES}) and cls.dataset_defaults == {}
    defaults = cls.defaults()
    assert (defaults["n_views"], defaults["tau"], defaults["shot_capacity"]) == (1, 0.05, 8)
    assert (defaults["estimator"], defaults["mean_divisor"]) == ("ridge_pinv", "capacity")
    assert defaults["normalize_means"] is False and defaults["refit_every"] == 1
    m = create_method("oga", tau="0.1", estimator="pinv", normalize_means="true")
    assert (m.tau, m.estimator, m.normalize_means) == (0.1, "pinv", True)
    for bad, match in [({"estimator": "lw"}, "estimator must be one of"), ({"mean_divisor": "n"}, "mean_divisor"),
                       ({"tau": -1.0}, "tau >= 0"), ({"shot_capacity": 0}, "shot_capacity >= 1")]:
        with pytest.raises(ValueError, match=match) as caught:
            create_method("oga", **bad)
        assert "\n" not in str(caught.value)


def test_normalized_means_are_unit_vectors():
    text, feats = clustered_features(n=30, c=3, d=4, noise=0.6)
    m = _bound(text, normalize_means=True)
    for i in range(feats.shape[0]):
        m.predict_features(feats[i:i + 1])
    torch.testing.assert_close(m.means.norm(dim=1), torch.ones(3))
    estimated = m.memory.filled.sum(1) >= 2
    direct = torch.nn.functional.normalize((m.memory.keys * m.memory.filled[..., None]).sum(1), dim=-1)
    torch.testing.assert_close(m.means[estimated], direct[estimated])


def test_refit_every_refits_after_every_rth_memory_change_only():
    text, feats = clustered_features(n=50, c=3, d=4, noise=0.6)
    exact, lazy = _bound(text, tau=1.0), _bound(text, tau=1.0, refit_every=3)
    changes, refits, fitted = 0, 0, None
    for i in range(feats.shape[0]):
        stored_before = exact.memory.entropy.clone()
        a, b = exact.predict_features(feats[i:i + 1]), lazy.predict_features(feats[i:i + 1])
        changes += int(not torch.equal(stored_before, exact.memory.entropy))
        if lazy.fitted is not fitted:
            refits, fitted = refits + 1, lazy.fitted
        if changes % 3 == 0 and lazy.pending == 0:  # just refitted: the same state as the exact one
            torch.testing.assert_close(b, a)
        torch.testing.assert_close(lazy.scatter, exact.scatter)
    assert lazy.pending == changes % 3 and refits >= changes // 3 - 1 > 5
