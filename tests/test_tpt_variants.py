"""O-TPT and R-TPT: TPT's prompt learner with their own loss / prediction, each against a direct formulation."""
from __future__ import annotations

import pytest
import torch

from conftest import bound_method, random_images, run_episodes
from vlmtta.methods import create_method, get_method_class
from vlmtta.methods.otpt import orthogonality_penalty
from vlmtta.methods.rtpt import reliability_weights

CLASSES = ["cat", "dog", "golden retriever", "car", "airliner", "tabby cat"]


def householder_penalty(text: torch.Tensor) -> torch.Tensor:
    """The official O-TPT construction, step by step: reflect each Gram row onto its axis, subtract I, average."""
    gram = text @ text.t()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    rows = []
    for c in range(gram.shape[0]):
        u = gram[:, c] - eye[:, c] * torch.linalg.norm(gram[:, c])
        v = u / torch.linalg.norm(u)
        reflected = (eye - 2 * torch.outer(v, v)) @ gram[c]
        rows.append(torch.linalg.norm(reflected - eye[c]))
    return torch.stack(rows).mean()


def pairwise_penalty(text: torch.Tensor) -> torch.Tensor:
    """The paper's form as restated by SoC, written out: sum over ordered class pairs i != j of cos^2(t_i, t_j)."""
    return sum((text[i] @ text[j]) ** 2 for i in range(len(text)) for j in range(len(text)) if i != j)


def test_orthogonality_penalty_is_the_paper_form_by_default():
    text = torch.nn.functional.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1).requires_grad_(True)
    ours, direct = orthogonality_penalty(text), pairwise_penalty(text)
    torch.testing.assert_close(ours, direct)
    torch.testing.assert_close(torch.autograd.grad(ours, text)[0], torch.autograd.grad(direct, text)[0])
    unnormalised = 2 * text.detach()  # the form is ||G - I||_F^2 over all entries: the diagonal counts too
    gram = unnormalised @ unnormalised.t()
    assert float(orthogonality_penalty(unnormalised)) == pytest.approx(float(((gram - torch.eye(7)) ** 2).sum()))
    assert float(orthogonality_penalty(torch.eye(4))) == 0.0


def test_orthogonality_penalty_is_the_official_construction():
    text = torch.nn.functional.normalize(torch.randn(7, 16, dtype=torch.float64), dim=-1).requires_grad_(True)
    ours, theirs = orthogonality_penalty(text, "code"), householder_penalty(text)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, text)[0], torch.autograd.grad(theirs, text)[0])
    gram = text.detach() @ text.detach().t()
    assert float(orthogonality_penalty(text.detach(), "frobenius")) == pytest.approx(float(((gram - torch.eye(7)) ** 2).sum().sqrt()))
    assert float(orthogonality_penalty(torch.eye(4), "code")) == 0.0 == float(orthogonality_penalty(torch.eye(4), "frobenius"))


@pytest.mark.parametrize("name,options", [("otpt", {}), ("otpt", {"orthogonality": "code", "steps": 2}),
                                          ("otpt", {"orthogonality": "frobenius"}),
                                          ("rtpt", {}), ("rtpt", {"steps": 2, "neighbours": 3})])
def test_fast_path_equals_the_straightforward_formulation(tiny_backbone, name, options):
    images = [random_images(8, 0), random_images(8, 1)]
    fast = run_episodes(bound_method(name, tiny_backbone, CLASSES, n_views=8, **options), images)
    reference = run_episodes(bound_method(name, tiny_backbone, CLASSES, n_views=8, reference_impl=True, **options), images)
    for (p_fast, ctx_fast), (p_ref, ctx_ref) in zip(fast, reference):
        torch.testing.assert_close(ctx_fast, ctx_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p_fast, p_ref, atol=1e-5, rtol=1e-4)


def test_otpt_loss_and_its_effect(tiny_backbone):
    method = bound_method("otpt", tiny_backbone, CLASSES, n_views=16)
    logits, text = torch.randn(6, len(CLASSES)), torch.nn.functional.normalize(torch.randn(len(CLASSES), 32), dim=-1)
    mean = logits.softmax(-1).mean(0)
    expected = -(mean * mean.log()).sum() + 18.0 * pairwise_penalty(text)
    torch.testing.assert_close(method.loss(logits, text), expected)
    code = bound_method("otpt", tiny_backbone, CLASSES, n_views=16, orthogonality="code", otpt_lambda=2.0)
    torch.testing.assert_close(code.loss(logits, text), -(mean * mean.log()).sum() + 2.0 * householder_penalty(text))
    penalty = {}
    for lam in (0.0, 1000.0):
        tuned = bound_method("otpt", tiny_backbone, CLASSES, n_views=16, otpt_lambda=lam, lr=0.05)
        tuned.predict_views(random_images(16, 0))
        with torch.no_grad():
            penalty[lam] = float(orthogonality_penalty(tuned.learner()))
    assert penalty[1000.0] < penalty[0.0]


def brute_force_weights(features: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    scores = []
    for i in range(len(features)):
        others = sorted((float(features[i] @ features[j]) for j in range(len(features)) if j != i), reverse=True)
        scores.append(sum(others[:k]) / k)
    return torch.tensor(scores).div(temperature).softmax(0)


def test_rtpt_loss_weights_and_prediction(tiny_backbone):
    method = bound_method("rtpt", tiny_backbone, CLASSES, n_views=16, neighbours=4)
    logits = torch.randn(5, len(CLASSES))
    probs = logits.softmax(-1)
    torch.testing.assert_close(method.loss(logits, None), -(probs * probs.log()).sum(-1).mean())
    features = tiny_backbone.encode_images(random_images(16, 2))
    torch.testing.assert_close(reliability_weights(features, 4, 0.01), brute_force_weights(features, 4, 0.01))
    assert float(reliability_weights(features, 20, 0.01).sum()) == pytest.approx(1.0)  # k capped at N - 1
    prediction = method.predict_views(random_images(16, 2))
    with torch.no_grad():
        tuned_logits = method.context.logit_scale * features @ method.learner().t()
    expected = (brute_force_weights(features, 4, 0.01) @ tuned_logits).softmax(-1)
    torch.testing.assert_close(prediction, expected, atol=1e-5, rtol=1e-4)


def test_paper_settings():
    otpt, rtpt = get_method_class("otpt"), get_method_class("rtpt")
    assert otpt.defaults()["otpt_lambda"] == 18.0 and otpt.defaults()["augmentation"] == "augmix"
    assert otpt.defaults()["orthogonality"] == "paper"
    assert otpt.options_for("imagenet_r") == {"otpt_lambda": 2.0} and otpt.options_for("dtd") == {"otpt_lambda": 18.0}
    assert otpt.options_for("imagenet") == {"otpt_lambda": 18.0, "augmentation": "rrc_flip"}  # its fine-grained script
    assert (rtpt.defaults()["neighbours"], rtpt.defaults()["temperature"], rtpt.defaults()["lr"]) == (20, 0.01, 5e-3)
    assert rtpt.options_for("dtd") == {"augmentation": "augmix"} and rtpt.options_for("imagenet_a") == {}
    with pytest.raises(ValueError, match="orthogonality"):
        create_method("otpt", orthogonality="cosine")
    with pytest.raises(ValueError, match="neighbours"):
        create_method("rtpt", neighbours=0)
