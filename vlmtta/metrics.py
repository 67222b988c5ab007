"""Metrics of a classification stream, and the compact per-sample record they are computed from.

A :class:`Samples` record holds, for every test sample in stream order, what any metric below needs:

* ``labels`` [N] int64: the true class (read by metrics only; never given to a method);
* ``topk_index`` [N, K] int32 and ``topk_prob`` [N, K] float32: the K = min(5, C) most probable classes,
  best first, ties to the lower class index as ``argmax`` (top-1, top-5, the max-probability confidence);
* ``p_label`` [N] float32: the probability of the true class (NLL, Brier);
* ``sq_sum`` [N] float32: the sum over classes of p² (Brier);
* ``probs`` [N, C] float32: the full probability row, stored only when C <= ``FULL_ROW_MAX_CLASSES``;
* ``latency_ms`` [N] float32: the time each sample took; ``stream_index`` [N] int64: which test sample it was.

It is saved as an ``.npz`` next to each result JSON (``Samples.save`` / ``Samples.load``), so any metric can
be recomputed later without re-running (``compute_metrics(Samples.load(path))``).

Metrics (rates in %):

* ``top1``, ``top5``: accuracy of the best and of the 5 best classes (top-5 = 100 when C <= 5);
* ``ece``: expected calibration error of the max probability with **20 equal-width bins** over [0, 1], bin b
  holding confidences in (b/20, (b+1)/20] (as TTAB): sum over bins of |B|/N * |accuracy(B) - confidence(B)|;
* ``nll``: mean of -log p(true class), p clamped at 1e-12;
* ``brier``: multi-class Brier score, mean over samples of sum_c (p_c - [c = y])², in [0, 2];
* selective prediction / misclassification detection from the max probability (``confidence``):
  ``aurc``: area under the risk-coverage curve, mean over k = 1..N of the error rate of the k most confident
  samples (Geifman et al.); tied confidences count as their expected value over the orders of the tie;
  ``auroc``: probability that a correct prediction is more confident than a wrong one (ties count 1/2);
  ``fpr95``: share of wrong predictions accepted at the threshold that accepts 95 % of the correct ones
  (the highest threshold t with #correct(conf >= t) >= 0.95 * #correct).
  The three are NaN when every prediction is right (or every one wrong) except AURC.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .cache import atomic_write

TOP_K = 5
FULL_ROW_MAX_CLASSES = 100
ECE_BINS = 20
SAMPLES_FORMAT = 1
METRICS = ("top1", "top5", "ece", "nll", "brier", "aurc", "auroc", "fpr95")


class DamagedSamples(ValueError):
    """A per-sample file that is unreadable or inconsistent."""


@dataclass
class Samples:
    """Per-sample outputs of one stream (see the module docstring for every field)."""

    labels: np.ndarray
    topk_index: np.ndarray
    topk_prob: np.ndarray
    p_label: np.ndarray
    sq_sum: np.ndarray
    latency_ms: np.ndarray
    stream_index: np.ndarray
    n_classes: int
    probs: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def prediction(self) -> np.ndarray:
        return self.topk_index[:, 0]

    @property
    def confidence(self) -> np.ndarray:
        return self.topk_prob[:, 0].astype(np.float64)

    @property
    def correct(self) -> np.ndarray:
        return self.prediction == self.labels

    @classmethod
    def from_probabilities(cls, probs: torch.Tensor | np.ndarray, labels: Sequence[int],
                           latency_ms: Sequence[float] | None = None,
                           stream_index: Sequence[int] | None = None) -> "Samples":
        """A record from the probability rows [N, C] of a stream and its labels."""
        probs = torch.as_tensor(np.asarray(probs, dtype=np.float32))
        if probs.ndim != 2 or len(probs) != len(labels):
            raise ValueError(f"probabilities must be [N, C] with one row per label, got {tuple(probs.shape)} for "
                             f"{len(labels)} labels.")
        n, n_classes = probs.shape
        labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
        values, indices = probs.sort(dim=1, descending=True, stable=True)  # ties: lower index first, as argmax
        values, indices = values[:, :TOP_K], indices[:, :TOP_K]
        return cls(labels=labels_t.numpy(), topk_index=indices.int().numpy(), topk_prob=values.numpy(),
                   p_label=probs.gather(1, labels_t[:, None])[:, 0].numpy(), sq_sum=probs.square().sum(1).numpy(),
                   latency_ms=np.asarray(latency_ms if latency_ms is not None else np.zeros(n), dtype=np.float32),
                   stream_index=np.asarray(stream_index if stream_index is not None else np.arange(n), dtype=np.int64),
                   n_classes=int(n_classes), probs=probs.numpy() if n_classes <= FULL_ROW_MAX_CLASSES else None)

    @classmethod
    def concat(cls, parts: Sequence["Samples"]) -> "Samples":
        arrays = {f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)
                  if f.name not in ("n_classes", "probs")}
        full = [p.probs for p in parts]
        return cls(**arrays, n_classes=parts[0].n_classes,
                   probs=np.concatenate(full) if all(f is not None for f in full) else None)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> None:
        """Write an ``.npz`` atomically; ``meta`` (JSON-serialisable) is stored alongside."""
        arrays = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("n_classes", "probs")}
        if self.probs is not None:
            arrays["probs"] = self.probs
        header = {"format": SAMPLES_FORMAT, "n_classes": self.n_classes, **(meta or {})}
        buffer = io.BytesIO()
        np.savez(buffer, meta=np.array(json.dumps(header, default=str)), **arrays)
        atomic_write(path, lambda handle: handle.write(buffer.getvalue()))

    @classmethod
    def load(cls, path: str | Path) -> tuple["Samples", dict[str, Any]]:
        """The record in ``path`` and its meta; ``DamagedSamples`` when it is unreadable or inconsistent."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {name: data[name] for name in data.files if name != "meta"}
            samples = cls(**arrays, n_classes=int(meta["n_classes"]))
        except Exception as error:  # noqa: BLE001 - zip, zlib, JSON, shape and key errors all mean damage
            raise DamagedSamples(f"{path}: unreadable per-sample file ({type(error).__name__}: {error})") from None
        samples.validate(path)
        return samples, meta

    def validate(self, where: Any = "samples") -> None:
        """Refuse records whose arrays disagree in length or hold impossible values."""
        n, c = len(self.labels), self.n_classes
        k = min(TOP_K, c)
        checks = [
            (self.topk_index.shape == (n, k) and self.topk_prob.shape == (n, k), "top-k arrays of the wrong shape"),
            (all(len(a) == n for a in (self.p_label, self.sq_sum, self.latency_ms, self.stream_index)),
             "arrays of different lengths"),
            (self.probs is None or self.probs.shape == (n, c), "probability rows of the wrong shape"),
            (n == 0 or (self.labels.min() >= 0 and self.labels.max() < c and self.topk_index.min() >= 0
                        and self.topk_index.max() < c), "class indices out of range"),
        ]
        for name in ("topk_prob", "p_label", "sq_sum", "probs"):
            values = getattr(self, name)
            if values is not None:
                checks.append((bool(np.isfinite(values).all()) and bool(((values >= 0) & (values <= 1 + 1e-4)).all()),
                               f"{name} outside [0, 1] or not finite"))
        for ok, why in checks:
            if not ok:
                raise DamagedSamples(f"{where}: damaged per-sample file ({why})")


