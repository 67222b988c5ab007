"""DPE: the online stream equals a direct, list-based formulation of the official algorithm."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import bound_method, random_images
from vlmtta.methods import create_method, get_method_class
from vlmtta.methods.dpe import info_nce

CLASSES = ["cat", "dog", "golden retriever", "car", "airliner", "tabby cat"]


class DirectDPE:
    """DPE written out with Python lists, as the official code keeps its queues (a reference, not fast)."""

    def __init__(self, text, scale, alpha=6.0, beta=5.0, lr=6e-4, align=0.5, capacity=3, threshold=0.1):
        self.text, self.scale, self.alpha, self.beta, self.lr, self.align = text.clone(), scale, alpha, beta, lr, align
        self.capacity, self.threshold, self.queues, self.n = capacity, threshold, {}, 0

    def step(self, features: torch.Tensor) -> torch.Tensor:
        n_classes = self.text.shape[0]
        logits = self.scale * features @ F.normalize(self.text, dim=-1).t()
        if len(features) > 1:
            probs = logits.softmax(-1)
            keep = (-(probs * probs.log()).sum(-1)).argsort()[: max(1, int(len(features) * 0.1))]
            query, mean_prob = features[keep].mean(0), logits[keep].softmax(-1).mean(0)
            label = int(logits[keep].mean(0).argmax())
        else:
            query, mean_prob, label = features[0], logits[0].softmax(-1), int(logits[0].argmax())
        entropy = float(-(mean_prob * mean_prob.log()).sum())
        queue = self.queues.setdefault(label, [])
        if len(queue) < self.capacity:
            queue.append((query, entropy))
        elif entropy < queue[-1][1]:
            queue[-1] = (query, entropy)
        queue.sort(key=lambda item: item[1])
        classes = sorted(self.queues)
        visual = torch.stack([sum(f for f, _ in self.queues[c]) / len(self.queues[c]) for c in classes])
        r_text = torch.zeros_like(self.text, requires_grad=True)
        r_visual = torch.zeros_like(visual, requires_grad=True)
        optimizer = torch.optim.AdamW([{"params": [r_text], "lr": self.lr}, {"params": [r_visual], "lr": self.lr}],
                                      eps=1e-3, weight_decay=0.1)
        one_hot = F.one_hot(torch.tensor(classes), n_classes).float()

        def final(q, text, vis):
            return self.scale * q @ text.t() + self.alpha * torch.exp(-self.beta * (1 - vis @ q)) @ one_hot

        text, vis = F.normalize(self.text + r_text, dim=-1), F.normalize(visual + r_visual, dim=-1)
        out = final(query, text, vis).softmax(-1)
        sim = vis @ text[classes].t() / 0.01
        loss = -(out * out.log()).sum() + self.align * -(sim.log_softmax(-1).diagonal()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            text, vis = F.normalize(self.text + r_text, dim=-1), F.normalize(visual + r_visual, dim=-1)
            out = final(features[0], text, vis)
            probs = out.softmax(-1)
            if float(-(probs * probs.log()).sum()) / math.log2(n_classes) < self.threshold:
                self.n += 1
                self.text = self.text * (self.n / (self.n + 1)) + text / (self.n + 1)
        return probs


@pytest.mark.parametrize("n_views", [1, 16])
def test_stream_equals_the_direct_formulation(tiny_backbone, n_views):
    # a high evolution threshold so that the tiny random model's predictions do evolve the textual prototypes
    method = bound_method("dpe", tiny_backbone, CLASSES, n_views=n_views, evolve_threshold=0.95, lr_text=0.01,
                          lr_image=0.01)
    direct = DirectDPE(method.context.text_features, method.context.logit_scale, lr=0.01, threshold=0.95)
    for seed in range(8):
        features = tiny_backbone.encode_images(random_images(n_views, seed))
        torch.testing.assert_close(method.predict_features(features), direct.step(features), atol=1e-5, rtol=1e-4)
    assert method.n_evolved == direct.n > 0
    torch.testing.assert_close(method.text, direct.text, atol=1e-5, rtol=1e-4)
    assert int(method.cache.filled.sum()) == sum(len(q) for q in direct.queues.values())


def test_reset_forgets_the_stream(tiny_backbone):
    method = bound_method("dpe", tiny_backbone, CLASSES, n_views=1, evolve_threshold=0.95)
    stream = [tiny_backbone.encode_images(random_images(1, seed)) for seed in range(5)]
    first = [method.predict_features(f) for f in stream]
    assert method.cache.filled.any() and not torch.equal(method.text, method.context.text_features)
    method.reset()
    assert not method.cache.filled.any() and method.n_evolved == 0
    torch.testing.assert_close(method.text, method.context.text_features)
    for f, p in zip(stream, first):
        torch.testing.assert_close(method.predict_features(f), p)


def test_info_nce_against_its_definition():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    by_hand = sum(-math.log(math.exp(float(qn[i] @ kn[i]) / 0.5) / sum(math.exp(float(qn[i] @ kn[j]) / 0.5)
                                                                          for j in range(4))) for i in range(4)) / 4
    assert float(info_nce(q, k, 0.5)) == pytest.approx(by_hand, rel=1e-5)


def test_official_configs_as_dataset_defaults():
    dpe = get_method_class("dpe")
    assert dpe.episodic is False and dpe.info()["needs"] == ["view_features"]
    assert (dpe.defaults()["alpha"], dpe.defaults()["beta"], dpe.defaults()["align_weight"]) == (6.0, 5.0, 0.5)
    assert dpe.options_for("imagenet_a") == {"alpha": 6.0, "beta": 5.0, "lr_text": 3e-4, "lr_image": 3e-4,
                                             "align_weight": 2.5, "n_views": 64, "augmentation": "augmix",
                                             "predict": "confident"}
    assert dpe.options_for("eurosat")["n_views"] == 1 and dpe.options_for("eurosat")["lr_text"] == 5e-5
    with pytest.raises(ValueError, match="entropy_norm"):
        create_method("dpe", entropy_norm="bits")
