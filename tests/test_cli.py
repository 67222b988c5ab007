"""The `vlmtta` console script."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from vlmtta.cli import main
from vlmtta.version import __version__


@pytest.fixture
def image_paths(rgb_image, tmp_path):
    paths = []
    for i, angle in enumerate((0, 90)):
        path = tmp_path / f"img{i}.png"
        rgb_image.rotate(angle).save(path)
        paths.append(str(path))
    return paths


def _predict(capsys, tiny_model_dir, *args):
    code = main(["predict", *args, "--classes", "cat,dog,car", "--model", tiny_model_dir, "--pretrained", "none",
                 "--device", "cpu"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_predict_json(capsys, tiny_model_dir, image_paths):
    code, out, _ = _predict(capsys, tiny_model_dir, *image_paths, "--format", "json", "--top-k", "2")
    rows = json.loads(out)
    assert code == 0 and [r["image"] for r in rows] == image_paths
    assert all(len(r["top"]) == 2 and r["label"] in ("cat", "dog", "car") for r in rows)


def test_predict_csv_and_table(capsys, tiny_model_dir, image_paths):
    code, out, _ = _predict(capsys, tiny_model_dir, image_paths[0], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["rank"] for r in rows] == ["1", "2", "3"]
    assert sum(float(r["probability"]) for r in rows) == pytest.approx(1.0, abs=1e-4)
    code, out, _ = _predict(capsys, tiny_model_dir, image_paths[0], "-o", "n_views=4", "--method", "ensemble")
    assert code == 0 and out.startswith(image_paths[0]) and "ensemble" in out
    code, out, _ = _predict(capsys, tiny_model_dir, image_paths[0], "-o", "ensemble.n_views=4", "--method", "ensemble")
    assert code == 0 and "ensemble" in out  # a scope naming the method run is its option
    code, _, err = _predict(capsys, tiny_model_dir, image_paths[0], "-o", "tpt.n_views=4", "--method", "ensemble")
    assert code == 2 and "scoped to 'tpt'" in err


def test_bad_image_is_skipped_and_reported(capsys, tiny_model_dir, image_paths, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    code, out, err = _predict(capsys, tiny_model_dir, str(broken), image_paths[0], "--format", "json")
    assert code == 1 and "skipping" in err and str(broken) in err
    assert [r["image"] for r in json.loads(out)] == [image_paths[0]]


def test_errors_are_one_line(capsys, tiny_model_dir, image_paths):
    code = main(["predict", image_paths[0], "--classes", "cat,cat", "--model", tiny_model_dir, "--pretrained", "none"])
    assert code == 2 and capsys.readouterr().err.startswith("vlmtta: error: Duplicate class names")
    code = main(["predict", image_paths[0], "--classes", "a,b", "--method", "nope", "--model", tiny_model_dir])
    assert code == 2 and "Unknown method 'nope'" in capsys.readouterr().err


def test_methods_and_version(capsys):
    assert main(["methods"]) == 0
    assert "zeroshot" in capsys.readouterr().out
    assert main(["methods", "--format", "json"]) == 0
    assert {m["name"] for m in json.loads(capsys.readouterr().out)} >= {"zeroshot", "ensemble"}
    result = subprocess.run([sys.executable, "-m", "vlmtta.cli", "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"vlmtta {__version__}"


def test_bench_speed_resumes_an_interrupted_table(capsys, tiny_model_dir, tmp_path):
    """Rows are saved as they finish; a re-run with the same settings keeps them and times only what is missing."""
    output = tmp_path / "speed.json"
    def run(methods: str, n_classes: int = 5) -> int:
        return main(["bench-speed", "--model", tiny_model_dir, "--device", "cpu", "--n-views", "2", "--n-classes",
                     str(n_classes), "--repeats", "1", "--warmup", "0", "--output", str(output), "--methods", methods])

    assert run("zeroshot,no-such-method") == 2  # stops at the unknown method
    partial = json.loads(output.read_text())
    assert partial["complete"] is False and [r["entry"] for r in partial["rows"]] == ["encode 2 views", "zeroshot"]
    assert run("zeroshot,tda") == 0
    assert "bench-speed: zeroshot:" in capsys.readouterr().err
    result = json.loads(output.read_text())
    assert result["complete"] is True and [r["entry"] for r in result["rows"]] == ["encode 2 views", "zeroshot", "tda"]
    for kept, earlier in zip(result["rows"][:2], partial["rows"]):
        assert kept["resumed"] is True and kept["latency_ms"] == earlier["latency_ms"]
    assert "resumed" not in result["rows"][2]
    assert run("zeroshot", n_classes=6) == 0  # other settings: nothing is kept
    assert not any(row.get("resumed") for row in json.loads(output.read_text())["rows"])


def test_bench_speed(capsys, tiny_model_dir, tmp_path):
    output = tmp_path / "speed.json"
    code = main(["bench-speed", "--model", tiny_model_dir, "--device", "cpu", "--n-views", "4", "--n-classes", "20",
                 "--repeats", "2", "--methods", "zeroshot", "--output", str(output)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| encode 4 views |" in table and "| zeroshot | 4 |" in table
    result = json.loads(output.read_text())
    assert [r["entry"] for r in result["rows"]] == ["encode 4 views", "zeroshot"]
    assert result["rows"][0]["ratio_to_encode"] == 1.0 and result["protocol"]["n_classes"] == 20
    method = result["rows"][1]  # its ratio is to the encode-only timing taken just before it, not to the first row
    assert method["ratio_to_encode"] == pytest.approx(method["latency_ms"] / method["encode_ms"])
    assert all(row["total_mem_mb"] >= row["peak_mem_mb"] >= 0 for row in result["rows"])  # absolute peak >= growth
    assert all(row["total_mem_mb"] > 50 for row in result["rows"])  # the process itself (torch) is in the total