class Recorder:
    """Collects one probability row per sample as a stream runs; ``samples()`` gives the record."""

    def __init__(self, start: Samples | None = None):
        self._done = start
        self._rows: list[torch.Tensor] = []
        self._labels: list[int] = []
        self._latency: list[float] = []
        self._index: list[int] = []

    def add(self, probs: torch.Tensor, label: int, latency_ms: float, index: int) -> None:
        self._rows.append(probs.detach().float().cpu().reshape(-1))
        self._labels.append(int(label))
        self._latency.append(float(latency_ms))
        self._index.append(int(index))

    def __len__(self) -> int:
        return len(self._labels) + (len(self._done) if self._done is not None else 0)

    def samples(self) -> Samples:
        parts = [self._done] if self._done is not None else []
        if self._rows:
            parts.append(Samples.from_probabilities(torch.stack(self._rows), self._labels, self._latency, self._index))
        if not parts:
            raise ValueError("No samples recorded.")
        return parts[0] if len(parts) == 1 else Samples.concat(parts)


def topk_accuracy(samples: Samples, k: int) -> float:
    """% of samples whose true class is among the ``k`` most probable (k <= 5)."""
    if k > samples.topk_index.shape[1] and k < samples.n_classes:
        raise ValueError(f"top-{k} needs the {k} best classes; the record keeps {samples.topk_index.shape[1]}.")
    return 100.0 * float((samples.topk_index[:, :k] == samples.labels[:, None]).any(1).mean())


