"""Tent, SAR and DeYO: losses and updates against direct formulations on the tiny model, the reliable-sample
and PLPD filters, SAR's recovery, bit-exact reset, the shared backbone untouched."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import bound_method, random_images

from vlmtta.entropy import shannon_entropy
from vlmtta.methods.deyo import patch_shuffle, plpd
from vlmtta.methods.sar import sam_perturbation

CLASSES = ["cat", "dog", "car", "tree", "boat"]


def direct_features(backbone, method, images: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
    """A private copy of the image tower with ``params`` (default: the method's originals) as leaf tensors,
    and its L2-normalised features of ``images``: the formulation the methods must match."""
    visual = copy.deepcopy(backbone.model.visual)
    leaves = {}
    for name, p in visual.named_parameters():
        p.requires_grad_(name in method.params)
        if name in method.params:
            with torch.no_grad():
                p.copy_((params or method.original)[name])
            leaves[name] = p
    return F.normalize(visual(images), dim=-1), leaves


def direct(backbone, method, images: torch.Tensor, params: dict[str, torch.Tensor] | None = None):
    """CLIP logits of ``direct_features`` against the method's class text features, and the leaves."""
    features, leaves = direct_features(backbone, method, images, params)
    return backbone.logit_scale * features @ method.context.text_features.t(), leaves


def sgd_first_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], lr: float) -> dict:
    return {k: params[k] - lr * grads[k] for k in params}  # momentum buffer = gradient on the first step


def assert_params(method, expected: dict[str, torch.Tensor]) -> None:
    for name, value in expected.items():
        torch.testing.assert_close(method.params[name], value, rtol=1e-5, atol=1e-6)


def test_tent_matches_direct_entropy_and_sgd_step(tiny_backbone):
    method = bound_method("tent", tiny_backbone, CLASSES, lr=0.01)
    images = random_images(8)
    logits, leaves = direct(tiny_backbone, method, images)
    loss = shannon_entropy(logits).mean()
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    probs = method.predict_batch(images)
    assert method.last["loss"] == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(probs, logits.detach().softmax(-1), rtol=1e-5, atol=1e-6)  # pre-step prediction
    assert_params(method, sgd_first_step(method.original, grads, 0.01))


def test_every_method_resets_bit_exactly_and_leaves_backbone_alone(tiny_backbone):
    snapshot = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    for name, options in (("tent", {}), ("sar", {"margin": 10.0}),
                          ("deyo", {"entropy_threshold": 10.0, "plpd_threshold": -2.0}), ("batclip", {}),
                          ("clipartt", {"steps": 1}), ("watt", {"steps": 1, "repeats": 1, "template_set": "photo"})):
        method = bound_method(name, tiny_backbone, CLASSES, lr=0.05, reset="domain", **options)
        first = method.predict_batch(random_images(8))
        method.predict_batch(random_images(8, 1))
        assert method.norms.changed(), name
        method.reset()
        assert not method.norms.changed() and not method.optimizer.state, name
        assert all(p.grad is None for p in method.params.values())
        torch.testing.assert_close(method.predict_batch(random_images(8)), first, rtol=0, atol=0)
    assert all(torch.equal(v, snapshot[k]) for k, v in tiny_backbone.model.state_dict().items())
    assert all(not p.requires_grad for p in tiny_backbone.model.parameters())


def test_sar_and_deyo_leave_the_top_blocks_and_final_norm_out(tiny_backbone):
    sar = bound_method("sar", tiny_backbone, CLASSES, frozen_top=0.5)  # tiny model: 2 blocks -> block 1 frozen
    names = set(sar.params)
    assert "ln_pre.weight" in names and "transformer.resblocks.0.ln_1.weight" in names
    assert not any(n.startswith(("ln_post", "transformer.resblocks.1.")) for n in names)
    assert set(bound_method("deyo", tiny_backbone, CLASSES, frozen_top=0.5).params) == names
    assert "ln_post.weight" in bound_method("tent", tiny_backbone, CLASSES).params


def test_sam_perturbation_hand_computed():
    e = sam_perturbation([torch.tensor([3.0]), torch.tensor([0.0, 4.0])], rho=0.5)  # ||g|| = 5
    torch.testing.assert_close(e[0], torch.tensor([0.3]))
    torch.testing.assert_close(e[1], torch.tensor([0.0, 0.4]))


