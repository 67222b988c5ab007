"""Figures: the data each plot draws (not pixels), and that the files are written."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmtta.metrics import Samples
from vlmtta.plots import (gain_matrix, pareto_front, pareto_points, plot, pooled_samples, reliability_bins,
                          running_accuracy, stream_curves)
from vlmtta.results import load_results, save_result


def _samples(correct: list[bool], confidence: float = 0.8, latency: float = 2.0) -> Samples:
    """Two classes; class 0 is always the truth; wrong samples predict class 1."""
    probs = torch.tensor([[confidence, 1 - confidence] if ok else [1 - confidence, confidence] for ok in correct])
    return Samples.from_probabilities(probs, [0] * len(correct), [latency] * len(correct))


# method -> (protocol, latency ms, {dataset: correct flags})
RUNS = {"zeroshot": ("episodic", 1.0, {"a": [1, 0, 0, 1], "b": [1, 1, 0, 0]}),
        "slow": ("episodic", 50.0, {"a": [1, 1, 1, 1], "b": [1, 1, 1, 0]}),
        "online": ("online", 2.0, {"a": [0, 0, 1, 1], "b": [0, 1, 1, 1]})}


@pytest.fixture
def folder(tmp_path):
    for method, (protocol, latency, per_dataset) in RUNS.items():
        for dataset, flags in per_dataset.items():
            result = {"dataset": dataset, "method": method, "model": "m", "pretrained": "p", "seed": 0,
                      "timing": {"latency_ms_mean": latency}, "protocol": {"protocol": protocol}}
            save_result(tmp_path / f"{dataset}__{method}.json", result, _samples([bool(f) for f in flags]))
    return tmp_path


def test_pareto_points_and_front(folder):
    points = {name: (ms, acc) for name, ms, acc in pareto_points(load_results(folder))}
    assert points == {"zeroshot": (1.0, 50.0), "slow": (50.0, 87.5), "online": (2.0, 62.5)}
    front = pareto_front(pareto_points(load_results(folder)))
    assert [p[0] for p in front] == ["zeroshot", "online", "slow"]
    dominated = [("a", 1.0, 60.0), ("b", 2.0, 50.0), ("c", 3.0, 70.0)]
    assert [p[0] for p in pareto_front(dominated)] == ["a", "c"]


def test_gain_matrix(folder):
    methods, datasets, gain = gain_matrix(load_results(folder))
    assert datasets == ["a", "b"] and set(methods) == {"slow", "online"}
    row = dict(zip(methods, gain.tolist()))
    assert row["slow"] == [50.0, 25.0] and row["online"] == [0.0, 25.0]
    with pytest.raises(ValueError, match="baseline"):
        gain_matrix(load_results(folder), baseline="nope")


def test_reliability_bins_and_running_accuracy():
    conf = np.array([0.55, 0.58, 0.95, 0.97, 0.99])
    correct = np.array([True, False, True, True, False])
    bins = reliability_bins(conf, correct, n_bins=2)
    assert bins["count"].tolist() == [0, 5]
    assert bins["accuracy"][1] == pytest.approx(0.6) and bins["confidence"][1] == pytest.approx(conf.mean())
    assert np.isnan(bins["accuracy"][0])
    # 20 bins of .05, closed on the right: .55 in (.50, .55], .58 in (.55, .60], .95 in (.90, .95]
    assert reliability_bins(conf, correct)["count"][[10, 11, 18, 19]].tolist() == [1, 1, 1, 2]
    assert running_accuracy(np.array([1, 0, 1, 1])).tolist() == [100.0, 50.0, pytest.approx(200 / 3), 75.0]


def test_stream_curves_follow_stream_order(folder):
    curves = stream_curves(load_results(folder))
    assert set(curves) == {"a", "b"} and set(curves["a"]) == {"online", "zeroshot"}
    assert curves["a"]["online"].tolist() == [0.0, 0.0, pytest.approx(100 / 3), 50.0]
    pooled = pooled_samples(load_results(folder))
    assert len(pooled["slow"]) == 8 and pooled["slow"].correct.sum() == 7


@pytest.mark.parametrize("kind", ["pareto", "reliability", "heatmap", "stream"])
def test_every_kind_writes_an_image(folder, tmp_path, kind):
    pytest.importorskip("matplotlib")
    out = plot(load_results(folder), kind, tmp_path / f"{kind}.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
