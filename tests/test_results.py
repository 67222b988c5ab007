"""Result files and the method x dataset tables."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch

from vlmtta.cli import main
from vlmtta.data import CROSS_DOMAIN, IMAGENET_VARIANTS
from vlmtta.metrics import Samples
from vlmtta.results import build_tables, format_tables, load_results, load_samples, read_result, result_name, \
    save_result


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
    with pytest.warns(UserWarning, match="skipping"):
        assert [r["method"] for r in load_results(tmp_path)] == ["tda"]
    assert not list(tmp_path.glob(".*.tmp"))


# ---- integrity: metrics, per-sample files, checksums, fault injection --------------------------------------



def _saved(folder, dataset="dtd", method="tda"):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.4, 0.1]])
    samples = Samples.from_probabilities(probs, [0, 1, 1, 0], [1.0, 2.0, 3.0, 4.0])
    path = folder / result_name(dataset, method, "ViT-B-16", "openai", 0)
    save_result(path, {**_result(dataset, method, 0.0), "timing": {"latency_ms_mean": 2.5}}, samples)
    return path


def _warnings():
    seen = []
    return seen, seen.append


def test_saved_result_carries_metrics_and_per_sample_file(tmp_path):
    path = _saved(tmp_path)
    data = json.loads(path.read_text())
    assert data["accuracy"] == 75.0 and data["correct"] == 3 and data["n"] == 4  # computed from the samples
    assert data["metrics"]["top1"] == 75.0 and data["per_sample"]["file"] == path.with_suffix(".npz").name
    seen, warn = _warnings()
    loaded = read_result(path, warn)
    assert not seen and load_samples(loaded, warn).correct.tolist() == [True, True, False, True]
    assert "| tda | 2.50 |" in format_tables([loaded], "md", "latency")


def test_hand_edited_result_is_recomputed_from_its_per_sample_file(tmp_path):
    path = _saved(tmp_path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "accuracy": 99.0, "metrics": {**data["metrics"], "top1": 99.0}}))
    seen, warn = _warnings()
    loaded = read_result(path, warn)
    assert loaded["accuracy"] == 75.0 and loaded["metrics"]["top1"] == 75.0
    assert len(seen) == 1 and "checksum" in seen[0]


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "other_samples"])
def test_edited_result_without_an_intact_per_sample_file_is_skipped(tmp_path, damage):
    path = _saved(tmp_path)
    npz = path.with_suffix(".npz")
    if damage == "missing":
        npz.unlink()
    elif damage == "truncated":
        npz.write_bytes(npz.read_bytes()[:100])
    elif damage == "garbage":
        npz.write_bytes(b"garbage" * 50)
    else:  # a valid file, but not the one this result was computed from
        Samples.from_probabilities(np.full((4, 3), 1 / 3), [0, 0, 0, 0]).save(npz)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "accuracy": 99.0}))
    seen, warn = _warnings()
    assert read_result(path, warn) is None and any("skipping" in w for w in seen)


def test_damaged_per_sample_file_of_an_intact_result_is_not_used(tmp_path):
    path = _saved(tmp_path)
    path.with_suffix(".npz").write_bytes(b"\x00" * 64)
    seen, warn = _warnings()
    loaded = read_result(path, warn)
    assert loaded["accuracy"] == 75.0 and not seen  # the JSON itself is intact
    assert load_samples(loaded, warn) is None and "does not match" in seen[0]


def test_legacy_result_accuracy_is_checked_against_its_counts(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"format": 1, **_result("dtd", "tda", 99.0), "correct": 3, "n": 4}))
    seen, warn = _warnings()
    assert read_result(path, warn)["accuracy"] == 75.0 and "counts" in seen[0]


def test_table_skips_non_results_with_a_warning_and_builds_the_rest(tmp_path, capsys):
    _saved(tmp_path)
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "broken.json").write_text('{"format": 2, "accur')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    assert main(["table", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "| tda | 75.00 |" in out and "Traceback" not in err
    assert all(name in err for name in ("list.json", "empty.json", "broken.json", "binary.json"))
    assert main(["table", str(tmp_path), "--metric", "ece"]) == 0
    assert "ECE %, 20 bins" in capsys.readouterr().out
