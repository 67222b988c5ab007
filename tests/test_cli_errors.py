"""Bad input to the command line: one line on stderr and exit code 2 (or a skipped item and exit 1), checked
before any work is done; never a traceback, never a silent "0.00 % (0/0)"."""
from __future__ import annotations

import json
import os

import pytest
from PIL import Image
from test_data_trees import coop_tree

from vlmtta import Adapter, bench, speed
from vlmtta.cli import main
from vlmtta.data import check_dataset, read_split
from vlmtta.testbed import suite


def _exit(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit code and stderr of ``vlmtta argv``, whether it returns or exits through argparse."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    return code, capsys.readouterr().err


def _one_line(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


@pytest.fixture
def image(rgb_image, tmp_path):
    rgb_image.save(tmp_path / "img.png")
    return str(tmp_path / "img.png")


@pytest.mark.parametrize("classes, message", [("@{tmp}/missing.txt", "No such file"),
                                              ("@{tmp}", "Is a directory"),
                                              ("@{tmp}/latin1.txt", "cannot read the class file")])
def test_class_file_errors(capsys, image, tmp_path, classes, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    code, err = _exit(capsys, ["predict", image, "--classes", classes.format(tmp=tmp_path)])
    assert code == 2
    _one_line(err, "--classes", message)


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_top_k_must_be_positive(capsys, image, value):
    code, err = _exit(capsys, ["predict", image, "--classes", "cat,dog", "--top-k", value])
    assert code == 2
    _one_line(err, "--top-k")


def test_adapter_top_k_and_max_pixels_are_checked(tiny_backbone):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            Adapter(["cat", "dog"], "zeroshot", backbone=tiny_backbone, top_k=bad)
        with pytest.raises(ValueError, match="max_pixels"):
            Adapter(["cat", "dog"], "zeroshot", backbone=tiny_backbone, max_pixels=bad)
    protocol = Adapter(["cat", "dog"], "zeroshot", backbone=tiny_backbone, max_pixels=1000).protocol()
    assert protocol["max_pixels"] == 1000  # a reported number says how its images were capped


def test_a_decompression_bomb_is_skipped_and_the_rest_classified(capsys, tiny_model_dir, image, tmp_path, monkeypatch):
    Image.new("RGB", (60, 60)).save(tmp_path / "bomb.png")  # 3600 pixels: a bomb under the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # the 40x52 test image (2080 pixels) is not one
    code = main(["predict", str(tmp_path / "bomb.png"), image, "--classes", "cat,dog", "--model", tiny_model_dir,
                 "--method", "zeroshot", "--device", "cpu", "--format", "json"])
    out = capsys.readouterr()
    assert code == 1 and [row["image"] for row in json.loads(out.out)] == [image]
    _one_line(out.err, "skipping", "bomb.png", "decompression bomb")


def test_empty_split_is_an_error_not_zero_percent(capsys, tiny_model_dir, tmp_path):
    coop_tree(tmp_path / "data", "eurosat", per_class=1, n_classes=2)
    split = next((tmp_path / "data").rglob("split_zhou_EuroSAT.json"))
    split.write_text(json.dumps({"train": [], "val": [], "test": []}))
    code, err = _exit(capsys, ["bench", "--methods", "zeroshot", "--datasets", "eurosat", "--root",
                               str(tmp_path / "data"), "--model", tiny_model_dir, "--device", "cpu", "--results",
                               str(tmp_path / "res"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 1 and "0.00 %" not in capsys.readouterr().out
    _one_line(err, "skipping", "lists no images")
    assert not list((tmp_path / "res").glob("*.json"))


def test_empty_features_file_is_an_error(tmp_path):
    import torch

    path = tmp_path / "empty.pt"
    torch.save({"image_features": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "text_features": torch.eye(2, 4)}, path)
    with pytest.raises(bench.EmptySource, match="holds no samples"):
        bench.run_bench(bench.BenchSpec(["zeroshot"], tmp_path / "res", features=path, progress=False))
    with pytest.raises(ValueError, match="limit must be at least 1"):
        bench.run_bench(bench.BenchSpec(["zeroshot"], tmp_path / "res", features=path, limit=0))


@pytest.mark.parametrize("entry", ["../../outside.jpg", "/etc/passwd", "class0/../../x.jpg", "..\\..\\x.jpg"])
def test_split_entries_must_stay_inside_the_dataset(tmp_path, capsys, entry):
    coop_tree(tmp_path, "eurosat", per_class=1, n_classes=2)
    split = next(tmp_path.rglob("split_zhou_EuroSAT.json"))
    data = json.loads(split.read_text())
    data["test"].append([entry, 0, "x"])
    split.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="absolute path or contains '..'"):
        read_split("eurosat", tmp_path)
    report = check_dataset("eurosat", tmp_path)
    assert report.status == "missing" and "contains '..'" in report.error
    code, _ = _exit(capsys, ["data", "check", "--root", str(tmp_path), "--datasets", "eurosat", "--allow-partial"])
    assert code == 1


@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if any command gets as far as computing."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output paths were checked")

    monkeypatch.setattr(bench, "_Source", refuse)
    monkeypatch.setattr(suite, "run_suite", refuse)
    monkeypatch.setattr(speed, "run_speed_benchmark", refuse)


def test_unwritable_outputs_are_refused_before_any_work(capsys, tmp_path, no_work, tiny_model_dir):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    data = tmp_path / "data"
    coop_tree(data, "eurosat", per_class=1, n_classes=2)
    bench_args = ["bench", "--methods", "zeroshot", "--datasets", "eurosat", "--root", str(data), "--model",
                  tiny_model_dir, "--device", "cpu", "--no-progress"]
    cases = [
        (bench_args + ["--results", str(a_file), "--cache-dir", str(tmp_path / "c")], "Results folder", "is a file"),
        (bench_args + ["--results", str(a_file / "sub"), "--cache-dir", str(tmp_path / "c")], "Results folder",
         "cannot be written"),
        (bench_args + ["--results", str(tmp_path / "r"), "--cache-dir", str(a_file)], "Cache folder", "is a file"),
        (["bench", "--suite", "testbed", "--results", str(a_file)], "Results folder", "is a file"),
        (["bench-speed", "--output", str(tmp_path)], "Output file", "is a folder"),
        (["bench-speed", "--output", str(a_file / "x.json")], "output file", "is a file, not a folder"),
        (["table", str(tmp_path), "--output", str(a_file / "t.md")], "output file", "is a file, not a folder"),
        (["generate", str(a_file), "--cache-dir", str(a_file)], "Cache folder", "is a file"),
    ]
    for argv, *fragments in cases:
        code, err = _exit(capsys, argv)
        assert code == 2, argv
        _one_line(err, "vlmtta: error:", *fragments)


def test_unwritable_results_folder_through_the_api(tmp_path, tiny_model_dir, no_work):
    (tmp_path / "results").write_text("not a folder")
    spec = bench.BenchSpec(["zeroshot"], tmp_path / "results", dataset="eurosat", root=tmp_path, model=tiny_model_dir)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        bench.run_bench(spec)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write into read-only folders")
def test_read_only_results_folder(tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    code, err = _exit(capsys, ["bench", "--suite", "testbed", "--results", str(folder)])
    assert code == 2
    _one_line(err, "Results folder", "cannot be written")
