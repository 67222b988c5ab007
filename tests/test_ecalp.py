"""ECALP on tiny graphs: exact neighbour lists, propagation against a dense formulation and its closed form, reset."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from conftest import bound_on_text, clustered_features

_bound = partial(bound_on_text, "ecalp")
_data = partial(clustered_features, n=7, c=3, d=5, noise=0.5)


def _dense_graph(m, feats, text):
    """The symmetric normalised adjacency over [text nodes; image nodes], built from the definitions."""
    c, n = text.shape[0], feats.shape[0]
    r = F.normalize(text.var(dim=0), dim=0)
    s = F.normalize(r * feats, dim=-1) @ feats.t()  # s(i, j): row i re-weighted
    a = torch.zeros(c + n, c + n)
    for i in range(n):
        for j in s[i].topk(min(m.k_image, n)).indices:
            a[c + i, c + j] += s[i, j].clamp_min(0) ** m.gamma
        t = feats[i] @ text.t()
        for j in t.topk(m.k_text).indices:
            a[c + i, j] += t[j].clamp_min(0) ** m.gamma
    w = a + a.t()
    inv = 1 / (w.sum(1).sqrt() + 1e-6)
    return inv[:, None] * w * inv[None, :]


@pytest.mark.parametrize("twin", [False, True])
def test_neighbour_lists_are_the_exact_knn_of_all_nodes_seen(twin):
    """Also with the official code's duplicate node, which is removed after each prediction."""
    text, feats = _data(n=9)
    m = _bound(text, k_image=3, twin=twin)
    for i in range(feats.shape[0]):
        m.predict_features(feats[i:i + 1])
    assert m.n == 9
    r = F.normalize(text.var(dim=0), dim=0)
    s = F.normalize(r * feats, dim=-1) @ feats.t()
    expected = s.topk(3, dim=1)
    assert torch.allclose(m.neighbour_sims[:9].sort(dim=1).values, expected.values.sort(dim=1).values, atol=1e-6)
    assert torch.equal(m.neighbours[:9].sort(dim=1).values, expected.indices.sort(dim=1).values)


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_propagation_matches_the_dense_formulation(alpha):
    text, feats = _data()
    m = _bound(text, k_image=3, k_text=2, gamma=2.0, alpha=alpha, iterations=3)
    for i in range(feats.shape[0] - 1):
        m.predict_features(feats[i:i + 1])
    carried = torch.zeros(feats.shape[0], text.shape[0])
    carried[torch.arange(feats.shape[0] - 1), m.carried_label[:feats.shape[0] - 1]] = m.carried_score[:feats.shape[0] - 1]
    got = m.predict_features(feats[-1:])
    w = _dense_graph(m, feats, text)
    c = text.shape[0]
    y = carried.clone()
    for _ in range(3):
        y = alpha * w[c:] @ torch.cat([torch.eye(c), y]) + (1 - alpha) * carried
    assert torch.allclose(got, y[-1] / y[-1].sum(), atol=1e-5)


def test_many_iterations_reach_the_closed_form():
    """With alpha < 1, Y = alpha (W_it + W_ii Y) + (1 - alpha) Y0 converges to (I - alpha W_ii)^-1 (alpha W_it + (1 - alpha) Y0)."""
    text, feats = _data(n=5)
    m = _bound(text, k_image=2, k_text=1, gamma=1.0, alpha=0.5, iterations=200)
    for i in range(feats.shape[0] - 1):
        m.predict_features(feats[i:i + 1])
    n, c = feats.shape[0], text.shape[0]
    y0 = torch.zeros(n, c)
    y0[torch.arange(n - 1), m.carried_label[:n - 1]] = m.carried_score[:n - 1]
    got = m.predict_features(feats[-1:])
    w = _dense_graph(m, feats, text)
    closed = torch.linalg.solve(torch.eye(n) - 0.5 * w[c:, c:], 0.5 * w[c:, :c] + 0.5 * y0)
    assert torch.allclose(got, closed[-1] / closed[-1].sum(), atol=1e-5)


def test_a_lone_image_is_labelled_by_its_text_neighbours():
    text = torch.eye(3)
    m = _bound(text, k_text=1, gamma=1.0)
    probs = m.predict_features(F.normalize(torch.tensor([[0.2, 1.0, 0.1]]), dim=-1))
    assert probs.argmax() == 1 and probs[1] == pytest.approx(1.0)


def test_reset_forgets_the_graph():
    text, feats = _data()
    m = _bound(text)
    first = m.predict_features(feats[:1])
    for i in range(1, feats.shape[0]):
        m.predict_features(feats[i:i + 1])
    m.reset()
    assert m.n == 0
    assert torch.allclose(m.predict_features(feats[:1]), first)


def test_the_twin_propagates_over_a_duplicate_of_the_current_image():
    text, feats = _data(n=1)
    m = _bound(text, k_image=2, k_text=2, gamma=2.0, twin=True)
    got = m.predict_features(feats)
    c = text.shape[0]
    w = _dense_graph(m, torch.cat([feats, feats]), text)  # both copies, each in the other's list
    y = torch.zeros(2, c)
    for _ in range(3):
        y = w[c:] @ torch.cat([torch.eye(c), y])
    assert torch.allclose(got, y[-1] / y[-1].sum(), atol=1e-5)
    assert m.n == 1  # the twin is gone after the prediction



@pytest.mark.parametrize("neighbour_class", [1, 0])
def test_the_new_image_takes_its_image_neighbours_label_over_its_own_zero_shot_label(neighbour_class):
    """Why ECALP can lose to zero-shot on a sparse stream: with gamma = 10 the edges to near-identical earlier
    images outweigh the text edges, so a new image whose nearest earlier images are (confidently) of another class
    takes their label; when its neighbours share its zero-shot class it keeps it.  Default hyperparameters."""
    g = torch.Generator().manual_seed(0)
    text = torch.eye(3)
    new = F.normalize(torch.tensor([0.52, 0.48, 0.0]), dim=0)  # zero-shot: class 0 (cosine 0.73 vs 0.68)
    far = F.normalize(torch.tensor([0.75, 0.0, 0.66]) + 0.02 * torch.randn(20, 3, generator=g), dim=-1)  # class 0
    centre = torch.tensor([0.46, 0.54, 0.0]) if neighbour_class == 1 else torch.tensor([0.54, 0.46, 0.0])
    near = F.normalize(centre + 0.01 * torch.randn(20, 3, generator=g), dim=-1)
    assert ((far @ text.t()).argmax(-1) == 0).all() and ((near @ text.t()).argmax(-1) == neighbour_class).all()
    stream = torch.cat([far, near])[torch.randperm(40, generator=g)]
    m = _bound(text)
    for i in range(stream.shape[0]):
        m.predict_features(stream[i:i + 1])
    assert int((new @ text.t()).argmax()) == 0
    probs = m.predict_features(new[None])
    assert int(probs.argmax()) == neighbour_class and float(probs.max()) > 0.54
