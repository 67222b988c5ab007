"""OnZeta on hand-built features: the first step by hand, the zero-shot limit, reset, per-dataset stream lengths."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from conftest import bound_on_text, clustered_features
from vlmtta.methods import create_method
from vlmtta.methods.onzeta import OnZeta

_bound = partial(bound_on_text, "onzeta")
_data = partial(clustered_features, n=5, c=3, d=6, noise=None)


def test_first_step_by_hand():
    text, feats = _data()
    m = _bound(text, stream_length=4)
    x = feats[0]
    q = (x @ text.t() / 0.01).softmax(-1)  # rho = 0
    v = (x @ text.t() / 0.04).softmax(-1)  # proxy = text
    beta = 0.8 * math.sqrt(1 / 4)
    assert torch.allclose(m.predict_features(feats[:1]), beta * v + (1 - beta) * q, atol=1e-6)
    assert torch.allclose(m.dual, (-20.0 * (q - 1 / 3)).clamp_min(0), atol=1e-5)
    assert torch.allclose(m.proxy, F.normalize(text - 0.5 / 0.04 * torch.outer(v - q, x), dim=-1), atol=1e-5)


def test_second_step_uses_the_dual_variable_and_the_decayed_steps():
    text, feats = _data()
    m = _bound(text, stream_length=2)
    m.predict_features(feats[:1])
    dual, proxy, x = m.dual.clone(), m.proxy.clone(), feats[1]
    q = (x @ text.t() / 0.01).softmax(-1) * dual.exp()
    q = q / q.sum()
    v = (proxy @ x / 0.04).softmax(-1)
    assert torch.allclose(m.predict_features(feats[1:2]), 0.8 * v + 0.2 * q, atol=1e-6)  # beta_T = beta
    assert torch.allclose(m.dual, (dual - 20 / math.sqrt(2) * (q - 1 / 3)).clamp_min(0), atol=1e-5)


def test_without_dual_steps_and_vision_weight_it_is_zero_shot():
    text, feats = _data(n=8)
    m = _bound(text, cr=0.0, beta=0.0)
    for i in range(feats.shape[0]):
        assert torch.allclose(m.predict_features(feats[i:i + 1]), (100 * feats[i] @ text.t()).softmax(-1), atol=1e-6)


def test_reset_restores_the_initial_state():
    text, feats = _data()
    m = _bound(text)
    first = m.predict_features(feats[:1])
    for i in range(1, feats.shape[0]):
        m.predict_features(feats[i:i + 1])
    m.reset()
    assert m.seen == 0 and torch.equal(m.proxy, text) and not m.dual.any()
    assert torch.equal(m.predict_features(feats[:1]), first)


def test_stream_lengths_and_bad_options():
    assert OnZeta.options_for("imagenet") == {"stream_length": 50000}
    assert OnZeta.options_for("dtd") == {"stream_length": 1692}
    with pytest.raises(ValueError, match="beta"):
        create_method("onzeta", beta=1.5)
    with pytest.raises(ValueError, match="stream_length"):
        create_method("onzeta", stream_length=0)
