"""TE and ADTE: Tsallis view selection, the online label-bias memory, warm-up, label adjustment, modes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlmtta.methods.adte  # noqa: F401  (registers te, adte)
from vlmtta.api import Adapter
from vlmtta.entropy import adte_entropy, shannon_entropy, tsallis_entropy
from vlmtta.methods import create_method
from vlmtta.methods.adte import BiasMemory, class_q, estimate_log_bias, stationary

C, D = 6, 16


def make(method="adte", seed=0, **options):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    return Adapter.from_features([f"c{i}" for i in range(C)], text, method, logit_scale=10.0, **options), g


def views_near(adapter, cls, g, n=20):
    text = adapter.method.context.text_features
    return F.normalize(text[cls] + 0.4 * torch.randn(n, D, generator=g), dim=-1)


def test_te_keeps_lowest_tsallis_views_and_averages_probabilities():
    adapter, g = make("te", n_views=20)
    views = views_near(adapter, 2, g)
    logits = 10 * views @ adapter.method.context.text_features.t()
    expected = logits[tsallis_entropy(logits, 0.1).argsort()[:2]].softmax(-1).mean(0)
    assert torch.allclose(adapter.adapt_features(views), expected, atol=1e-6)
    shannon, _ = make("te", n_views=20, q=1.0)  # q = 1: the paper's SE baseline
    assert torch.allclose(shannon.adapt_features(views), logits[shannon_entropy(logits).argsort()[:2]].softmax(-1).mean(0))


def test_class_q_min_max_hand_values():
    assert class_q(torch.tensor([-3.0, -1.0, -2.0])).tolist() == pytest.approx([0.01, 0.9, 0.455])
    assert class_q(torch.tensor([-1.0, -1.0]), (0.2, 0.5)).tolist() == pytest.approx([0.2, 0.2])


def test_memory_margin_rule_and_replacement():
    memory = BiasMemory(3, size=2, margin=1.0)
    assert not memory.add(torch.tensor([2.0, 1.0, 0.0]))  # margin exactly 1: rejected online ...
    assert memory.add(torch.tensor([2.0, 1.0, 0.0]), strict=False)  # ... accepted by the pre-pass rule (>= 1)
    assert memory.add(torch.tensor([5.0, 1.0, 0.0])) and memory.count == 2
    assert memory.add(torch.tensor([3.5, 1.0, 0.0])) and memory.count == 2  # full: replaces the smallest margin (1)
    assert sorted(memory.gaps[0].tolist()) == [2.5, 4.0] and (memory.gaps[1:] < 0).all()
    stored = torch.stack([torch.tensor([5.0, 1.0, 0.0]), torch.tensor([3.5, 1.0, 0.0])]).softmax(-1)
    P = memory.transition()
    assert torch.allclose(P[:, 0], stored.mean(0)) and (P[:, 1:] == 0).all()  # columns: mean softmax per pseudo-class


def test_stationary_vector_of_a_two_state_chain():
    P = torch.tensor([[0.9, 0.2], [0.1, 0.8]])  # column-stochastic; stationary (2/3, 1/3)
    pi = stationary(P, tol=1e-9, max_iter=10_000)
    assert (pi / pi.sum()).tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-6)
    capped = stationary(P, max_iter=1)  # the iteration cap binds: one step from uniform
    assert torch.allclose(capped, F.normalize(P @ torch.full((2,), 0.5), dim=0))


def test_warmup_uses_shannon_then_adaptive_q_and_label_adjustment():
    adapter, g = make(warmup=3, n_views=20, label_adjust=True)
    method = adapter.method
    text = method.context.text_features
    for cls in (0, 1):
        views = views_near(adapter, cls, g)
        logits = 10 * views @ text.t()
        expected = logits[shannon_entropy(logits).argsort()[:2]].softmax(-1).mean(0)
        assert torch.allclose(adapter.adapt_features(views), expected, atol=1e-6)  # warming up
    views = views_near(adapter, 4, g)
    logits = 10 * views @ text.t()
    probs = adapter.adapt_features(views)  # its entry is the 3rd: debiasing starts with this image, as in the code
    assert method.memory.count == 3
    log_pi = method.memory.log_stationary()
    scores = adte_entropy(logits, class_q(log_pi), "code")  # the default form: the official code's
    expected = (logits[scores.argsort()[:2]] - log_pi).softmax(-1).mean(0)
    assert torch.allclose(probs, expected, atol=1e-6)
    method.reset()
    assert method.memory.count == 0 and method.protocol == "online"


def test_label_adjustment_and_tsallis_form_options():
    plain, g = make(warmup=0, label_adjust=False, entropy_form="tsallis", n_views=20)
    views = views_near(plain, 1, g)
    logits = 10 * views @ plain.method.context.text_features.t()
    probs = plain.adapt_features(views)  # the memory has this image's entry already
    scores = adte_entropy(logits, class_q(plain.method.memory.log_stationary()), "tsallis")
    assert torch.allclose(probs, logits[scores.argsort()[:2]].softmax(-1).mean(0), atol=1e-6)


def test_transductive_mode_is_explicit():
    adapter, g = make(bias="transductive", n_views=20)
    assert adapter.protocol()["hyperparameters"]["bias"] == "transductive"
    views = views_near(adapter, 3, g)
    with pytest.raises(ValueError, match="load_bias"):
        adapter.adapt_features(views)
    stream = torch.stack([10 * views_near(adapter, c % C, g).mean(0) @ adapter.method.context.text_features.t()
                          for c in range(30)])
    log_pi = estimate_log_bias(stream)
    adapter.method.load_bias(log_pi)
    first = adapter.adapt_features(views)
    adapter.reset()  # the loaded bias is an input, not stream state: it survives reset
    assert torch.equal(adapter.adapt_features(views), first)
    online, _ = make()
    with pytest.raises(ValueError, match="transductive"):
        online.method.load_bias(log_pi)


def test_validation_and_defaults():
    defaults = create_method("adte").hyperparameters()
    assert defaults["ratio"] == 0.1 and defaults["warmup"] == 100 and defaults["q_range"] == (0.01, 0.9)
    assert defaults["bias"] == "online" and create_method("adte").episodic is False and create_method("te").episodic
    assert defaults["entropy_form"] == "code" and defaults["label_adjust"] is False and defaults["warmup_fill"] == 0.2
    with pytest.raises(ValueError, match="entropy_form"):
        create_method("adte", entropy_form="paper")
    with pytest.raises(ValueError, match="q_range"):
        create_method("adte", q_range=(0.5, 1.2))


def test_warmup_ends_for_few_classes():
    """5 classes x memory 10 = 50 slots: the code's 100 entries can never be stored; 20 % of the slots can."""
    g = torch.Generator().manual_seed(3)
    text = F.normalize(torch.randn(5, D, generator=g), dim=-1)
    adapter = Adapter.from_features([f"c{i}" for i in range(5)], text, "adte", logit_scale=10.0, n_views=20)
    method = adapter.method
    assert method.warmup_entries() == 10  # min(100, ceil(0.2 * 5 * 10))
    while method.memory.count < 10:
        assert method.log_bias() is None  # still warming up: Shannon ranking
        cls = method.memory.count % 5
        views = F.normalize(text[cls] + 0.1 * torch.randn(20, D, generator=g), dim=-1)
        adapter.adapt_features(views)
    log_pi = method.log_bias()
    assert log_pi is not None
    for _ in range(100):  # an image the two rankings disagree on, whose entry would not change the memory
        views = F.normalize(text[2] + 0.6 * torch.randn(20, D, generator=g), dim=-1)
        logits = 10 * views @ text.t()
        top = logits.mean(0).topk(2).values
        adaptive = adte_entropy(logits, class_q(log_pi), "code").argsort()[:2]
        if top[0] - top[1] <= 1 and set(adaptive.tolist()) != set(shannon_entropy(logits).argsort()[:2].tolist()):
            break
    else:
        pytest.fail("no image tells the rankings apart")
    probs = adapter.adapt_features(views)
    assert torch.allclose(probs, logits[adaptive].softmax(-1).mean(0), atol=1e-6)  # the debiased ranking, unadjusted
    big = Adapter.from_features([f"c{i}" for i in range(1000)], F.normalize(torch.randn(1000, D), dim=-1), "adte")
    assert big.method.warmup_entries() == 100  # the code's count wherever it is reachable


