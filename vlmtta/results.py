"""Result files of ``vlmtta bench`` and the method x dataset tables built from them.

One JSON per (dataset, method, model, pretrained, seed[, tag]) holding the accuracy and the full
protocol; written atomically (temporary file + ``os.replace``), so a result file is never half written.
"""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from statistics import mean
from typing import Any, Iterable

from .data.catalog import CROSS_DOMAIN, IMAGENET_VARIANTS, OOD
from .features import read_json, write_json

RESULT_FORMAT = 1
TABLE_FORMATS = ("md", "csv")
SHORT = {"caltech101": "Caltech", "dtd": "DTD", "eurosat": "EuroSAT", "fgvc_aircraft": "Aircraft", "food101": "Food",
         "oxford_flowers": "Flowers", "oxford_pets": "Pets", "stanford_cars": "Cars", "sun397": "SUN", "ucf101": "UCF",
         "imagenet": "ImageNet", "imagenet_a": "-A", "imagenet_v2": "-V2", "imagenet_r": "-R", "imagenet_sketch": "-Sketch"}


def _slug(text: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "none"


def result_name(dataset: str, method: str, model: str, pretrained: str | None, seed: int, tag: str = "") -> str:
    """File name of one result: ``<dataset>__<method>[+tag]__<model>__<pretrained>__seed<k>.json``."""
    label = method + (f"+{tag}" if tag else "")
    return "__".join(map(_slug, (dataset, label, Path(model).name, Path(str(pretrained)).name))) + f"__seed{seed}.json"


def save_result(path: str | Path, result: dict[str, Any]) -> None:
    write_json(path, {"format": RESULT_FORMAT, **result})


def load_results(folder: str | Path) -> list[dict[str, Any]]:
    """Every finished result JSON under ``folder`` (checkpoints and unreadable files are skipped)."""
    found = []
    for path in sorted(Path(folder).expanduser().rglob("*.json")):
        data = read_json(path)
        if data and data.get("format") == RESULT_FORMAT and "accuracy" in data:
            found.append(data)
    return found


def _row_label(result: dict, varying: set[str]) -> str:
    label = result["method"] + (f"+{result['tag']}" if result.get("tag") else "")
    extra = [f"{k}={result.get(k)}" for k in ("model", "pretrained", "seed") if k in varying]
    return label + (f" ({', '.join(extra)})" if extra else "")


def _rows(results: list[dict]) -> dict[str, dict[str, float]]:
    """row label -> dataset -> accuracy (%)."""
    varying = {k for k in ("model", "pretrained", "seed") if len({str(r.get(k)) for r in results}) > 1}
    rows: dict[str, dict[str, float]] = {}
    for result in results:
        rows.setdefault(_row_label(result, varying), {})[result["dataset"]] = float(result["accuracy"])
    return rows


def _average(values: dict[str, float], keys: Iterable[str]) -> str:
    keys = list(keys)
    if not keys or any(k not in values for k in keys):
        return ""
    return f"{mean(values[k] for k in keys):.2f}"


def build_tables(results: list[dict[str, Any]]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for the cross-domain, ImageNet-variant and other tables present in ``results``.

    Averages are given only when a method has every dataset of the average (cross-domain: all 10;
    ImageNet: all 5; OOD: A, V2, R and Sketch).
    """
    rows = _rows(results)
    present = {r["dataset"] for r in results}
    tables = []
    families = (("Cross-domain (top-1 %)", CROSS_DOMAIN, [("Average", CROSS_DOMAIN)]),
                ("ImageNet and its variants (top-1 %)", IMAGENET_VARIANTS,
                 [("Average", IMAGENET_VARIANTS), ("OOD avg", OOD)]),
                ("Other (top-1 %)", tuple(sorted(present - set(CROSS_DOMAIN) - set(IMAGENET_VARIANTS))), []))
    for title, keys, averages in families:
        columns = [k for k in keys if k in present]
        if not columns:
            continue
        header = ["method"] + [SHORT.get(k, k) for k in columns] + [name for name, _ in averages]
        body = []
        for label, values in rows.items():
            if any(k in values for k in columns):
                cells = [f"{values[k]:.2f}" if k in values else "" for k in columns]
                body.append([label, *cells, *(_average(values, keys) for _, keys in averages)])
        tables.append((title, header, body))
    return tables


def format_tables(results: list[dict[str, Any]], fmt: str = "md") -> str:
    """The tables of ``build_tables`` as Markdown or CSV (CSV: one block per table, led by a title row)."""
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"Unknown table format {fmt!r}; accepted: {', '.join(TABLE_FORMATS)}.")
    tables = build_tables(results)
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