def ece(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error (%) with ``n_bins`` equal-width bins (b/n, (b+1)/n]."""
    bins = bin_index(confidence, n_bins)
    total = 0.0
    for b in np.unique(bins):
        member = bins == b
        total += member.sum() * abs(float(correct[member].mean()) - float(confidence[member].mean()))
    return 100.0 * total / len(confidence)


def bin_index(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """The equal-width bin (b/n, (b+1)/n] of each confidence (0 falls in the first bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def nll(samples: Samples) -> float:
    return float(-np.log(np.maximum(samples.p_label.astype(np.float64), 1e-12)).mean())


def brier(samples: Samples) -> float:
    return float((samples.sq_sum.astype(np.float64) - 2 * samples.p_label + 1).mean())


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Area under the risk-coverage curve (%): mean risk of the k most confident samples, k = 1..N."""
    order = np.argsort(-confidence, kind="stable")
    conf, wrong = confidence[order], (~correct[order]).astype(np.float64)
    n = len(conf)
    # within a run of tied confidences, errors are spread evenly (their expectation over the tie's orders)
    starts = np.flatnonzero(np.r_[True, conf[1:] != conf[:-1]])
    sizes = np.diff(np.r_[starts, n])
    group_errors = np.add.reduceat(wrong, starts)
    expected = np.repeat(group_errors / sizes, sizes)
    risk = np.cumsum(expected) / np.arange(1, n + 1)
    return 100.0 * float(risk.mean())


def auroc(confidence: np.ndarray, correct: np.ndarray) -> float:
    """P(confidence of a correct prediction > that of a wrong one), ties 1/2, in %; NaN without both kinds."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(correct.sum()), int((~correct).sum())
    if not n_pos or not n_neg:
        return math.nan
    ranks = rankdata(confidence)
    return 100.0 * float((ranks[correct].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fpr_at_tpr(confidence: np.ndarray, correct: np.ndarray, tpr: float = 0.95) -> float:
    """% of wrong predictions with confidence >= the threshold that keeps ``tpr`` of the correct ones."""
    positives, negatives = confidence[correct], confidence[~correct]
    if not len(positives) or not len(negatives):
        return math.nan
    threshold = np.sort(positives)[::-1][math.ceil(tpr * len(positives) - 1e-9) - 1]
    return 100.0 * float((negatives >= threshold).mean())


def compute_metrics(samples: Samples) -> dict[str, float]:
    """Every metric of ``METRICS`` for one record (see the module docstring)."""
    if not len(samples):
        raise ValueError("No samples to score.")
    conf, correct = samples.confidence, samples.correct
    return {"top1": 100.0 * float(correct.mean()), "top5": topk_accuracy(samples, TOP_K), "ece": ece(conf, correct),
            "nll": nll(samples), "brier": brier(samples), "aurc": aurc(conf, correct), "auroc": auroc(conf, correct),
            "fpr95": fpr_at_tpr(conf, correct)}
