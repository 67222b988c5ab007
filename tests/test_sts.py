"""STS: Gavish-Donoho rank, the cached spectral basis, and the steering step on hand-built features."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vlmtta.methods.sts  # noqa: F401  (registers sts, sts_ensemble)
from vlmtta.api import Adapter
from vlmtta.entropy import marginal_entropy, select_confident
from vlmtta.methods import create_method, get_method_class
from vlmtta.methods.sts import gavish_donoho_omega, gavish_donoho_rank, marchenko_pastur_median, spectral_basis

TEXT_CLASSIFIERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "clip-vit-b16-text" / "text_classifiers.pt"


def setup(n_classes=12, dim=32, seed=0, **options):
    """An STS adapter on random prototypes and 64 views clustered between classes 3 and 5 (view 0 = the
    cluster centre); logit scale 10 keeps the predictions unsaturated, like CLIP's small cosine gaps."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)
    centre = F.normalize(text[3] + 0.6 * text[5] + 0.3 * torch.randn(dim, generator=g), dim=0)
    views = F.normalize(centre + 0.35 * torch.randn(64, dim, generator=g), dim=-1)
    views[0] = centre
    return Adapter.from_features([f"c{i}" for i in range(n_classes)], text, "sts", logit_scale=10.0, **options), views


def test_gavish_donoho_constants():
    assert marchenko_pastur_median(1.0) == pytest.approx(0.6528, abs=1e-3)
    assert gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=2e-3)  # Gavish & Donoho (2014), square matrices
    for beta in (0.05, 0.2, 0.5, 0.8):  # their cubic approximation of omega(beta)
        assert gavish_donoho_omega(beta) == pytest.approx(0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43, abs=0.01)


def test_gavish_donoho_recovers_planted_rank():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 5, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(100, 5, generator=g, dtype=torch.float64))
    signal = u @ torch.diag(torch.tensor([80.0, 60.0, 50.0, 45.0, 40.0], dtype=torch.float64)) @ v.t()
    noisy = signal + torch.randn(300, 100, generator=g, dtype=torch.float64)  # noise edge ~ sqrt(300) + sqrt(100) = 27
    assert gavish_donoho_rank(torch.linalg.svdvals(noisy), noisy.shape) == 5
    assert gavish_donoho_rank(torch.linalg.svdvals(noisy.t()), (100, 300)) == 5


