"""Metrics against hand-computed values on constructed examples, and the per-sample record on disk."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlmtta.metrics import (DamagedSamples, Recorder, Samples, aurc, auroc, compute_metrics, ece, fpr_at_tpr,
                            topk_accuracy)

# 4 samples, 3 classes: correct (conf .9), wrong (.7), correct (.6), wrong (.4)
PROBS = [[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.3, 0.6, 0.1], [0.4, 0.35, 0.25]]
LABELS = [0, 0, 1, 2]


@pytest.fixture
def samples():
    return Samples.from_probabilities(torch.tensor(PROBS), LABELS, latency_ms=[1, 2, 3, 4])


def test_hand_computed_metrics(samples):
    m = compute_metrics(samples)
    assert m["top1"] == 50.0
    assert m["top5"] == 100.0  # 3 classes: the 5 best hold every class
    assert topk_accuracy(samples, 2) == 75.0  # the last sample's class is third
    assert m["ece"] == pytest.approx(100 * (0.1 + 0.7 + 0.4 + 0.4) / 4)  # every sample in a bin of its own
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.6) + math.log(0.25)) / 4, rel=1e-6)
    assert m["brier"] == pytest.approx((0.015 + 1.14 + 0.26 + 0.845) / 4, rel=1e-6)
    assert m["aurc"] == pytest.approx(100 * (0 + 1 / 2 + 1 / 3 + 2 / 4) / 4)  # risk at coverage 1/4 .. 4/4
    assert m["auroc"] == pytest.approx(75.0)  # 3 of the 4 (correct, wrong) pairs ordered right
    assert m["fpr95"] == pytest.approx(50.0)  # keeping both correct needs t = .6, which lets .7 in


def test_ece_bins_are_equal_width_and_right_closed():
    conf, correct = np.array([0.9, 0.7, 0.6, 0.4]), np.array([True, False, True, False])
    # 2 bins: (0, .5] holds .4 (wrong); (.5, 1] holds .9, .7, .6 with accuracy 2/3 and confidence .7333
    assert ece(conf, correct, n_bins=2) == pytest.approx(100 * (0.25 * 0.4 + 0.75 * abs(2 / 3 - 2.2 / 3)))
    assert ece(np.array([0.5, 0.5]), np.array([True, False]), n_bins=2) == pytest.approx(0.0)
    # .5 is the right edge of the first bin: with .55 (second bin) the two bins no longer pool
    assert ece(np.array([0.5, 0.55]), np.array([True, False]), n_bins=2) == pytest.approx(100 * (0.25 + 0.275))


def test_selective_metrics_ties_and_degenerate_cases():
    tie = np.array([0.8, 0.8])
    assert aurc(tie, np.array([True, False])) == pytest.approx(50.0)  # expected risk 1/2 at both coverages
    assert aurc(tie, np.array([False, True])) == pytest.approx(50.0)  # order inside a tie does not matter
    assert auroc(tie, np.array([True, False])) == pytest.approx(50.0)
    assert math.isnan(auroc(tie, np.array([True, True]))) and math.isnan(fpr_at_tpr(tie, np.array([True, True])))
    assert aurc(np.array([0.9, 0.1]), np.array([True, True])) == 0.0
    # 20 correct at .05 .. 1.0: 95 % of them need t = .10; wrong ones at .07 and .10 -> one of two accepted
    positives = np.arange(1, 21) / 20
    conf = np.r_[positives, 0.07, 0.10]
    correct = np.r_[np.ones(20, bool), False, False]
    assert fpr_at_tpr(conf, correct) == pytest.approx(50.0)


def test_recorder_and_npz_round_trip(tmp_path, samples):
    recorder = Recorder()
    for i, (row, label) in enumerate(zip(PROBS, LABELS)):
        recorder.add(torch.tensor(row), label, latency_ms=i + 1, index=i)
    recorded = recorder.samples()
    assert compute_metrics(recorded) == compute_metrics(samples)
    resumed = Recorder(start=Samples.from_probabilities(torch.tensor(PROBS[:2]), LABELS[:2]))
    for row, label in zip(PROBS[2:], LABELS[2:]):
        resumed.add(torch.tensor(row), label, 0.0, 0)
    assert len(resumed) == 4 and compute_metrics(resumed.samples()) == compute_metrics(samples)
    samples.save(tmp_path / "s.npz", meta={"config_key": "k"})
    loaded, meta = Samples.load(tmp_path / "s.npz")
    assert meta["config_key"] == "k" and np.array_equal(loaded.probs, samples.probs)
    assert compute_metrics(loaded) == compute_metrics(samples)


def test_large_class_sets_keep_top_k_only(tmp_path):
    probs = torch.softmax(torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = probs.argsort(dim=1, descending=True)[:, 3].tolist()  # the 4th best: top-5 hit, top-1 miss
    record = Samples.from_probabilities(probs, labels)
    assert record.probs is None and record.topk_index.shape == (6, 5)
    m = compute_metrics(record)
    assert m["top1"] == 0.0 and m["top5"] == 100.0
    expected_brier = float(((probs - torch.eye(1000)[labels]) ** 2).sum(1).mean())
    assert m["brier"] == pytest.approx(expected_brier, rel=1e-5)
    assert m["nll"] == pytest.approx(float(-probs[range(6), labels].log().mean()), rel=1e-5)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "out_of_range", "bad_label", "empty"])
def test_damaged_per_sample_files_are_refused(tmp_path, samples, damage):
    path = tmp_path / "s.npz"
    samples.save(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        bad = Samples(**{**samples.__dict__})
        if damage == "out_of_range":
            bad.topk_prob = bad.topk_prob * 3
        else:
            bad.labels = bad.labels + 7
        bad.save(path)
    with pytest.raises(DamagedSamples):
        Samples.load(path)
