"""The vectorised latent episodic methods: B images in one computation equal B one-image calls (reset between).

Zero-shot, TE and Zero keep their one-image code as the reference; MTA and STS run one implementation whose
state has a leading batch dimension (one image = a batch of one), checked here against the published
algorithm written out per image (MTA) and against B separate calls with options where per-image state
diverges (early stops, several AdamW steps).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_mta import reference_mta

from vlmtta.entropy import select_confident, take_views
from vlmtta.methods import Context, create_method


def bound(name: str, text: torch.Tensor, scale: float = 100.0, **options):
    method = create_method(name, **options)
    method.bind(Context([f"c{i}" for i in range(text.shape[0])], [], text, scale))
    return method


def one_at_a_time(method, features: torch.Tensor) -> torch.Tensor:
    return torch.stack([method._one_image(lambda f=f: method.predict_features(f)) for f in features])


def realistic(b: int = 5, n: int = 64, c: int = 200, d: int = 64, seed: int = 0):
    """Unit class texts [c, d] and B images' views [B, n, d]: each image's views scattered around a point
    between two classes, so confidences, selections and predictions differ between images."""
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    pairs = torch.randint(0, c, (b, 2), generator=g)
    centre = F.normalize(text[pairs[:, 0]] + 0.7 * text[pairs[:, 1]], dim=-1)
    views = F.normalize(centre[:, None] + 0.25 * torch.randn(b, n, d, generator=g), dim=-1)
    return text, views


@pytest.mark.parametrize("name,options", [("zeroshot", {}), ("ensemble", {}), ("te", {}), ("te", {"q": 1.0}),
                                          ("zero", {}), ("zero", {"confidence": "tsallis", "q": 0.3}),
                                          ("mta", {}), ("sts", {}), ("sts_ensemble", {})])
def test_64_views_200_classes(name, options):
    text, views = realistic()
    many = bound(name, text, n_views=64, **options).predict_features_many(views)
    one = one_at_a_time(bound(name, text, n_views=64, **options), views)
    assert many.shape == (5, 200)
    torch.testing.assert_close(many, one, rtol=0, atol=1e-6)
    assert len(set(one.argmax(-1).tolist())) > 1  # the images really differ


def test_zero_ties_and_fallback_per_image():
    """Ties broken by a discarded view, ties no discarded view can break (highest tied logit of the most
    confident discarded view), no tie, and many random near-degenerate images: votes are exact."""
    text = torch.eye(3)
    tie = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.95, 0.9], [0.2, 1.0, 0.7]]
    fallback = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 1.0], [0.3, 0.1, 1.0]]
    clear = [[1.0, 0.0, 0.0], [1.0, 0.02, 0.0], [0.5, 1.0, 0.7], [0.2, 1.0, 0.7]]
    g = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 3, (60, 4, 3), generator=g).float() + 0.01  # many equal entropies and votes
    views = F.normalize(torch.cat([torch.tensor([tie, fallback, clear]), noisy]), dim=-1)
    for ratio in (0.5, 1.0):  # 1.0: every view votes, a tie is broken among all views
        one = one_at_a_time(bound("zero", text, 10.0, n_views=4, ratio=ratio), views)
        many = bound("zero", text, 10.0, n_views=4, ratio=ratio).predict_features_many(views)
        assert torch.equal(many, one)
    half = one_at_a_time(bound("zero", text, 10.0, n_views=4, ratio=0.5), views[:3])
    torch.testing.assert_close(half, torch.tensor([[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0], [1.0, 0, 0]]))


@pytest.mark.parametrize("tol", [1e-6, 3e-3])
def test_mta_equals_the_published_algorithm_per_image(tol):
    """With a loose ``tol`` images stop their inner loops at different iterations: each must freeze alone."""
    text, views = realistic(b=4, n=24, c=5, d=16, seed=1)
    method = bound("mta", text, 10.0, n_views=24, tol=tol)
    many = method.predict_features_many(views)
    expected = torch.stack([reference_mta(v, text, scale=10.0, tol=tol) for v in views])
    torch.testing.assert_close(many, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(many, one_at_a_time(method, views), rtol=0, atol=1e-6)
    assert len(set(many.argmax(-1).tolist())) > 1


def test_mta_frozen_rows_matter():
    """The loose-tol case above is a real test: without per-image freezing the modes would differ."""
    text, views = realistic(b=4, n=24, c=5, d=16, seed=1)
    method = bound("mta", text, 10.0, n_views=24, tol=3e-3)
    probs = method.logits(views).softmax(-1)
    affinity = probs @ probs.mT
    alone = torch.stack([method.mode(v, a) for v, a in zip(views, affinity)])
    torch.testing.assert_close(method.mode(views, affinity), alone, rtol=0, atol=1e-6)
    method._until_still = lambda value, update: _never_frozen(method, value, update)
    assert (method.mode(views, affinity) - alone).abs().max() > 1e-5


def _never_frozen(method, value, update):
    """A wrong batched loop: stops only when every image is still, updating all of them until then."""
    for _ in range(method.inner_steps):
        new = update(value)
        done = bool((torch.linalg.vector_norm(new - value, dim=-1) < method.tol).all())
        value = new
        if done:
            break
    return value


@pytest.mark.parametrize("options", [{}, {"steps": 3, "lambda_reg": 0.5, "lr": 0.05},
                                     {"steps": 2, "penalty": "squared", "lambda_reg": 2.0, "predict": "confident"},
                                     {"steer": "image", "steps": 2}, {"k_t": 4, "steps": 4, "lr": 0.02}])
def test_sts_each_image_gets_its_own_adamw_steps(options):
    text, views = realistic(b=4, n=64, c=30, d=32, seed=2)
    method = bound("sts", text, 10.0, n_views=64, **options)
    many = method.predict_features_many(views)
    torch.testing.assert_close(many, one_at_a_time(bound("sts", text, 10.0, n_views=64, **options), views),
                               rtol=0, atol=1e-6)
    kept = take_views(views, select_confident(method.logits(views, text), 0.1))
    gammas = method.adapt(kept)  # [B, k_t]: each row equals the coefficients of its image adapted alone
    torch.testing.assert_close(gammas, torch.stack([method.adapt(k) for k in kept]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("base", ["zeroshot", "te", "zero", "mta", "sts"])
def test_subclasses_that_change_the_one_image_path_go_image_by_image(base):
    """A subclass overriding ``predict_features`` (or turning online) must see every image there, not be
    bypassed by its parent's vectorised step."""
    from vlmtta.methods import get_method_class

    parent = get_method_class(base)
    calls = []

    class Recording(parent):
        def predict_features(self, features):
            calls.append(features.shape)
            return super().predict_features(features)

    class Online(parent):
        episodic = False

    text, views = realistic(b=3, n=8, c=6, d=16)
    for cls in (Recording, Online):
        method = cls(n_views=8)
        method.bind(Context([f"c{i}" for i in range(6)], [], text, 100.0))
        many = method.predict_features_many(views)
        torch.testing.assert_close(many, one_at_a_time(bound(base, text, n_views=8), views), rtol=0, atol=1e-6)
    assert calls == [(8, 16)] * 3
