"""Tsallis / ADTE entropies and the pluggable confidence criterion (vlmtta.entropy additions)."""
from __future__ import annotations

import math

import pytest
import torch

from vlmtta.entropy import (adte_entropy, check_confidence, confidence_scores, select_confident, shannon_entropy,
                            tsallis_entropy)

P = torch.tensor([0.5, 0.25, 0.25])


def test_tsallis_hand_values():
    logits = P.log()
    assert tsallis_entropy(logits, 2.0).item() == pytest.approx(1 - (0.25 + 2 * 0.0625))  # 1 - sum p^2
    assert tsallis_entropy(logits, 0.5).item() == pytest.approx(2 * (math.sqrt(0.5) + 2 * 0.5 - 1), rel=1e-6)
    uniform = torch.zeros(5)
    for q in (0.1, 0.7, 3.0):  # maximum (1 - C^(1-q)) / (q - 1) at the uniform distribution
        assert tsallis_entropy(uniform, q).item() == pytest.approx((1 - 5 ** (1 - q)) / (q - 1), rel=1e-5)


@pytest.mark.parametrize("q", [1.0, 1 - 1e-6, 1 + 1e-6, 1 - 1e-4, 1 + 5e-4, 0.999, 1.001])
def test_tsallis_tends_to_shannon(q):
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.allclose(tsallis_entropy(logits, q), shannon_entropy(logits), atol=5 * abs(q - 1) * 10 + 1e-6)

    # no float32 cancellation: matches a float64 evaluation of (1 - sum p^q) / (q - 1) for q near 1
    for q in (1.001, 0.99, 1.05):
        p = logits.double().softmax(-1)
        assert torch.allclose(tsallis_entropy(logits, q).double(), (1 - (p ** q).sum(-1)) / (q - 1), atol=1e-5)


def test_tsallis_is_finite_for_extreme_logits():
    logits = torch.tensor([[300.0, -300.0, 0.0], [0.0, 0.0, 0.0]])
    for q in (0.01, 0.5, 0.9999, 1.0, 2.0):
        assert torch.isfinite(tsallis_entropy(logits, q)).all()
    # p = (1, e^-600, e^-300): p^0.01 = (1, e^-6, e^-3), so H = (e^-3 + e^-6) / 0.99, not 0
    assert tsallis_entropy(logits, 0.01)[0].item() == pytest.approx((math.exp(-3) + math.exp(-6)) / 0.99, rel=1e-5)
    assert tsallis_entropy(logits, 2.0)[0].item() == pytest.approx(0.0, abs=1e-6)


def test_per_class_q_generalises_scalar_q():
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(tsallis_entropy(logits, torch.full((6,), 0.3)), tsallis_entropy(logits, 0.3), atol=1e-6)
    q = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.99, 0.9999])
    p = logits.softmax(-1)
    expected = ((p - p ** q) / (q - 1)).sum(-1)  # the class-separable definition, term by term
    assert torch.allclose(tsallis_entropy(logits, q), expected, atol=1e-4)


def test_adte_code_form_differs_by_sum_p_over_one_minus_q():
    logits = torch.randn(8, 6, generator=torch.Generator().manual_seed(2))
    q = torch.linspace(0.01, 0.9, 6)
    p = logits.softmax(-1)
    assert torch.allclose(adte_entropy(logits, q, "code"), (p ** q / (1 - q)).sum(-1), atol=1e-5)
    assert torch.allclose(adte_entropy(logits, q, "code") - adte_entropy(logits, q), (p / (1 - q)).sum(-1), atol=1e-5)
    constant = torch.full((6,), 0.4)  # then the two forms differ by a constant and rank views alike
    assert torch.equal(adte_entropy(logits, constant, "code").argsort(), adte_entropy(logits, constant).argsort())
    with pytest.raises(ValueError, match="ADTE entropy form"):
        adte_entropy(logits, q, "paper")


def test_confidence_scores_dispatch_and_selection():
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0], [0.0, 9.0]])
    assert torch.equal(confidence_scores(logits), shannon_entropy(logits))
    assert torch.allclose(confidence_scores(logits, "tsallis", 0.1), tsallis_entropy(logits, 0.1))
    assert torch.allclose(confidence_scores(logits, "adte", torch.tensor([0.1, 0.9])),
                          tsallis_entropy(logits, torch.tensor([0.1, 0.9])))
    assert select_confident(logits, 0.5, confidence_scores(logits, "tsallis", 0.1)).tolist() == [3, 1]
    # q > 1 weighs the dominant class more: a flatter but peaked row can outrank a 2-way split
    rows = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]).log()
    assert shannon_entropy(rows).argmin() == 0 and tsallis_entropy(rows, 3.0).argmin() == 1
    with pytest.raises(ValueError, match="Unknown confidence criterion"):
        confidence_scores(logits, "renyi")
    with pytest.raises(ValueError, match="one q per class"):
        confidence_scores(logits, "adte", torch.ones(3))
    with pytest.raises(ValueError, match="scalar q"):
        confidence_scores(logits, "tsallis", torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        check_confidence("tsallis", 0.0)
    with pytest.raises(ValueError, match="accepted here"):
        check_confidence("adte", 1.0)


def tsallis_reference(logits: torch.Tensor, q, dim: int = -1) -> torch.Tensor:
    """tsallis_entropy as first written (a tensor of ones for every masked value)."""
    log_p = logits.log_softmax(dim=dim)
    q = torch.as_tensor(q, dtype=log_p.dtype)
    p, d = log_p.exp(), q - 1
    z = d * log_p
    near = z.abs() < 1
    z_near = torch.where(near, z, torch.ones_like(z))
    phi = torch.where(z_near == 0, torch.ones_like(z),
                      torch.expm1(z_near) / torch.where(z_near == 0, torch.ones_like(z), z_near))
    far = (p - torch.exp(q * log_p)) / torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(near, -p * log_p * phi, far).sum(dim=dim)


@pytest.mark.parametrize("shape", [(64, 1000), (1, 1000), (7, 13)])
def test_tsallis_equals_the_first_formulation_bit_for_bit(shape):
    g = torch.Generator().manual_seed(1)
    logits = 5 * torch.randn(shape, generator=g)
    logits[0, 0] = 100.0  # p = 1 exactly: z = 0
    per_class = 0.01 + 0.89 * torch.rand(shape[1], generator=g)
    per_class[0] = 1.0  # d = 0 for one class
    for q in (0.1, 1.0, 0.999, 2.5, per_class):
        assert torch.equal(tsallis_entropy(logits, q), tsallis_reference(logits, q))
        differentiable = logits.clone().requires_grad_()  # the out-of-place path: same values, a gradient
        value = tsallis_entropy(differentiable, q)
        value.sum().backward()
        assert torch.equal(value.detach(), tsallis_reference(logits, q)) and differentiable.grad is not None
