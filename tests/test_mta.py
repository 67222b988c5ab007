"""MTA: bandwidths, the inlierness-weighted MeanShift mode, and equality with a literal reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlmtta.methods.mta  # noqa: F401  (registers mta)
from vlmtta.api import Adapter
from vlmtta.methods import create_method
from vlmtta.methods.mta import bandwidths


def reference_mta(features, text, scale=100.0, lambda_y=0.2, lambda_q=4.0, steps=5, tol=1e-6):
    """The published algorithm written out view by view (no vectorisation)."""
    n = features.shape[0]
    dist2 = [[float((features[i] - features[j]).square().sum()) for j in range(n)] for i in range(n)]
    k = int(0.3 * (n - 1))
    h2 = [0.5 * sum(sorted(row)[1:k + 1]) / k for row in dist2]
    probs = (scale * features @ text.t()).softmax(-1)
    affinity = [[float(probs[i] @ probs[j]) for j in range(n)] for i in range(n)]

    def density(mode):
        return torch.tensor([float(torch.exp(-(features[i] - mode).square().sum() / (2 * h2[i]))) for i in range(n)])

    y, mode = torch.full((n,), 1.0 / n), features[0].clone()
    for _ in range(steps):
        dens = density(mode)
        for _ in range(steps):
            old = y
            y = torch.tensor([float(dens[i] + lambda_q * sum(affinity[i][j] * y[j] for j in range(n))) for i in range(n)])
            y = (y / lambda_y).softmax(0)
            if (y - old).norm() < tol:
                break
        for _ in range(steps):
            old, w = mode, density(mode) * y
            mode = sum(w[i] * features[i] for i in range(n)) / w.sum()
            mode = mode / mode.norm()
            if (mode - old).norm() < tol:
                break
    return (scale * mode @ text.t()).softmax(-1)


def make_views(n_in=24, n_out=8, dim=16, seed=0):
    """Inliers around ``center`` (view 0 among them) and a tighter, smaller cluster of outliers."""
    g = torch.Generator().manual_seed(seed)
    center, other = F.normalize(torch.randn(2, dim, generator=g), dim=-1)
    inliers = F.normalize(center + 0.15 * torch.randn(n_in, dim, generator=g), dim=-1)
    outliers = F.normalize(other + 0.1 * torch.randn(n_out, dim, generator=g), dim=-1)
    return center, torch.cat([inliers, outliers])


def test_bandwidth_hand_value():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    # k = int(0.3 * 3) = 0 -> at least 1 neighbour: h^2 = 0.5 * squared distance to the nearest other point
    assert bandwidths(points).tolist() == pytest.approx([0.5, 0.5, 2.0, 2.0])
    assert bandwidths(points, knn_ratio=1.0).tolist() == pytest.approx([0.5 * 14 / 3, 0.5 * 10 / 3, 0.5 * 22 / 3, 0.5 * 26 / 3])


def test_equals_reference_algorithm():
    _, views = make_views()
    text = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    adapter = Adapter.from_features([f"c{i}" for i in range(5)], text, "mta", n_views=32)
    assert torch.allclose(adapter.adapt_features(views), reference_mta(views, text), atol=1e-5)


def test_mode_finds_the_cluster_despite_outliers():
    center, views = make_views(n_in=40, n_out=24)
    text = torch.stack([center, *F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(2)), dim=-1)])
    method = Adapter.from_features(list("abcde"), text, "mta").method
    probs = (100 * views @ text.t()).softmax(-1)
    mode = method.mode(views, probs @ probs.t())
    mean = F.normalize(views.mean(0), dim=0)
    assert float(mode @ center) > 0.98 and float(mean @ center) < 0.9  # the mean is dragged by the outliers
    assert float(mode @ center) > float(views[0] @ center)  # and the mode beats the original view


def test_single_view_is_zero_shot_and_validation():
    text = torch.eye(3)
    view = F.normalize(torch.tensor([[1.0, 0.5, 0.0]]), dim=-1)
    adapter = Adapter.from_features(list("abc"), text, "mta", n_views=1)
    assert torch.allclose(adapter.adapt_features(view), (100 * view @ text.t()).softmax(-1)[0])
    with pytest.raises(ValueError, match="lambda_y"):
        create_method("mta", lambda_y=0)
