"""Episodic prompt tuning on many images at once (``predict_views_many``) equals one image at a time.

Tolerance: the batched path runs the text tower on B x C prompts and batched matmuls, whose float32 reduction
order differs from one image's: the text features differ by up to ~1e-7, the tuned contexts (paper's lr 5e-3) by
up to ~2e-7 and the probabilities by up to ~1e-6 (measured), so both are compared at 2e-6 absolute / 1e-5
relative.  AdamW's update ``lr * m / (sqrt(v) + eps)`` is nearly ``lr * sign(g)`` for tiny gradients, so a rounding
difference in a near-zero gradient can move a context element by up to ``lr``: larger learning rates need a
looser tolerance (at lr 0.05 and 3 steps we measured 1.2e-5).
"""
from __future__ import annotations

import pytest
import torch

from conftest import bound_method, run_episodes

CLASSES = ["cat", "dog", "golden retriever", "car", "airliner", "tabby cat"]
TOL = dict(atol=2e-6, rtol=1e-5)


def image_views(n_images: int, n_views: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n_images, n_views, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_many_equals_one(method_one, method_many, views: torch.Tensor) -> None:
    expected = run_episodes(method_one, list(views))
    probs = method_many.predict_views_many(views)
    assert probs.shape == (len(views), len(CLASSES))
    for b, (p_one, ctx_one) in enumerate(expected):
        torch.testing.assert_close(method_many.tuned_contexts[b], ctx_one, **TOL)
        torch.testing.assert_close(probs[b], p_one, **TOL)
    assert not torch.allclose(method_many.tuned_contexts[0], method_many.tuned_contexts[1])  # images differ


CASES = [("tpt", {}), ("tpt", {"steps": 3, "confidence": "tsallis", "q": 0.5}),
         ("tpt", {"ctx_init": None, "n_ctx": 6, "cache_init_graph": False}),
         ("ctpt", {"steps": 2}), ("otpt", {"steps": 2}), ("otpt", {"orthogonality": "frobenius"}),
         ("rtpt", {"steps": 2, "neighbours": 3})]


@pytest.mark.parametrize("name,options", CASES)
def test_many_equals_one_at_a_time(tiny_backbone, name, options):
    one, many = (bound_method(name, tiny_backbone, CLASSES, n_views=8, **options) for _ in range(2))
    assert_many_equals_one(one, many, image_views(4, seed=len(options)))


@pytest.mark.parametrize("prompts_per_pass", [1, 2 * len(CLASSES)])
def test_chunks_over_images_give_the_same_outputs(tiny_backbone, prompts_per_pass):
    one = bound_method("ctpt", tiny_backbone, CLASSES, n_views=8, steps=2)
    many = bound_method("ctpt", tiny_backbone, CLASSES, n_views=8, steps=2, prompts_per_pass=prompts_per_pass)
    assert many.images_per_pass() == max(1, prompts_per_pass // len(CLASSES))
    assert_many_equals_one(one, many, image_views(5, seed=3))


def test_the_batch_leaves_the_method_reset(tiny_backbone):
    method = bound_method("tpt", tiny_backbone, CLASSES, n_views=8)
    first = method.predict_views(image_views(1)[0])
    method.predict_views_many(image_views(3, seed=1))
    torch.testing.assert_close(method.learner.ctx.detach(), method._init_ctx)
    method.reset()
    torch.testing.assert_close(method.predict_views(image_views(1)[0]), first)


def test_rlcf_many_equals_one_at_a_time(tiny_backbone, tmp_path):
    import open_clip

    from conftest import TINY_CONFIG, write_model_dir

    config = {**TINY_CONFIG, "embed_dim": 48,  # test_rlcf's reward model (its cosines are mostly > 0)
              "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 48, "width": 96}}
    torch.manual_seed(5)
    reward = write_model_dir(tmp_path / "reward", config, open_clip.CLIP(**config).state_dict())
    one, many = (bound_method("rlcf", tiny_backbone, CLASSES, n_views=16, reward_model=reward,
                              reward_pretrained=None) for _ in range(2))
    assert_many_equals_one(one, many, image_views(3, n_views=16, seed=4))


@pytest.mark.parametrize("options", [{}, {"steps": 3, "per_class": False}])
def test_tps_many_equals_one_at_a_time(tiny_backbone, options):
    method = bound_method("tps", tiny_backbone, CLASSES, n_views=16, **options)
    features = tiny_backbone.encode_images(image_views(4, 16, seed=2).flatten(0, 1)).view(4, 16, -1)
    shifts = method.adapt(features.clone())
    assert shifts.shape == (4, len(CLASSES) if not options else 1, features.shape[-1])
    for b in range(4):  # the tuned shifts and the predictions, image by image
        torch.testing.assert_close(shifts[b], method.adapt(features[b].clone()), **TOL)
    expected = torch.stack([method.predict_features(f) for f in features])
    torch.testing.assert_close(method.predict_features_many(features), expected, **TOL)


@pytest.mark.parametrize("cosine_on,cosine_scope", [("features", "generated"), ("logits", "all")])
def test_difftpt_many_equals_one_at_a_time(tiny_backbone, tmp_path, cosine_on, cosine_scope):
    from test_generation import FakePipeline

    from vlmtta.generation import VariationGenerator

    def method():
        return bound_method("difftpt", tiny_backbone, CLASSES, n_views=8, n_generated=4, steps=2, cache_dir=tmp_path,
                            cosine_on=cosine_on, cosine_scope=cosine_scope,
                            pipeline=VariationGenerator(FakePipeline(), name="fake"))

    one, many = method(), method()
    features, logits = torch.randn(3, 12, 16), torch.randn(3, 12, len(CLASSES))  # the selection, image by image
    one._n_conventional = many._n_conventional = 8
    selected = many.select(logits, features)
    for b in range(3):
        assert selected[b].tolist() == one.select(logits[b], features[b]).tolist()
    assert_many_equals_one(one, many, image_views(3, seed=5))
