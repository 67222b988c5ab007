"""Zero: confident-view selection, one-hot votes and the tie rule, on hand-built features."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlmtta.methods.zero  # noqa: F401  (registers zero)
from vlmtta.api import Adapter
from vlmtta.entropy import shannon_entropy
from vlmtta.methods import create_method
from vlmtta.methods.zero import break_tie

CLASSES = ["a", "b", "c"]
TEXT = torch.eye(3)  # logits = 10 * normalised view features


def zero(features: list[list[float]], **options) -> torch.Tensor:
    adapter = Adapter.from_features(CLASSES, TEXT, "zero", logit_scale=10.0, **options)
    return adapter.adapt_features(F.normalize(torch.tensor(features), dim=-1))


# views 0 and 1 are confident votes for a and b; views 2 and 3 are discarded (ratio 0.5) and
# break the tie: view 3 (b) is more confident than view 2 (a), but view 2 comes first by index.
TIE = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.95, 0.9], [0.2, 1.0, 0.7]]


def test_tie_construction_is_as_intended():
    entropy = shannon_entropy(10 * F.normalize(torch.tensor(TIE), dim=-1))
    assert entropy.argsort().tolist() == [0, 1, 3, 2]


def test_tie_broken_by_most_confident_discarded_view():
    assert zero(TIE, n_views=4, ratio=0.5).tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_no_index_order_tie_option():
    """The official code also visits the discarded views in confidence order: there is no other rule to offer."""
    with pytest.raises(ValueError, match="Unknown option\\(s\\) tie_break for method 'zero'"):
        create_method("zero", tie_break="code")


def test_majority_vote_of_confident_views_ignores_confidence_mass():
    method = create_method("zero", n_views=6, ratio=0.5)
    method.bind(Adapter.from_features(CLASSES, TEXT).method.context)
    method.logits = lambda features: features  # feed logits directly
    kept = torch.tensor([[0.999, 0.0005, 0.0005], [0.40, 0.15, 0.45], [0.40, 0.15, 0.45]]).log()
    discarded = torch.full((3, 3), 1 / 3).log() + torch.tensor([[0.0, 0.01, 0.0], [0.01, 0.0, 0.0], [0.0, 0.0, 0.01]])
    logits = torch.cat([kept, discarded])
    assert shannon_entropy(logits).argsort()[:3].sort().values.tolist() == [0, 1, 2]
    assert method.predict_features(logits).tolist() == pytest.approx([1 / 3, 0.0, 2 / 3])  # two votes for c
    assert kept.softmax(-1).mean(0).argmax() == 0  # averaging probabilities would pick a


def test_break_tie_falls_back_to_highest_tied_logit():
    tied = torch.tensor([True, True, False])
    assert break_tie(tied, torch.tensor([[0.0, 0.5, 3.0], [0.0, 0.0, 9.0]])) == 1  # no view predicts a or b
    assert break_tie(tied, torch.tensor([[0.0, 0.5, 3.0], [2.0, 0.0, 1.0]])) == 0


def test_tsallis_confidence_option_and_validation():
    views = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(zero(views, n_views=16, confidence="tsallis", q=1.0), zero(views, n_views=16))
    assert create_method("zero").hyperparameters() == {"n_views": 64, "augmentation": "rrc_flip", "ratio": 0.3,
                                                       "confidence": "shannon", "q": 1.0}
    with pytest.raises(ValueError, match="confidence criterion"):
        create_method("zero", confidence="adte")
