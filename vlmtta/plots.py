"""Figures from result files: accuracy against time (Pareto), reliability diagrams, gain heatmaps, streams.

Each figure has a data-preparation function (pure, tested) and a drawing function (matplotlib, the ``plot``
extra, imported only when drawing):

* ``pareto_points`` / ``plot_pareto``: one point per method, its mean metric over the datasets every method
  has, against its mean time per sample (``results.time_per_sample_ms``), log-x; the Pareto front joined;
* ``reliability_bins`` / ``plot_reliability``: accuracy against confidence in the ECE's 20 equal-width bins,
  one panel per method, samples pooled over its datasets (needs the per-sample files);
* ``gain_matrix`` / ``plot_heatmap``: method x dataset gain of a metric over a baseline (zero-shot);
* ``running_accuracy`` / ``stream_curves`` / ``plot_stream``: accuracy so far along each stream of the online
  methods (and the baseline), in stream order (needs the per-sample files).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .metrics import ECE_BINS, Samples, bin_index, ece
from .results import METRIC_TITLES, SHORT, load_samples, metric_value, time_per_sample_ms

KINDS = ("pareto", "reliability", "heatmap", "stream")
Warn = Callable[[str], None]


def _label(result: dict[str, Any]) -> str:
    return result["method"] + (f"+{result['tag']}" if result.get("tag") else "")


def _by_method(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(_label(result), []).append(result)
    return groups


def pareto_points(results: list[dict[str, Any]], metric: str = "top1") -> list[tuple[str, float, float]]:
    """(method, mean ms per sample, mean ``metric``) over the datasets that every method has, best first."""
    groups = _by_method(results)
    common = set.intersection(*({r["dataset"] for r in rs} for rs in groups.values())) if groups else set()
    if not common:
        raise ValueError("No dataset is shared by every method; select results of one benchmark.")
    points = []
    for label, members in groups.items():
        chosen = [r for r in members if r["dataset"] in common]
        times = [time_per_sample_ms(r) for r in chosen]
        values = [metric_value(r, metric) for r in chosen]
        if None in times or None in values:
            continue
        points.append((label, float(np.mean(times)), float(np.mean(values))))
    return sorted(points, key=lambda p: -p[2])


def pareto_front(points: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    """The points no other point beats on both time (lower) and the metric (higher), fastest first."""
    front, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p[1], -p[2])):
        if point[2] > best:
            front.append(point)
            best = point[2]
    return front


def _coincident(points: list[tuple[str, float, float]]) -> dict[tuple[float, float], list[str]]:
    """Labels of points drawn at (almost) the same place, joined so they do not overprint."""
    groups: dict[tuple[float, float], list[str]] = {}
    for name, ms, value in points:
        spot = next((k for k in groups if abs(math.log(k[0] / ms)) < 0.03 and abs(k[1] - value) < 0.15), (ms, value))
        groups.setdefault(spot, []).append(name)
    return groups


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: ``count``, mean ``confidence`` and ``accuracy`` (NaN in empty bins), bin ``edges``."""
    bins = bin_index(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(bins, weights=correct.astype(float), minlength=n_bins) / count
    return {"edges": np.linspace(0, 1, n_bins + 1), "count": count, "confidence": conf, "accuracy": acc}


def gain_matrix(results: list[dict[str, Any]], baseline: str = "zeroshot",
                metric: str = "top1") -> tuple[list[str], list[str], np.ndarray]:
    """(methods, datasets, gain [M, D]) of ``metric`` over ``baseline`` on each dataset (NaN where missing)."""
    groups = _by_method(results)
    if baseline not in groups:
        raise ValueError(f"No results of the baseline {baseline!r}; pass --baseline METHOD (have: "
                         f"{', '.join(groups)}).")
    reference = {r["dataset"]: metric_value(r, metric) for r in groups[baseline]}
    datasets = [d for d in _dataset_order(results) if reference.get(d) is not None]
    methods = [m for m in groups if m != baseline]
    gain = np.full((len(methods), len(datasets)), np.nan)
    for i, method in enumerate(methods):
        for result in groups[method]:
            value = metric_value(result, metric)
            if result["dataset"] in datasets and value is not None:
                gain[i, datasets.index(result["dataset"])] = value - reference[result["dataset"]]
    return methods, datasets, gain


def _dataset_order(results: list[dict[str, Any]]) -> list[str]:
    from .data.catalog import CROSS_DOMAIN, IMAGENET_VARIANTS
    from .testbed.corruptions import CORRUPTIONS

    known = [*CROSS_DOMAIN, *IMAGENET_VARIANTS, "clean", *CORRUPTIONS]
    present = {r["dataset"] for r in results}
    return [d for d in known if d in present] + sorted(present - set(known))


def running_accuracy(correct: np.ndarray) -> np.ndarray:
    """Accuracy (%) of the first k samples, k = 1..N."""
    return 100.0 * np.cumsum(correct) / np.arange(1, len(correct) + 1)


def _online(result: dict[str, Any]) -> bool:
    return (result.get("protocol") or {}).get("protocol") == "online"


def stream_curves(results: list[dict[str, Any]], baseline: str = "zeroshot",
                  warn: Warn | None = None) -> dict[str, dict[str, np.ndarray]]:
    """dataset -> method -> running accuracy, for the online methods and ``baseline`` (per-sample files needed)."""
    curves: dict[str, dict[str, np.ndarray]] = {}
    for result in results:
        if not (_online(result) or _label(result) == baseline):
            continue
        samples = load_samples(result, warn)
        if samples is not None:
            curves.setdefault(result["dataset"], {})[_label(result)] = running_accuracy(samples.correct)
    return {d: c for d, c in curves.items() if any(m != baseline for m in c)}


def pooled_samples(results: list[dict[str, Any]], warn: Warn | None = None) -> dict[str, Samples]:
    """method -> its per-sample records pooled over datasets (results without an intact file are left out)."""
    pooled = {}
    for label, members in _by_method(results).items():
        parts = [s for s in (load_samples(r, warn) for r in members) if s is not None]
        if parts:
            pooled[label] = Samples.concat(parts) if len(parts) > 1 else parts[0]
    return pooled


# ---- drawing ----------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("Plots need matplotlib: pip install 'vlmtta[plot]'.") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    from .cache import atomic_write

    out = Path(out)
    fmt = out.suffix.lstrip(".") or "png"
    atomic_write(out, lambda handle: fig.savefig(handle, format=fmt, dpi=150, bbox_inches="tight"))
    fig.clf()
    return out


def plot_pareto(results: list[dict[str, Any]], out: str | Path, metric: str = "top1", baseline: str = "zeroshot",
                title: str | None = None) -> Path:
    """Mean ``metric`` against mean time per sample, one labelled point per method, log-x."""
    plt = _pyplot()
    points = pareto_points(results, metric)
    front = pareto_front(points)
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.plot([p[1] for p in front], [p[2] for p in front], color="tab:blue", alpha=0.35, lw=1, zorder=1,
            label="Pareto front")
    for name, ms, value in points:
        is_base = name == baseline
        ax.scatter(ms, value, s=60 if is_base else 40, marker="s" if is_base else "o", zorder=3,
                   color="black" if is_base else ("tab:blue" if (name, ms, value) in front else "tab:gray"))
    for (ms, value), names in _coincident(points).items():
        ax.annotate(", ".join(names), (ms, value), textcoords="offset points", xytext=(6, 4), fontsize=8)
    base = [p for p in points if p[0] == baseline]
    if base:
        ax.axhline(base[0][2], color="black", ls="--", lw=0.8, zorder=0, label=f"{baseline}")
    times = [p[1] for p in points]
    ax.set_xscale("log")
    ax.set_xlim(min(times) / 1.6, max(times) * 2.2)  # room for the labels right of the points
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("time per sample (ms, log scale; encoding the views included)")
    ax.set_ylabel(f"mean {METRIC_TITLES[metric]}")
    ax.set_title(title or f"{METRIC_TITLES[metric]} against time per sample", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)


def plot_reliability(results: list[dict[str, Any]], out: str | Path, warn: Warn | None = None) -> Path:
    """One reliability diagram per method (20 bins), with its ECE and the share of samples per bin."""
    plt = _pyplot()
    pooled = pooled_samples(results, warn)
    if not pooled:
        raise ValueError("Reliability diagrams need per-sample files; none of these results has an intact one.")
    cols = min(4, len(pooled))
    rows = math.ceil(len(pooled) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, samples) in zip(axes.flat, pooled.items()):
        bins = reliability_bins(samples.confidence, samples.correct)
        left, width = bins["edges"][:-1], np.diff(bins["edges"])
        filled = bins["count"] > 0
        ax.bar(left[filled], bins["accuracy"][filled], width=width[filled], align="edge", color="tab:blue",
               edgecolor="white", lw=0.5, label="accuracy in the bin")
        ax.scatter(bins["confidence"][filled], bins["confidence"][filled], s=10, color="tab:red", zorder=3,
                   label="mean confidence in the bin")
        ax.plot([0, 1], [0, 1], color="black", ls="--", lw=0.8)
        ax.set_title(f"{name}: ECE {ece(samples.confidence, samples.correct):.1f} %, n={len(samples)}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(pooled):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="upper left")
    fig.supxlabel("confidence (max probability)", fontsize=9)
    fig.supylabel("accuracy", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_heatmap(results: list[dict[str, Any]], out: str | Path, baseline: str = "zeroshot",
                 metric: str = "top1") -> Path:
    """Method x dataset gain of ``metric`` over ``baseline``, annotated, diverging colours centred on 0."""
    plt = _pyplot()
    methods, datasets, gain = gain_matrix(results, baseline, metric)
    if not methods or not datasets:
        raise ValueError("Nothing to compare with the baseline.")
    limit = float(np.nanmax(np.abs(gain))) if np.isfinite(gain).any() else 1.0
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 + 0.75 * len(datasets)), max(2.5, 1.2 + 0.42 * len(methods))))
    image = ax.imshow(gain, cmap="RdBu" if metric not in ("ece", "nll", "brier", "aurc", "fpr95") else "RdBu_r",
                      vmin=-limit, vmax=limit, aspect="auto")
    for (i, j), value in np.ndenumerate(gain):
        if np.isfinite(value):
            ax.text(j, i, f"{value:+.1f}" if metric not in ("nll", "brier") else f"{value:+.3f}", ha="center",
                    va="center", fontsize=7, color="white" if abs(value) > 0.6 * limit else "black")
    ax.set_xticks(range(len(datasets)), [SHORT.get(d, d) for d in datasets], rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label(f"{METRIC_TITLES[metric]} minus {baseline}",
                                                                 fontsize=8)
    ax.set_title(f"gain over {baseline} ({METRIC_TITLES[metric]})", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def plot_stream(results: list[dict[str, Any]], out: str | Path, baseline: str = "zeroshot",
                warn: Warn | None = None) -> Path:
    """Running accuracy along each stream of the online methods, the baseline dashed, one panel per dataset."""
    plt = _pyplot()
    curves = stream_curves(results, baseline, warn)
    if not curves:
        raise ValueError("Stream plots need online methods with per-sample files; none found.")
    datasets = [d for d in _dataset_order(results) if d in curves]
    cols = min(3, len(datasets))
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.1 * rows), squeeze=False)
    colours = {}
    for ax, dataset in zip(axes.flat, datasets):
        for method, curve in curves[dataset].items():
            style = {"color": "black", "ls": "--"} if method == baseline else {
                "color": colours.setdefault(method, f"C{len(colours) % 10}")}
            ax.plot(np.arange(1, len(curve) + 1), curve, lw=1.1, label=method, **style)
        ax.set_title(SHORT.get(dataset, dataset), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat[:len(datasets)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    for ax in axes[-1]:
        ax.set_xlabel("images seen", fontsize=8)
    fig.supylabel("accuracy so far (%)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=min(6, len(labels)))
    return _save(fig, out)


def plot(results: list[dict[str, Any]], kind: str, out: str | Path, baseline: str = "zeroshot",
         metric: str = "top1", warn: Warn | None = None) -> Path:
    """Draw one figure of ``kind`` (see ``KINDS``) to ``out``."""
    if not results:
        raise ValueError("No results to plot.")
    if kind == "pareto":
        return plot_pareto(results, out, metric, baseline)
    if kind == "reliability":
        return plot_reliability(results, out, warn)
    if kind == "heatmap":
        return plot_heatmap(results, out, baseline, metric)
    if kind == "stream":
        return plot_stream(results, out, baseline, warn)
    raise ValueError(f"Unknown plot kind {kind!r}; accepted: {', '.join(KINDS)}.")