def test_single_view_without_adjustment_is_zero_shot():
    adapter, g = make(n_views=1, warmup=0)
    text = adapter.method.context.text_features
    for cls in range(C):
        view = views_near(adapter, cls, g, n=1)
        assert torch.allclose(adapter.adapt_features(view), (10 * view @ text.t()).softmax(-1)[0], atol=1e-6)
    assert adapter.method.memory.count > 0  # the stream still feeds the memory


def test_te_single_view_is_its_softmax_exactly():
    adapter, g = make("te", n_views=1)
    view = views_near(adapter, 1, g, n=1)
    logits = 10 * view @ adapter.method.context.text_features.t()
    assert torch.equal(adapter.adapt_features(view), logits[tsallis_entropy(logits, 0.1).argsort()[:1]].softmax(-1).mean(0))
    everything, _ = make("te", n_views=8, ratio=1.0)  # every view kept: the mean over a permutation of the rows
    views = views_near(everything, 1, g, n=8)
    assert torch.allclose(everything.adapt_features(views), (10 * views @ everything.method.context.text_features.t())
                          .softmax(-1).mean(0), atol=1e-7)


def add_reference(memory: BiasMemory, mean_logits: torch.Tensor, strict: bool = True) -> bool:
    """BiasMemory.add as first written: every decision read from the tensors."""
    top = mean_logits.float().topk(2).values
    gap = float(top[0] - top[1])
    if gap < memory.margin or (strict and gap == memory.margin):
        return False
    label = int(mean_logits.argmax())
    slot = int(memory.gaps[label].argmin())
    new = mean_logits.float().softmax(dim=-1)
    memory.count += int(memory.gaps[label, slot] < 0)
    memory.column_sums[label] += new - memory.probs[label, slot]
    memory.probs[label, slot], memory.gaps[label, slot] = new, gap
    return True


@pytest.mark.parametrize("strict", [True, False])
def test_memory_updates_equal_the_tensor_formulation(strict):
    g = torch.Generator().manual_seed(3)
    rows = 3 * torch.randn(400, C, generator=g)
    rows[::7, 1] = rows[::7, 0] + 1.0  # some margins exactly 1 (or ties for the top when another class wins)
    rows[::11, 2] = rows[::11].max(dim=1).values
    fast, slow = BiasMemory(C, 4, 1.0), BiasMemory(C, 4, 1.0)
    for row in rows:
        assert fast.add(row, strict) == add_reference(slow, row, strict)
        assert fast.count == slow.count
    assert fast.count == C * 4  # filled, and replaced since (210 / 221 of the 400 rows are stored)
    for name in ("probs", "gaps", "column_sums"):
        assert torch.equal(getattr(fast, name), getattr(slow, name))
    assert torch.equal(fast.log_stationary(), slow.log_stationary())
