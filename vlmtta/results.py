"""Result files of ``vlmtta bench`` (and the testbed suite) and the method x dataset tables built from them.

One JSON per (dataset, method, model, pretrained, seed[, tag]) holding the metrics and the full protocol, and
beside it an ``.npz`` of per-sample outputs (``vlmtta.metrics.Samples``) from which every metric can be
recomputed.  Both are written atomically (temporary file + ``os.replace``).

Integrity: the JSON stores a SHA-256 ``checksum`` of its own content and the SHA-256 of its per-sample file.
``load_results`` recomputes the checksum; a result that was edited by hand or damaged is not trusted: its
metrics are recomputed from the per-sample file when that file is intact, otherwise it is skipped, with a
warning either way.  Files that are not results (``[]``, ``{}``, malformed JSON) are skipped with a warning.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
import warnings
from pathlib import Path
from statistics import mean
from typing import Any, Callable, Iterable

from .data.catalog import CROSS_DOMAIN, IMAGENET_VARIANTS, OOD
from .features import write_json
from .metrics import METRICS, DamagedSamples, Samples, compute_metrics

RESULT_FORMAT = 2  # 2: metrics, per-sample file and checksum; 1 (accuracy and counts only) is still read
TABLE_FORMATS = ("md", "csv")
TABLE_METRICS = (*METRICS, "latency", "memory")
METRIC_TITLES = {"top1": "top-1 %", "top5": "top-5 %", "ece": "ECE %, 20 bins", "nll": "NLL", "brier": "Brier",
                 "aurc": "AURC %", "auroc": "AUROC % of misclassification detection", "fpr95": "FPR % at 95 % TPR",
                 "latency": "ms per sample", "memory": "peak memory MB"}
SHORT = {"caltech101": "Caltech", "dtd": "DTD", "eurosat": "EuroSAT", "fgvc_aircraft": "Aircraft", "food101": "Food",
         "oxford_flowers": "Flowers", "oxford_pets": "Pets", "stanford_cars": "Cars", "sun397": "SUN", "ucf101": "UCF",
         "imagenet": "ImageNet", "imagenet_a": "-A", "imagenet_v2": "-V2", "imagenet_r": "-R", "imagenet_sketch": "-Sketch"}
Warn = Callable[[str], None]


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "none"


def result_name(dataset: str, method: str, model: str, pretrained: str | None, seed: int, tag: str = "") -> str:
    """File name of one result: ``<dataset>__<method>[+tag]__<model>__<pretrained>__seed<k>.json``."""
    label = method + (f"+{tag}" if tag else "")
    return "__".join(map(_slug, (dataset, label, Path(model).name, Path(str(pretrained)).name))) + f"__seed{seed}.json"


def samples_path(result_path: str | Path) -> Path:
    """The per-sample file beside a result JSON."""
    return Path(result_path).with_suffix(".npz")


def _json_safe(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def result_checksum(result: dict[str, Any]) -> str:
    """SHA-256 of the result's content (without ``checksum`` and the in-memory ``_`` keys)."""
    content = {k: v for k, v in result.items() if k != "checksum" and not k.startswith("_")}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def apply_samples(result: dict[str, Any], samples: Samples) -> dict[str, Any]:
    """``result`` with its accuracy, counts and metrics computed from ``samples``."""
    metrics = {k: _json_safe(v) for k, v in compute_metrics(samples).items()}
    correct = int(samples.correct.sum())
    return {**result, "accuracy": metrics["top1"], "correct": correct, "n": len(samples), "metrics": metrics}


def save_result(path: str | Path, result: dict[str, Any], samples: Samples | None = None) -> dict[str, Any]:
    """Write ``result`` (and ``samples`` beside it) atomically; returns what was written.

    With ``samples``, the accuracy, counts and ``metrics`` are computed from them, so the JSON and the
    per-sample file always agree.
    """
    result = {k: v for k, v in result.items() if not k.startswith("_") and k != "checksum"}
    if samples is not None:
        npz = samples_path(path)
        samples.save(npz, meta={"result": Path(path).name})
        result = apply_samples(result, samples)
        result["per_sample"] = {"file": npz.name, "sha256": file_sha256(npz), "n_classes": samples.n_classes,
                                "full_rows": samples.probs is not None}
    result = {"format": RESULT_FORMAT, **result}
    result["checksum"] = result_checksum(result)
    write_json(path, result)
    return result