def test_basis_is_top_right_singular_subspace():
    text = F.normalize(torch.randn(40, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    basis = spectral_basis(text, k_t=4)
    assert basis.shape == (16, 4) and torch.allclose(basis.t() @ basis, torch.eye(4), atol=1e-5)
    _, _, vh = torch.linalg.svd(text.double())
    assert torch.allclose(basis.double() @ basis.double().t(), vh[:4].t() @ vh[:4], atol=1e-5)  # same projector
    assert spectral_basis(text, k_t=100).shape == (16, 16)  # capped at min(C, D)


def test_basis_computed_once_per_class_set(monkeypatch):
    adapter, views = setup()
    assert 1 <= adapter.method.basis_rank <= 12

    def no_svd(*args, **kwargs):
        raise AssertionError("SVD recomputed per image")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    adapter.adapt_features(views)
    adapter.adapt_features(views.flip(0))


def test_one_step_is_adams_first_step_and_reduces_the_entropy():
    adapter, views = setup(k_t=6)
    sts = adapter.method
    logits = sts.logits(views, sts.text)
    kept = views[select_confident(logits, 0.1)]
    zero = torch.zeros(6, requires_grad=True)
    (grad,) = torch.autograd.grad(sts.loss(kept, zero), zero)
    gamma = sts.adapt(kept)
    assert torch.allclose(gamma, -5e-3 * grad / (grad.abs() + 1e-8), atol=1e-9)  # bias-corrected Adam, step 1
    before = marginal_entropy(sts.steered_logits(kept, torch.zeros(6)))
    after = marginal_entropy(sts.steered_logits(kept, gamma))
    assert after < before
    delta = sts.basis @ gamma  # the steering stays in the text subspace
    assert torch.allclose(sts.basis @ (sts.basis.t() @ delta), delta, atol=1e-7)


def test_more_steps_keep_reducing_the_entropy():
    adapter, views = setup(k_t=6, steps=10, lr=0.05, lambda_reg=0.0)
    sts = adapter.method
    kept = views[select_confident(sts.logits(views, sts.text), 0.1)]
    entropies = [float(marginal_entropy(sts.steered_logits(kept, sts.adapt(kept)))) for sts.steps in (0, 1, 5, 10)]
    assert entropies == sorted(entropies, reverse=True) and entropies[-1] < entropies[0] - 1e-3


def test_regulariser_is_inert_for_one_step_from_zero_only():
    a0, views = setup(lambda_reg=0.0)
    a1, _ = setup(lambda_reg=10.0)
    assert torch.equal(a0.adapt_features(views), a1.adapt_features(views))
    b0, _ = setup(lambda_reg=0.0, steps=3)
    b1, _ = setup(lambda_reg=10.0, steps=3)
    assert not torch.equal(b0.adapt_features(views), b1.adapt_features(views))


def test_zero_steps_is_zero_shot_on_the_original_view():
    adapter, views = setup(steps=0)
    expected = (10 * views[:1] @ adapter.method.text.t()).softmax(-1)[0]
    assert torch.allclose(adapter.adapt_features(views), expected, atol=1e-6)


def test_options_and_registration():
    adapter, views = setup(steer="image")
    assert torch.isclose(adapter.adapt_features(views).sum(), torch.tensor(1.0))
    assert get_method_class("sts_ensemble").default_templates == "ensemble7"
    assert create_method("sts").hyperparameters()["lr"] == 5e-3 and create_method("sts").ratio == 0.1
    with pytest.raises(ValueError, match="steer"):
        create_method("sts", steer="both")
    with pytest.raises(ValueError, match="k_t"):
        create_method("sts", k_t=0)


def test_runs_on_encoded_views_of_a_real_backbone(tiny_backbone, rgb_image):
    """Features come out of inference mode; the steering step still gets gradients."""
    for name in ("sts", "sts_ensemble"):
        prediction = Adapter(["cat", "dog", "car", "tree"], name, backbone=tiny_backbone, n_views=8).step(rgb_image)
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(not TEXT_CLASSIFIERS.exists(), reason="shared real text classifiers not available")
def test_rank_on_real_vit_b16_text_classifiers():
    classifiers = torch.load(TEXT_CLASSIFIERS, weights_only=True)["text_features"]
    ranks = {name: spectral_basis(t.float()).shape[1] for name, t in classifiers.items()
             if name in ("ImageNet", "EuroSAT", "ImageNetA")}
    assert ranks == {"ImageNet": 114, "EuroSAT": 3, "ImageNetA": 33}  # scripts/sts_rank.py


def test_predict_from_the_confident_views_and_squared_penalty():
    adapter, views = setup(k_t=6, predict="confident")
    sts = adapter.method
    kept = views[select_confident(sts.logits(views, sts.text), 0.1)]
    gamma = sts.adapt(kept)
    expected = sts.steered_logits(kept, gamma).softmax(-1).mean(0)
    assert torch.allclose(adapter.adapt_features(views), expected, atol=1e-6)
    squared, _ = setup(k_t=6, penalty="squared", lambda_reg=3.0)
    delta = squared.method.basis @ torch.full((6,), 0.1)
    gamma = torch.full((6,), 0.1)
    plain_loss = marginal_entropy(squared.method.steered_logits(kept, gamma))
    assert torch.isclose(squared.method.loss(kept, gamma), plain_loss + 3.0 * delta.square().sum(), atol=1e-6)
    for option in ("penalty", "predict"):
        with pytest.raises(ValueError, match=option):
            create_method("sts", **{option: "other"})
