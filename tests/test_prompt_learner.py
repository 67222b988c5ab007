"""The CoOp-style prompt learner on the truncated causal context."""
from __future__ import annotations

import pytest
import torch

from vlmtta.prompt_learner import PromptLearner, init_context, load_context

CLASSES = ["cat", "golden retriever", "space shuttle", "airliner"]


def test_init_context_reproduces_the_hand_written_prompt(tiny_backbone):
    ctx = init_context(tiny_backbone, 4, "a photo of a")
    learner = PromptLearner(tiny_backbone, CLASSES, ctx)
    expected = tiny_backbone.encode_text([f"a photo of a {name}." for name in CLASSES])
    torch.testing.assert_close(learner(), expected, atol=1e-5, rtol=1e-5)


def test_truncated_context_equals_full_context(tiny_backbone):
    ctx = init_context(tiny_backbone, 4, None, seed=3)
    short, full = (PromptLearner(tiny_backbone, CLASSES, ctx, truncate=t) for t in (True, False))
    assert short.length < full.length == 77
    torch.testing.assert_close(short(), full(), atol=1e-5, rtol=1e-5)


def test_only_the_context_receives_gradients(tiny_backbone):
    learner = PromptLearner(tiny_backbone, CLASSES, init_context(tiny_backbone, 4, "a photo of a"))
    assert [name for name, p in learner.named_parameters() if p.requires_grad] == ["ctx"]
    learner().pow(3).sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())


def test_init_text_must_match_the_context_length(tiny_backbone):
    with pytest.raises(ValueError, match="n_ctx=4"):
        init_context(tiny_backbone, 3, "a photo of a")
    assert init_context(tiny_backbone, 7, None).shape == (7, tiny_backbone.text_tower.width)


def test_coop_context_loads_from_a_checkpoint(tmp_path, tiny_backbone):
    ctx = torch.randn(16, tiny_backbone.text_tower.width)
    torch.save({"state_dict": {"ctx": ctx, "token_prefix": torch.zeros(2, 1, 64)}}, tmp_path / "coop.pth")
    torch.testing.assert_close(load_context(tmp_path / "coop.pth"), ctx)
    torch.save({"weights": ctx}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="ctx"):
        load_context(tmp_path / "bad.pth")


def test_many_contexts_in_one_pass_equal_one_at_a_time(tiny_backbone):
    learner = PromptLearner(tiny_backbone, CLASSES, init_context(tiny_backbone, 4, "a photo of a"))
    contexts = learner.ctx.detach() + 0.05 * torch.randn(3, *learner.ctx.shape, generator=torch.Generator().manual_seed(0))
    many = learner.forward_many(contexts)
    assert many.shape == (3, len(CLASSES), learner().shape[1])
    for s in range(3):
        torch.testing.assert_close(many[s], learner(contexts[s]), atol=1e-5, rtol=1e-5)