def load_samples(result: dict[str, Any], warn: Warn | None = None) -> Samples | None:
    """The intact per-sample record of a loaded result, or ``None`` (absent, damaged or edited: warned)."""
    info, source = result.get("per_sample"), result.get("_source")
    if not isinstance(info, dict) or not source:
        return None
    path = Path(source).parent / str(info.get("file", ""))
    if not path.is_file():
        return None
    warn = warn or _default_warn
    if file_sha256(path) != info.get("sha256"):
        warn(f"{path}: per-sample file does not match its result (edited or damaged); not used.")
        return None
    try:
        return Samples.load(path)[0]
    except DamagedSamples as error:
        warn(str(error) + "; not used.")
        return None


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def read_result(path: str | Path, warn: Warn | None = None) -> dict[str, Any] | None:
    """The trusted content of one result JSON, or ``None`` (with a warning) when it cannot be trusted."""
    warn, path = warn or _default_warn, Path(path)
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        warn(f"skipping {path}: not valid JSON ({type(error).__name__})")
        return None
    if not isinstance(data, dict) or data.get("format") not in (1, RESULT_FORMAT) or "accuracy" not in data:
        warn(f"skipping {path}: not a vlmtta result")
        return None
    data["_source"] = str(path)
    if data["format"] == RESULT_FORMAT and data.get("checksum") != result_checksum(data):
        samples = load_samples(data, warn)
        if samples is None:
            warn(f"skipping {path}: its content does not match its checksum (edited by hand or damaged) and no "
                 "intact per-sample file is there to recompute it from")
            return None
        warn(f"{path}: content does not match its checksum (edited by hand or damaged); using the metrics "
             "recomputed from its per-sample file")
        return apply_samples(data, samples)
    return _check_counts(data, path, warn)


def _check_counts(data: dict[str, Any], path: Path, warn: Warn) -> dict[str, Any] | None:
    """Accuracy recomputed from the stored counts (results without a checksum)."""
    correct, n = data.get("correct"), data.get("n")
    if not isinstance(correct, int) or not isinstance(n, int) or not 0 <= correct <= n or n == 0:
        if data["format"] == 1:
            warn(f"skipping {path}: no valid counts to check its accuracy against")
            return None
        return data
    accuracy = 100.0 * correct / n
    if not math.isclose(float(data["accuracy"]), accuracy, abs_tol=1e-6):
        warn(f"{path}: accuracy {data['accuracy']} does not match its counts ({correct}/{n}); using {accuracy:.2f}")
        data = {**data, "accuracy": accuracy, "metrics": {**data.get("metrics", {}), "top1": accuracy}}
    return data


def load_results(folder: str | Path, warn: Warn | None = None) -> list[dict[str, Any]]:
    """Every trusted result JSON under ``folder``; others are skipped with a warning (see ``read_result``)."""
    found = []
    for path in sorted(Path(folder).expanduser().rglob("*.json")):
        if ".partial" in path.parts:
            continue
        result = read_result(path, warn)
        if result is not None:
            found.append(result)
    return found


def time_per_sample_ms(result: dict[str, Any]) -> float | None:
    """Mean time per sample: the method's step plus, for runs on shared view features, encoding the views."""
    timing = result.get("timing") or {}
    if "latency_ms_mean" not in timing:
        return None
    encode = timing.get("encode_ms_per_image", (result.get("protocol") or {}).get("encode_ms_per_image", 0.0))
    return float(timing["latency_ms_mean"]) + float(encode or 0.0)


def metric_value(result: dict[str, Any], metric: str) -> float | None:
    """One metric of a result (None when the result does not hold it)."""
    if metric not in TABLE_METRICS:
        raise ValueError(f"Unknown metric {metric!r}; accepted: {', '.join(TABLE_METRICS)}.")
    if metric == "latency":
        return time_per_sample_ms(result)
    if metric == "memory":
        return (result.get("memory") or {}).get("peak_mb")
    value = (result.get("metrics") or {}).get(metric)
    if value is None and metric == "top1":
        value = result.get("accuracy")
    return None if value is None else float(value)


def _row_label(result: dict, varying: set[str]) -> str:
    label = result["method"] + (f"+{result['tag']}" if result.get("tag") else "")
    extra = [f"{k}={result.get(k)}" for k in ("model", "pretrained", "seed") if k in varying]
    return label + (f" ({', '.join(extra)})" if extra else "")


