"""DynaPrompt: the online prompt buffer equals a direct, one-prompt-at-a-time formulation."""
from __future__ import annotations

import pytest
import torch

from conftest import bound_method, random_images
from vlmtta.methods import create_method, get_method_class
from vlmtta.methods.dynaprompt import prompt_metrics

CLASSES = ["cat", "dog", "golden retriever", "car", "airliner", "tabby cat"]


class DirectDynaPrompt:
    """The buffer as a list of slots (``None`` or [offset, last use]); every prompt encoded on its own; AdamW's
    first step written out (fresh moments each image: ``p (1 - lr wd) - lr g / (|g| + eps)``).  Ties in "least
    recently used" go to the lowest slot, a new prompt takes the lowest free slot.  ``always``: the official
    code's flow (the initial prompt is selected at every image; a slot is freed before the selection)."""

    def __init__(self, learner, scale, size, lr=5e-3, ratio=0.1, always=False):
        self.learner, self.scale, self.lr, self.ratio, self.always = learner, scale, lr, ratio, always
        self.slots: list = [None] * size
        self.clock = 0
        self.appended = self.deleted = 0  # images at which the initial prompt was appended; prompts deleted

    def delete_least_recent(self):
        self.deleted += 1
        self.slots[min(range(len(self.slots)), key=lambda i: (self.slots[i][1], i))] = None

    def step(self, features):
        if self.always and all(self.slots):
            self.delete_least_recent()
        stored = [i for i, item in enumerate(self.slots) if item is not None]
        candidates = [self.slots[i][0] for i in stored] + [torch.zeros_like(self.learner.ctx)]
        leaves = [c.clone().requires_grad_(True) for c in candidates]
        logits = [self.scale * features @ self.learner(self.learner.ctx + leaf).t() for leaf in leaves]

        def entropy(x):
            p = x.softmax(-1)
            return -(p * p.log()).sum(-1)

        ent = [float(entropy(l.detach()).mean()) for l in logits]
        diff = [float((l.detach()[0].max() - l.detach()[1:].max(-1).values).mean()) for l in logits]
        chosen = [i for i in range(len(stored)) if ent[i] < ent[-1] and diff[i] > diff[-1]]
        if self.always or not chosen:
            chosen.append(len(stored))
            self.appended += 1
        view_entropy = torch.stack([entropy(logits[i].detach()) for i in chosen]).mean(0)
        keep = view_entropy.argsort()[: max(1, int(len(features) * self.ratio))]
        losses = []
        for i in chosen:
            mean = logits[i][keep].softmax(-1).mean(0)
            losses.append(-(mean * mean.log()).sum())
        grads = torch.autograd.grad(torch.stack(losses).mean(), [leaves[i] for i in chosen])
        tuned = [candidates[i] * (1 - self.lr * 0.01) - self.lr * g / (g.abs() + 1e-8) for i, g in zip(chosen, grads)]
        for i, t in zip(chosen, tuned):
            if i == len(stored) and all(self.slots):
                self.delete_least_recent()
            self.slots[stored[i] if i < len(stored) else self.slots.index(None)] = [t, self.clock]
        self.clock += 1
        with torch.no_grad():
            out = torch.stack([self.scale * features[0] @ self.learner(self.learner.ctx + t).t() for t in tuned]).mean(0)
        return out.softmax(-1)


@pytest.mark.parametrize("always", [False, True])
def test_stream_equals_the_direct_formulation(tiny_backbone, always):
    method = bound_method("dynaprompt", tiny_backbone, CLASSES, n_views=16, buffer_size=3, always_append=always)
    direct = DirectDynaPrompt(method.learner, method.context.logit_scale, 3, always=always)
    selected_more_than_one = False
    for seed in range(12):
        views = random_images(16, seed)
        probs = method.predict_views(views)
        selected_more_than_one |= int((method.last_used == method.clock - 1).sum()) > 1
        torch.testing.assert_close(probs, direct.step(tiny_backbone.encode_images(views)), atol=1e-5, rtol=1e-4)
        assert method.last_used.tolist() == [-1 if item is None else item[1] for item in direct.slots]
    for slot, item in enumerate(direct.slots):
        torch.testing.assert_close(method.offsets[slot], item[0], atol=1e-5, rtol=1e-4)
    if always:
        assert selected_more_than_one and direct.appended == 12  # the initial prompt is appended at every image
    else:  # both branches ran: images that appended the initial prompt and images that tuned stored prompts only
        assert 1 <= direct.appended < 12
    assert direct.deleted >= 1  # the buffer filled up and its least recently selected prompt was deleted


def test_metrics_and_reset(tiny_backbone):
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 3.0]], [[0.0, 0.5], [1.0, 1.0]]])
    entropy, difference = prompt_metrics(logits)
    p = logits.softmax(-1)
    torch.testing.assert_close(entropy, (-(p * p.log()).sum(-1)).mean(0))
    torch.testing.assert_close(difference, torch.tensor([(2.0 - 1.0 + 2.0 - 0.5) / 2, (0.0 - 3.0 + 0.0 - 1.0) / 2]))
    method = bound_method("dynaprompt", tiny_backbone, CLASSES, n_views=8, buffer_size=2)
    first = [method.predict_views(random_images(8, s)) for s in range(3)]
    assert bool((method.last_used >= 0).all()) and method.offsets.abs().sum() > 0
    method.reset()
    assert bool((method.last_used < 0).all()) and method.offsets.abs().sum() == 0 and method.clock == 0
    for s, p in enumerate(first):
        torch.testing.assert_close(method.predict_views(random_images(8, s)), p)
    assert not method.learner.ctx.requires_grad and all(p.grad is None for p in tiny_backbone.model.parameters())


def test_defaults_and_errors():
    cls = get_method_class("dynaprompt")
    d = cls.defaults()
    assert (d["buffer_size"], d["lr"], d["n_views"], d["confidence_ratio"]) == (12, 5e-3, 64, 0.1)
    assert d["always_append"] is False
    assert cls.episodic is False and cls.info()["needs"] == ["text_grad"]
    assert cls.options_for("dtd") == {"augmentation": "augmix"} and cls.options_for("imagenet_a") == {}
    with pytest.raises(ValueError, match="buffer_size"):
        create_method("dynaprompt", buffer_size=0)


def test_loss_is_the_mean_over_prompts_of_the_confident_views_marginal_entropy():
    from vlmtta.entropy import marginal_entropy, shannon_entropy
    from vlmtta.methods.dynaprompt import dynaprompt_loss

    logits = torch.randn(16, 3, 7, generator=torch.Generator().manual_seed(0))
    keep = shannon_entropy(logits).mean(dim=1).argsort()[:4]  # 25 % of 16 views, ranked over the prompts
    by_prompt = [marginal_entropy(logits[keep, s]) for s in range(3)]
    assert float(dynaprompt_loss(logits, 0.25)) == pytest.approx(sum(map(float, by_prompt)) / 3, rel=1e-6)