def test_sar_step_matches_direct_sharpness_aware_update(tiny_backbone):
    method = bound_method("sar", tiny_backbone, CLASSES, lr=0.02, rho=0.5, margin=0.74)
    images = random_images(16, 3)
    logits, leaves = direct(tiny_backbone, method, images)
    entropy = shannon_entropy(logits)
    reliable = entropy < 0.74 * math.log(5)
    assert 0 < int(reliable.sum()) < 16  # the filter is exercised
    grads = torch.autograd.grad(entropy[reliable].mean(), list(leaves.values()))
    ascent = {k: method.original[k] + e for k, e in zip(leaves, sam_perturbation(list(grads), 0.5))}
    logits2, leaves2 = direct(tiny_backbone, method, images, ascent)
    second = shannon_entropy(logits2)[reliable]
    second = second[second < 0.74 * math.log(5)]
    grads2 = dict(zip(leaves2, torch.autograd.grad(second.mean(), list(leaves2.values()))))
    method.predict_batch(images)
    assert method.last["reliable"] == int(reliable.sum()) and method.last["step"]
    assert method.last["ema"] == pytest.approx(second.mean().item(), rel=1e-5)
    assert_params(method, sgd_first_step(method.original, grads2, 0.02))


def test_sar_without_reliable_samples_makes_no_step(tiny_backbone):
    method = bound_method("sar", tiny_backbone, CLASSES, margin=1e-6)
    method.predict_batch(random_images(8))
    assert method.last["reliable"] == 0 and not method.last["step"] and not method.norms.changed()


def test_sar_recovery_resets_when_the_loss_ema_is_low(tiny_backbone):
    method = bound_method("sar", tiny_backbone, CLASSES, margin=10.0, recovery_threshold=100.0)
    method.predict_batch(random_images(8))
    assert method.last["recovered"] and method.recoveries == 1
    assert not method.norms.changed() and method.ema is None
    calm = bound_method("sar", tiny_backbone, CLASSES, margin=10.0, recovery_threshold=0.0)
    calm.predict_batch(random_images(8))
    assert not calm.last["recovered"] and calm.norms.changed() and calm.ema is not None


def test_patch_shuffle_permutes_whole_patches():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = patch_shuffle(images, 4, torch.Generator().manual_seed(0))
    def patches(x):
        return x.reshape(2, 3, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, -1)
    src, dst = patches(images), patches(out)
    for i in range(2):  # every output patch is one input patch of the same image, each used once
        match = (dst[i][:, None] == src[i][None]).all(-1)
        assert match.sum(1).eq(1).all() and match.sum(0).eq(1).all()
    assert not torch.equal(out, images)
    assert torch.equal(patch_shuffle(images, 1, torch.Generator()), images)
    assert patch_shuffle(torch.rand(1, 3, 10, 10), 4, torch.Generator()).shape == (1, 3, 10, 10)  # resized


def test_plpd_hand_computed():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    q = torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    torch.testing.assert_close(plpd(p, q), torch.tensor([0.5, 0.2]))


def test_deyo_loss_matches_direct_formulation(tiny_backbone):
    method = bound_method("deyo", tiny_backbone, CLASSES, entropy_threshold=0.75, plpd_threshold=-0.05)
    images = random_images(16, 5)
    logits, leaves = direct(tiny_backbone, method, images)
    entropy, probs = shannon_entropy(logits), logits.detach().softmax(-1)
    keep = entropy.detach() < 0.75 * math.log(5)
    shuffled = patch_shuffle(images[keep], 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        destroyed = direct(tiny_backbone, method, shuffled)[0].softmax(-1)
    diff = plpd(probs[keep], destroyed)
    selected = diff > -0.05
    h = entropy[keep][selected]
    weight = torch.exp(-(h.detach() - 0.4 * math.log(5))) + torch.exp(diff[selected])
    expected = (h * weight).mean()
    grads = dict(zip(leaves, torch.autograd.grad(expected, list(leaves.values()))))
    method.predict_batch(images)
    assert method.last["after_entropy"] == int(keep.sum()) and method.last["after_plpd"] == int(selected.sum())
    assert 0 < int(selected.sum()) <= int(keep.sum()) < 16
    assert method.last["loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert_params(method, sgd_first_step(method.original, grads, 0.001))


def test_deyo_plpd_filter_can_reject_everything(tiny_backbone):
    method = bound_method("deyo", tiny_backbone, CLASSES, entropy_threshold=10.0, plpd_threshold=1.0)
    method.predict_batch(random_images(8))
    assert method.last["after_entropy"] == 8 and method.last["after_plpd"] == 0 and not method.norms.changed()


def test_reset_policy_batch_forgets_between_batches(tiny_backbone):
    images = random_images(8)
    for policy, same in (("batch", True), ("continual", False), ("domain", False)):
        method = bound_method("tent", tiny_backbone, CLASSES, lr=0.5, reset=policy)
        first = method.predict_batch(images)
        assert torch.equal(method.predict_batch(images), first) is same, policy
        assert method.protocol == f"batch (reset: {policy})"
        assert method.hyperparameters()["reset"] == policy
    with pytest.raises(ValueError, match="reset"):
        bound_method("tent", tiny_backbone, CLASSES, reset="sometimes")
    from vlmtta.methods import list_methods

    batch = {m["name"] for m in list_methods() if m["protocol"] == "batch"}
    assert {"subtta", "tent", "sar", "deyo", "batclip", "clipartt", "watt"} <= batch