def _rows(results: list[dict], metric: str) -> dict[str, dict[str, float]]:
    """row label -> dataset -> metric value."""
    varying = {k for k in ("model", "pretrained", "seed") if len({str(r.get(k)) for r in results}) > 1}
    rows: dict[str, dict[str, float]] = {}
    for result in results:
        value = metric_value(result, metric)
        if value is not None:
            rows.setdefault(_row_label(result, varying), {})[result["dataset"]] = value
    return rows


def _fmt(value: float, metric: str) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.3f}" if metric in ("nll", "brier") else f"{value:.1f}" if metric == "memory" else f"{value:.2f}"


def _average(values: dict[str, float], keys: Iterable[str], metric: str) -> str:
    keys = list(keys)
    if not keys or any(k not in values for k in keys):
        return ""
    return _fmt(mean(values[k] for k in keys), metric)


def testbed_group(result: dict[str, Any]) -> tuple | None:
    """The settings that make one testbed table (None for results of other benchmarks)."""
    if result.get("suite") != "testbed":
        return None
    s = result.get("suite_settings") or {}
    return s.get("severity"), s.get("n_per_corruption"), s.get("order")


def _families(results: list[dict]) -> list[tuple[str, list[dict], tuple[str, ...], list[tuple[str, tuple]]]]:
    """(title, results, column keys, averages) of each table."""
    from .testbed.corruptions import CORRUPTIONS

    plain = [r for r in results if testbed_group(r) is None]
    present = {r["dataset"] for r in plain}
    other = tuple(sorted(present - set(CROSS_DOMAIN) - set(IMAGENET_VARIANTS)))
    families = [("Cross-domain", plain, CROSS_DOMAIN, [("Average", CROSS_DOMAIN)]),
                ("ImageNet and its variants", plain, IMAGENET_VARIANTS,
                 [("Average", IMAGENET_VARIANTS), ("OOD avg", OOD)]),
                ("Other", plain, other, [])]
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if testbed_group(r) is not None:
            groups.setdefault(testbed_group(r), []).append(r)
    for (severity, n, order), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        names = {r["dataset"] for r in members}
        keys = tuple(c for c in ("clean", *CORRUPTIONS) if c in names) + tuple(sorted(names - {"clean", *CORRUPTIONS}))
        families.append((f"Testbed, Fashion-MNIST, severity {severity}, {n} images per corruption, {order} order",
                         members, keys, [("mean", keys)]))
    return families


def build_tables(results: list[dict[str, Any]], metric: str = "top1") -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for the cross-domain, ImageNet-variant, testbed and other tables in ``results``.

    Averages are given only when a method has every dataset of the average (cross-domain: all 10;
    ImageNet: all 5; OOD: A, V2, R and Sketch; testbed: every corruption of its table).
    """
    if metric not in TABLE_METRICS:
        raise ValueError(f"Unknown metric {metric!r}; accepted: {', '.join(TABLE_METRICS)}.")
    tables = []
    for title, members, keys, averages in _families(results):
        rows = _rows(members, metric)
        present = {r["dataset"] for r in members}
        columns = [k for k in keys if k in present]
        if not columns:
            continue
        header = ["method"] + [SHORT.get(k, k) for k in columns] + [name for name, _ in averages]
        body = []
        for label, values in rows.items():
            if any(k in values for k in columns):
                cells = [_fmt(values[k], metric) if k in values else "" for k in columns]
                body.append([label, *cells, *(_average(values, keys, metric) for _, keys in averages)])
        if body:
            tables.append((f"{title} ({METRIC_TITLES[metric]})", header, body))
    return tables


def format_tables(results: list[dict[str, Any]], fmt: str = "md", metric: str = "top1") -> str:
    """The tables of ``build_tables`` as Markdown or CSV (CSV: one block per table, led by a title row)."""
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"Unknown table format {fmt!r}; accepted: {', '.join(TABLE_FORMATS)}.")
    tables = build_tables(results, metric)
    if not tables:
        return "No results.\n"
    out = io.StringIO()
    for title, header, body in tables:
        if fmt == "csv":
            writer = csv.writer(out, lineterminator="\n")
            writer.writerows([[f"# {title}"], header, *body, []])
            continue
        out.write(f"### {title}\n\n| {' | '.join(header)} |\n|{'|'.join('---' for _ in header)}|\n")
        out.writelines(f"| {' | '.join(row)} |\n" for row in body)
        out.write("\n")
    return out.getvalue()
