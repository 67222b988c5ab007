"""TPS: one AdamW step on per-class prototype shifts equals the direct formulation; runs on features only."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import bound_method, random_images
from vlmtta.methods import Context, create_method, get_method_class

CLASSES = ["cat", "dog", "golden retriever", "car", "airliner", "tabby cat"]


def direct_tps(features: torch.Tensor, text: torch.Tensor, scale: float, lr: float, ratio: float,
               per_class: bool = True) -> torch.Tensor:
    """Hand formulation: entropy-ranked views, entropy of the mean probability, one explicit AdamW step."""
    shift = torch.zeros(text.shape[0] if per_class else 1, text.shape[1], requires_grad=True)
    logits = scale * features @ F.normalize(text + shift, dim=-1).t()
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)
    keep = entropy.detach().argsort()[: max(1, int(len(features) * ratio))]
    mean = probs[keep].mean(0)
    (grad,) = torch.autograd.grad(-(mean * mean.log()).sum(), shift)
    # AdamW's first step from zero: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> g / (|g| + eps); decay of 0 is 0
    step = -lr * grad / (grad.abs() + 1e-8)
    tuned = F.normalize(text + step, dim=-1)
    return (scale * features[:1] @ tuned.t()).softmax(-1)[0]


@pytest.mark.parametrize("per_class", [True, False])
def test_equals_the_direct_formulation(tiny_backbone, per_class):
    method = bound_method("tps", tiny_backbone, CLASSES, n_views=16, per_class=per_class)
    for seed in (0, 1):
        features = tiny_backbone.encode_images(random_images(16, seed))
        expected = direct_tps(features, method.prototypes, method.context.logit_scale, 5e-3, 0.1, per_class)
        torch.testing.assert_close(method.predict_features(features), expected, atol=1e-5, rtol=1e-4)


def test_shifts_change_the_prediction_and_are_episodic(tiny_backbone):
    method = bound_method("tps", tiny_backbone, CLASSES, n_views=16, lr=0.05)
    features = tiny_backbone.encode_images(random_images(16, 3))
    zero_shot = method.logits(features[:1]).softmax(-1)[0]
    first = method.predict_features(features)
    assert not torch.allclose(first, zero_shot, atol=1e-4)
    # the shift lowers the confident views' marginal entropy
    shift = method.adapt(features)
    assert float(method.loss(features, shift)) < float(method.loss(features, torch.zeros_like(shift)))
    torch.testing.assert_close(method.predict_features(features), first)  # nothing carried over
    assert torch.equal(method.prototypes, method.context.text_features)


def test_runs_on_precomputed_features_alone(tiny_backbone):
    text = tiny_backbone.class_embeddings(CLASSES, "a photo of a {}.")
    method = create_method("tps", n_views=8)
    method.bind(Context(CLASSES, ["a photo of a {}."], text, tiny_backbone.logit_scale, backbone=None))
    with torch.inference_mode():  # as the runners call it
        probs = method.predict_features(F.normalize(torch.randn(8, text.shape[1]), dim=-1))
    assert probs.shape == (len(CLASSES),) and math.isclose(float(probs.sum()), 1.0, abs_tol=1e-5)


def test_defaults_and_errors():
    defaults = get_method_class("tps").defaults()
    assert (defaults["n_views"], defaults["lr"], defaults["steps"], defaults["confidence_ratio"]) == (64, 5e-3, 1, 0.1)
    assert defaults["per_class"] is True and get_method_class("tps").info()["needs"] == ["view_features"]
    with pytest.raises(ValueError, match="steps"):
        create_method("tps", steps=0)
    with pytest.raises(ValueError, match="confidence ratio"):
        create_method("tps", confidence_ratio=0.0)
