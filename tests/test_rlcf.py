"""RLCF: CLIP-reward-weighted prompt tuning; rewards and loss against direct loops, fast path against the reference."""
from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIG, bound_method, random_images, write_model_dir
from vlmtta.methods import create_method, get_method_class
from vlmtta.methods.rlcf import clip_rewards, reward_loss

CLASSES = ["cat", "dog", "golden retriever", "car", "airliner", "tabby cat"]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> str:
    """A different tiny CLIP (wider, 48 px input) as the reward model (a seed whose cosines are mostly > 0)."""
    config = {**TINY_CONFIG, "embed_dim": 48,
              "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 48, "width": 96}}
    torch.manual_seed(5)
    return write_model_dir(tmp_path_factory.mktemp("reward-clip"), config, open_clip.CLIP(**config).state_dict())


def bound(backbone, reward_dir, **options):
    return bound_method("rlcf", backbone, CLASSES, reward_model=reward_dir, reward_pretrained=None, **options)


def test_rewards_and_loss_against_direct_loops():
    images = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    logits = torch.randn(4, 6)
    sampled = logits.topk(3, dim=-1).indices
    rewards = clip_rewards(images, text, sampled)
    for i in range(4):
        scores = [2.5 * max(float(images[i] @ text[c]), 0.0) for c in sampled[i]]
        assert rewards[i].tolist() == pytest.approx([s - sum(scores) / 3 for s in scores], abs=1e-6)
    by_hand = sum(-float(rewards[i, k]) * float(logits[i].log_softmax(-1)[sampled[i, k]])
                  for i in range(4) for k in range(3)) / 12
    assert float(reward_loss(logits, rewards, sampled)) == pytest.approx(by_hand, rel=1e-5)


def test_reward_model_sees_its_own_preprocessing(tiny_backbone, reward_dir):
    method = bound(tiny_backbone, reward_dir, n_views=8)
    views = random_images(2, 0)
    resized = method.for_reward(views)
    assert resized.shape == (2, 3, 48, 48)
    pixels = views * torch.tensor(tiny_backbone.std).view(1, 3, 1, 1) + torch.tensor(tiny_backbone.mean).view(1, 3, 1, 1)
    expected = F.interpolate(pixels, size=48, mode="bicubic", align_corners=True)
    expected = (expected - torch.tensor(method.reward.mean).view(1, 3, 1, 1)) / torch.tensor(method.reward.std).view(1, 3, 1, 1)
    torch.testing.assert_close(resized, expected)
    assert method.reward_text.shape == (len(CLASSES), 48)


def test_fast_path_equals_the_straightforward_formulation(tiny_backbone, reward_dir):
    images = [random_images(16, 0), random_images(16, 1)]
    results = []
    for reference in (False, True):
        method = bound(tiny_backbone, reward_dir, n_views=16, reference_impl=reference)
        results.append([(method.predict_views(image), method.learner.ctx.detach().clone())
                        for image in images if method.reset() is None])
    for (p_fast, ctx_fast), (p_ref, ctx_ref) in zip(*results):
        torch.testing.assert_close(ctx_fast, ctx_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p_fast, p_ref, atol=1e-5, rtol=1e-4)


def test_one_step_equals_a_direct_policy_gradient(tiny_backbone, reward_dir):
    method = bound(tiny_backbone, reward_dir, n_views=32, steps=1, lr=0.01)
    views = random_images(32, 4)
    method.predict_views(views)
    # direct: the same computation written out, on the learner at its initial context
    ctx = method._init_ctx.clone().requires_grad_(True)
    features = tiny_backbone.encode_images(views)
    logits = method.context.logit_scale * features @ method.learner(ctx).t()
    probs = logits.detach().softmax(-1)
    keep = (-(probs * probs.log()).sum(-1)).argsort()[:3]
    sampled = logits[keep].detach().topk(3, dim=-1).indices
    reward_images = method.reward.encode_images(method.for_reward(views[keep]))
    scores = 2.5 * (reward_images[:, None, :] * method.reward_text[sampled]).sum(-1).clamp(min=0)
    rewards = scores - scores.mean(-1, keepdim=True)
    loss = -(rewards * logits[keep].log_softmax(-1).gather(1, sampled)).mean()
    assert rewards.abs().max() > 0.01
    (grad,) = torch.autograd.grad(loss, ctx)
    expected = method._init_ctx - 0.01 * grad / (grad.abs() + 1e-8) - 0.01 * 5e-4 * method._init_ctx  # AdamW step 1
    torch.testing.assert_close(method.learner.ctx.detach(), expected, atol=1e-5, rtol=1e-4)
    assert (method.learner.ctx - method._init_ctx).abs().max() > 1e-3


def test_paper_settings_and_errors(tiny_backbone, reward_dir):
    rlcf = get_method_class("rlcf")
    d = rlcf.defaults()
    assert (d["steps"], d["lr"], d["weight_decay"], d["sample_k"], d["reward_model"]) == (3, 7e-3, 5e-4, 3, "ViT-L-14")
    assert rlcf.options_for("dtd") == {"augmentation": "augmix"}  # TPT's views
    method = bound(tiny_backbone, reward_dir, n_views=8)
    assert method.optimizer.param_groups[0]["weight_decay"] == 5e-4
    assert bound_method("tpt", tiny_backbone, CLASSES, n_views=8).optimizer.param_groups[0]["weight_decay"] == 0.01
    with pytest.raises(ValueError, match="sample_k"):
        bound(tiny_backbone, reward_dir, sample_k=7)
    with pytest.raises(ValueError, match="sample_k"):
        create_method("rlcf", sample_k=0)



def test_reward_model_with_its_own_weights_needs_no_tag(tiny_backbone):
    """The default ``reward_pretrained="auto"`` loads a local-dir: or shipped reward model with its own weights
    (a tag such as ``openai`` is refused for those), and means ``openai`` for an architecture name."""
    from vlmtta.backbone import resolve_weights

    method = bound_method("rlcf", tiny_backbone, CLASSES, reward_model="vlmtta-testbed")
    assert method.reward_pretrained == "auto" and method.reward.pretrained == "testbed"
    assert resolve_weights("ViT-L-14", method.reward_pretrained)[1] == "openai"
