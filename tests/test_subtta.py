"""SubTTA: subspace geometry on hand-computed matrices, losses, gradients only on norm parameters,
bit-exact reset, the shared backbone left untouched."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import bound_method, random_images

import vlmtta.methods.subtta as st

CLASSES = ["cat", "dog", "car", "tree", "boat"]


def bind(backbone, **options) -> st.SubTTA:
    return bound_method("subtta", backbone, CLASSES, **options)


batch = random_images


def test_chordal_distance_hand_computed():
    theta = 0.3
    a = torch.tensor([[1.0, 0.0, 0.0]])
    b = torch.tensor([[math.cos(theta), math.sin(theta), 0.0]])
    torch.testing.assert_close(st.chordal_distance_sq(a, b), torch.tensor(math.sin(theta) ** 2))
    plane = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    other = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])  # shares one direction
    torch.testing.assert_close(st.chordal_distance_sq(plane, other), torch.tensor(1.0))
    torch.testing.assert_close(st.chordal_distance_sq(plane, plane.flip(0)), torch.tensor(0.0))


def test_projection_hand_computed():
    basis = torch.tensor([[1.0, 1.0, 0.0]]) / math.sqrt(2)
    torch.testing.assert_close(st.project(torch.tensor([[2.0, 0.0, 5.0]]), basis), torch.tensor([[1.0, 1.0, 0.0]]))
    plane = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    torch.testing.assert_close(st.project(torch.tensor([[3.0, -2.0, 7.0]]), plane), torch.tensor([[3.0, -2.0, 0.0]]))


def test_text_subspace_drops_first_principal_direction():
    # centred rows span e0 (spread 3) and e1 (spread 1): the first PC is e0, the kept one e1
    text = torch.tensor([[3.0, 1.0, 0.0, 5.0], [-3.0, 1.0, 0.0, 5.0], [0.0, -2.0, 0.0, 5.0]])
    basis, cov = st.text_subspace(text, max_rank=256)
    assert basis.shape == (2, 4)  # r = min(C - 1, 256) = 2; the last row is the null direction
    assert abs(float(basis[0, 1])) == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(cov, torch.cov(text.t(), correction=1) * 2 / (2 + 1e-6))
    kept, _ = st.text_subspace(text, max_rank=1, remove_first_pc=False)
    assert abs(float(kept[0, 0])) == pytest.approx(1.0, abs=1e-6)


def test_covariance_and_losses_hand_computed():
    f = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]])
    torch.testing.assert_close(st.covariance(f, ridge=0.0), torch.tensor([[4.0, 0.0], [0.0, 16.0]]) / (3 + 1e-6))
    labels = torch.tensor([0, 0, 1, 1])  # class means (1, 0), (1, 4); batch mean (1, 2)
    torch.testing.assert_close(st.mint_loss(f, labels), torch.tensor(1.0 - 5.0))
    assert not st.mint_loss(f, torch.zeros(4, dtype=torch.long)).requires_grad
    torch.testing.assert_close(st.batclip_loss(f, labels), torch.tensor(1 / math.sqrt(17)))


def test_gradients_reach_only_norm_parameters(tiny_backbone):
    method = bind(tiny_backbone, n_views=4)
    names = set(method.params)
    assert names and all(n.endswith(("weight", "bias")) for n in names)
    assert {"ln_pre.weight", "ln_post.bias", "transformer.resblocks.0.ln_1.weight"} <= names
    features = method.encode(batch(6), grad=True)
    loss = st.chordal_distance_sq(method.text_basis, method.visual_subspace(features))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in method.params.values())
    assert any(p.grad.abs().sum() > 0 for p in method.params.values())
    model = tiny_backbone.model
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


def test_adaptation_changes_norms_reset_is_bit_exact_and_backbone_untouched(tiny_backbone):
    model = tiny_backbone.model
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    method = bind(tiny_backbone, n_views=4)
    first = method.predict_batch(batch(8))
    assert first.shape == (8, 5) and torch.allclose(first.sum(-1), torch.ones(8))
    method.predict_batch(batch(8, 1))
    assert method.last["align_step"] and method.running_cov is not None
    assert any(not torch.equal(method.params[k], method.original[k]) for k in method.params)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert all(not p.requires_grad for p in model.parameters())
    method.reset()
    assert all(torch.equal(method.params[k], method.original[k]) for k in method.params)
    assert method.running_cov is None and not method.optimizer.state
    torch.testing.assert_close(method.predict_batch(batch(8)), first)  # same state, same answer


def test_streaming_mode_and_source_loss(tiny_backbone):
    method = bind(tiny_backbone, n_views=4, loss="source")
    probs = method.predict_views(batch(4))
    assert probs.shape == (5,) and "tta_loss" not in method.last and "align_step" in method.last
    assert method.view_config(tiny_backbone).n_views == 4


def test_options():
    assert st.SubTTA.info()["protocol"] == "batch"
    assert st.SubTTA.defaults()["loss"] == "mint" and st.SubTTA.defaults()["lr"] == 5e-4
    with pytest.raises(ValueError, match="loss"):
        st.SubTTA(loss="foo")
    with pytest.raises(ValueError, match="cov_momentum"):
        st.SubTTA(cov_momentum=1.0)
