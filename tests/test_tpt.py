"""TPT and C-TPT: equal to the straightforward formulation, episodic, only the context is tuned."""
from __future__ import annotations

import pytest
import torch

from conftest import run_episodes
import vlmtta
import vlmtta.methods.tpt as tpt
from vlmtta.methods import Context, create_method, get_method_class

CLASSES = ["cat", "dog", "golden retriever", "car", "airliner", "tabby cat"]


def bound(backbone, name="tpt", **options):
    method = create_method(name, **options)
    text = backbone.class_embeddings(CLASSES, "a photo of a {}.")
    method.bind(Context(CLASSES, ["a photo of a {}."], text, backbone.logit_scale, backbone))
    return method


def views(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("options", [{}, {"steps": 3, "ctpt_lambda": 20.0}, {"ctx_init": None, "n_ctx": 6}])
def test_fast_path_equals_the_straightforward_formulation(tiny_backbone, options):
    images = [views(0, 8), views(1, 8)]
    fast = run_episodes(bound(tiny_backbone, n_views=8, **options), images)
    reference = run_episodes(bound(tiny_backbone, n_views=8, reference_impl=True, **options), images)
    for (p_fast, ctx_fast), (p_ref, ctx_ref) in zip(fast, reference):
        torch.testing.assert_close(ctx_fast, ctx_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p_fast, p_ref, atol=1e-5, rtol=1e-4)


def test_tuning_moves_the_context_and_changes_the_prediction(tiny_backbone):
    method = bound(tiny_backbone, n_views=16)
    zero_shot = create_method("zeroshot")
    zero_shot.bind(method.context)
    before = zero_shot.predict_features(tiny_backbone.encode_images(views(0)[:1]))
    probs = method.predict_views(views(0))
    assert (method.learner.ctx - method._init_ctx).abs().max() > 1e-3
    assert torch.isclose(probs.sum(), torch.tensor(1.0)) and not torch.allclose(probs, before, atol=1e-6)


def test_frozen_encoders_and_episodic_reset(tiny_backbone):
    weights = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    method = bound(tiny_backbone, n_views=16, cache_init_graph=False)
    first = method.predict_views(views(0))
    assert method.optimizer.state  # AdamW moments exist after a step
    method.reset()
    torch.testing.assert_close(method.learner.ctx.detach(), method._init_ctx)
    assert not method.optimizer.state
    torch.testing.assert_close(method.predict_views(views(0)), first)
    assert all(torch.equal(weights[k], v) for k, v in tiny_backbone.model.state_dict().items())
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_cached_initial_graph_gives_the_same_results(tiny_backbone):
    images = [views(2), views(3), views(2)]
    cached = run_episodes(bound(tiny_backbone, n_views=16, steps=2), images)
    fresh = run_episodes(bound(tiny_backbone, n_views=16, steps=2, cache_init_graph=False), images)
    for (p_a, c_a), (p_b, c_b) in zip(cached, fresh):
        torch.testing.assert_close(c_a, c_b)
        torch.testing.assert_close(p_a, p_b)
    torch.testing.assert_close(cached[0][0], cached[2][0])


def test_confident_selection_keeps_ten_percent(tiny_backbone):
    method = bound(tiny_backbone, n_views=64)
    logits = torch.randn(64, len(CLASSES))
    assert method.select(logits, None).numel() == 6


def test_ctpt_spreads_the_text_features(tiny_backbone):
    assert float(tpt.text_feature_dispersion(torch.eye(4))) == pytest.approx(0.75 ** 0.5)
    dispersion = {}
    for lam in (0.0, 1000.0):
        method = bound(tiny_backbone, n_views=16, ctpt_lambda=lam, lr=0.05)
        method.predict_views(views(0))
        with torch.no_grad():
            dispersion[lam] = float(tpt.text_feature_dispersion(method.learner()))
    assert dispersion[1000.0] > dispersion[0.0]


def test_ctpt_registration_and_paper_settings():
    ctpt = get_method_class("ctpt")
    assert ctpt.defaults()["ctpt_lambda"] == 50.0 and ctpt.defaults()["augmentation"] == "augmix"
    assert ctpt.options_for("imagenet_a")["ctpt_lambda"] == 20.0
    assert get_method_class("tpt").options_for("dtd") == {"augmentation": "augmix"}
    assert get_method_class("tpt").options_for("imagenet_r") == {}
    with pytest.raises(ValueError):
        create_method("tpt", confidence_ratio=0.0)


def test_adapter_end_to_end(tiny_backbone, rgb_image):
    adapter = vlmtta.Adapter(CLASSES, "tpt", backbone=tiny_backbone, n_views=8)
    prediction = adapter.step(rgb_image)
    assert prediction.label in CLASSES and sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert adapter.protocol()["hyperparameters"]["lr"] == 5e-3
