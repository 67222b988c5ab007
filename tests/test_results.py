"""Result files and the method x dataset tables."""
from __future__ import annotations

import csv
import io

import pytest

from vlmtta.data import CROSS_DOMAIN, IMAGENET_VARIANTS
from vlmtta.results import build_tables, format_tables, load_results, result_name, save_result


def _result(dataset, method, accuracy, **kw):
    return {"dataset": dataset, "method": method, "accuracy": accuracy, "model": "ViT-B-16", "pretrained": "openai",
            "seed": 0, **kw}


def test_tables_with_averages_only_when_complete():
    results = [_result(k, "a", 10.0 + i) for i, k in enumerate(CROSS_DOMAIN)]
    results += [_result("dtd", "b", 50.0)]
    results += [_result(k, "a", 40.0 + 10 * i) for i, k in enumerate(IMAGENET_VARIANTS)]
    results += [_result("imagenet_stream", "a", 59.5)]
    (t1, h1, rows1), (t2, h2, rows2), (t3, _, rows3) = build_tables(results)
    assert h1[0] == "method" and h1[-1] == "Average" and len(h1) == 12
    assert rows1[0][-1] == "14.50" and rows1[1][2] == "50.00" and rows1[1][-1] == ""  # b lacks 9 datasets
    assert h2[-2:] == ["Average", "OOD avg"] and rows2[0][-2:] == ["60.00", "65.00"]  # OOD: mean of 50..80
    assert t3.startswith("Other") and rows3 == [["a", "59.50"]]


def test_rows_name_what_varies_and_formats():
    results = [_result("dtd", "tda", 40.0, seed=0), _result("dtd", "tda", 42.0, seed=1, tag="x")]
    md = format_tables(results, "md")
    assert "| tda (seed=0) | 40.00 |  |" in md and "| tda+x (seed=1) | 42.00 |  |" in md
    rows = list(csv.reader(io.StringIO(format_tables(results, "csv"))))
    assert rows[0] == ["# Cross-domain (top-1 %)"] and rows[1] == ["method", "DTD", "Average"]
    with pytest.raises(ValueError, match="accepted: md, csv"):
        format_tables(results, "html")
    assert format_tables([], "md") == "No results.\n"


def test_save_and_load(tmp_path):
    name = result_name("dtd", "tda", "local-dir:/x/tiny", None, 3, tag="v2")
    assert name == "dtd__tda+v2__tiny__None__seed3.json"
    save_result(tmp_path / name, _result("dtd", "tda", 1.0))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / "other.json").write_text('{"format": 1}')
    assert [r["method"] for r in load_results(tmp_path)] == ["tda"]
    assert not list(tmp_path.glob(".*.tmp"))
