"""BATCLIP, WATT and CLIPArTT: losses against direct formulations on the tiny model, WATT's weight averaging,
gradients only where each method needs them, bit-exact reset."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import bound_method, random_images
from test_tent_sar_deyo import direct_features

from vlmtta.entropy import shannon_entropy
from vlmtta.methods.batclip import projection_matching, prototype_separation
from vlmtta.methods.clipartt import transductive_loss

CLASSES = ["cat", "dog", "car", "tree", "boat"]


def loop_transductive_loss(f: torch.Tensor, t: torch.Tensor, scale: float, tau: float) -> torch.Tensor:
    """The official algorithm written element by element: targets softmax over rows of the mean similarity,
    image i scored against every prompt j, cross-entropy with the transposed targets."""
    b = f.shape[0]
    sim = [[(f[i] @ f[j] + t[i] @ t[j]) / 2 / tau for j in range(b)] for i in range(b)]
    q = [[math.exp(sim[i][j]) / sum(math.exp(sim[i][k]) for k in range(b)) for j in range(b)] for i in range(b)]
    total = 0.0
    for i in range(b):
        logits = [scale * float(f[i] @ t[j]) for j in range(b)]
        log_z = math.log(sum(math.exp(v - max(logits)) for v in logits)) + max(logits)
        total += -sum(q[j][i] * (logits[j] - log_z) for j in range(b))
    return torch.tensor(total / b)


def test_transductive_loss_matches_elementwise_formulation():
    gen = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(6, 4, generator=gen, dtype=torch.float64), dim=-1)
    expected = loop_transductive_loss(f, t, 10.0, 0.5).double()
    torch.testing.assert_close(transductive_loss(f, t, 10.0, 0.5), expected)


def test_batclip_terms_hand_computed():
    f = torch.tensor([[2.0, 0.0], [4.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([1, 1, 0])  # class 1 mean (3, 0), class 0 mean (0, 3)
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    torch.testing.assert_close(projection_matching(f, text, labels), torch.tensor((3.0 + 3.0) / 2))
    torch.testing.assert_close(prototype_separation(f, labels), torch.tensor(2.0))  # two ordered pairs, cos 0
    assert float(prototype_separation(f, torch.zeros(3, dtype=torch.long))) == 0.0


def test_batclip_loss_matches_direct_and_adapts_both_towers(tiny_backbone):
    method = bound_method("batclip", tiny_backbone, CLASSES)
    assert any(n.startswith("visual.") for n in method.params) and "ln_final.weight" in method.params
    torch.testing.assert_close(method.text_features(), method.context.text_features, rtol=1e-5, atol=1e-6)
    images = random_images(12, 2)
    with torch.no_grad():
        raw = tiny_backbone.model.encode_image(images)
    text = method.context.text_features
    logits = tiny_backbone.logit_scale * F.normalize(raw, dim=-1) @ text.t()
    labels = logits.argmax(1)
    expected = shannon_entropy(logits).mean() - projection_matching(raw, text, labels) \
        - prototype_separation(raw, labels)
    probs = method.predict_batch(images)
    assert method.last["loss"] == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(probs, logits.softmax(-1), rtol=1e-4, atol=1e-5)
    changed = {n for n in method.params if not torch.equal(method.params[n], method.original[n])}
    assert any(n.startswith("visual.") for n in changed) and any(not n.startswith("visual.") for n in changed)
    method.reset()
    assert not method.norms.changed()
    visual_only = bound_method("batclip", tiny_backbone, CLASSES, adapt_text=False)
    assert visual_only.params and all(n.startswith("visual.") for n in visual_only.params)
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())


def test_clipartt_loss_uses_top_k_prompts(tiny_backbone):
    method = bound_method("clipartt", tiny_backbone, CLASSES, steps=1)
    images = random_images(8, 4)
    with torch.no_grad():
        f = F.normalize(tiny_backbone.model.encode_image(images), dim=-1)
    top = (f @ method.context.text_features.t()).topk(3, dim=1).indices
    prompts = tiny_backbone.encode_text([f"a photo of a {' or '.join(CLASSES[c] for c in row)}" for row in top.tolist()])
    expected = loop_transductive_loss(f.double(), prompts.double(), tiny_backbone.logit_scale, 0.01)
    method.predict_batch(images)
    assert method.last["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert set(method._prompt_cache) == {tuple(row) for row in top.tolist()}
    assert method.norms.changed()


def adam_first_update(grad: torch.Tensor, lr: float) -> torch.Tensor:
    return lr * grad / (grad.abs() + 1e-8)  # bias-corrected first Adam step


def test_watt_parallel_averages_the_per_template_updates(tiny_backbone):
    templates = ["a photo of a {}.", "art of the {}."]
    method = bound_method("watt", tiny_backbone, CLASSES, mode="parallel", steps=1, repeats=1,
                         template_set="a photo of a {}.")
    method.templates = templates  # two templates keep the test short (any set of them can be given by name)
    method.bind(method.context)
    images = random_images(8, 6)
    expected = {k: v.clone() for k, v in method.original.items()}
    for template in templates:
        text = tiny_backbone.class_embeddings(CLASSES, [template])
        features, leaves = direct_features(tiny_backbone, method, images)
        labels = (features.detach() @ text.t()).argmax(1)
        loss = transductive_loss(features, text[labels], tiny_backbone.logit_scale, 0.01)
        for name, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
            expected[name] -= adam_first_update(g, 1e-3) / len(templates)
    probs = method.predict_batch(images)
    for name, value in expected.items():
        torch.testing.assert_close(method.params[name], value, rtol=1e-5, atol=1e-6)
    ensemble = tiny_backbone.class_embeddings(CLASSES, templates)
    with torch.no_grad():
        adapted = F.normalize(method.encode(images), dim=-1)
    torch.testing.assert_close(probs, (tiny_backbone.logit_scale * adapted @ ensemble.t()).softmax(-1))


def test_watt_modes_differ_and_batch_reset_is_episodic(tiny_backbone):
    images = random_images(8, 7)
    seq = bound_method("watt", tiny_backbone, CLASSES, steps=1, repeats=2)
    par = bound_method("watt", tiny_backbone, CLASSES, steps=1, repeats=2, mode="parallel")
    first = seq.predict_batch(images)
    assert not torch.equal(first, par.predict_batch(images))
    seq.predict_batch(random_images(8, 8))
    torch.testing.assert_close(seq.predict_batch(images), first, rtol=0, atol=0)  # reset="batch": no memory
    assert len(seq.templates) == 8 and seq.protocol == "batch (reset: batch)"
