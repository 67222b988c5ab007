"""Evaluation grids on the local engine: the plan, split episodic cells equal to unsplit runs, failures, resume."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_trees import coop_tree

from vlmtta import bench
from vlmtta.bench import BenchSpec, InjectedFailure, run_bench
from vlmtta.cli import main
from vlmtta.grid import FAULT_ENV, part_path, plan, run_grid
from vlmtta.metrics import Samples

METHODS = ["zero", "tda"]  # episodic (split) and online (never split), both on view features
DATASETS = ["eurosat", "dtd"]
MEASURED = {"timing", "memory", "finished_at", "checksum"}  # what legitimately differs between two runs


@pytest.fixture
def tree(tmp_path):
    for key in DATASETS:
        coop_tree(tmp_path / "data", key, per_class=3, n_classes=4)  # 12 images each
    return tmp_path


def specs(tree: Path, model: str, results: str, methods=METHODS, **kw) -> list[BenchSpec]:
    return [BenchSpec(methods=list(methods), results_dir=tree / results, dataset=key, root=tree / "data", model=model,
                      pretrained=None, device="cpu", cache_dir=tree / "cache", progress=False,
                      options={"n_views": 4}, **kw) for key in DATASETS]


def comparable(path: Path) -> tuple[dict, dict]:
    """A result JSON without its measurements, and its per-sample arrays without the latencies."""
    result = json.loads(path.read_text())
    samples, _ = Samples.load(path.with_suffix(".npz"))
    kept = {k: v for k, v in result.items() if k not in MEASURED}
    kept["per_sample"] = {k: v for k, v in kept["per_sample"].items() if k != "sha256"}
    arrays = {k: v for k, v in vars(samples).items() if k != "latency_ms"}
    return kept, arrays


def assert_same_results(first: Path, second: Path) -> None:
    names = sorted(p.name for p in first.glob("*.json"))
    assert names and names == sorted(p.name for p in second.glob("*.json"))
    for name in names:
        (a, arrays_a), (b, arrays_b) = comparable(first / name), comparable(second / name)
        assert a == b, name
        assert arrays_a.keys() == arrays_b.keys() and arrays_a["probs"] is not None
        for key, value in arrays_a.items():
            assert np.array_equal(value, arrays_b[key]), (name, key)  # bit for bit


def test_plan_splits_only_episodic_cells(tree, tiny_model_dir):
    tasks = plan(specs(tree, tiny_model_dir, "r"), images_per_task=5)
    assert [s.dataset for s in tasks.encodes] == DATASETS and all(s.methods == METHODS for s in tasks.encodes)
    assert [(c.label, c.parts, c.encode) for c in tasks.cells] == [
        ("eurosat/zero/seed0", [(0, 5), (5, 10), (10, 12)], 0), ("eurosat/tda/seed0", [], 0),
        ("dtd/zero/seed0", [(0, 5), (5, 10), (10, 12)], 1), ("dtd/tda/seed0", [], 1)]
    assert [c.parts for c in plan(specs(tree, tiny_model_dir, "r", limit=5), images_per_task=5).cells] == [[]] * 4
    continual = plan([BenchSpec(methods=METHODS, results_dir=tree / "r", domains=DATASETS, root=tree / "data",
                                model=tiny_model_dir)], images_per_task=5)
    assert not continual.encodes and [(c.label, c.n_images, c.parts) for c in continual.cells] == [
        ("eurosat+dtd/zero/seed0", 24, []), ("eurosat+dtd/tda/seed0", 24, [])]  # a continual stream is one task
    missing = plan([BenchSpec(methods=["zero"], results_dir=tree / "r", dataset="caltech101", root=tree / "data")])
    assert missing.cells == [] and missing.missing[0][0] == "caltech101/zero/seed0"
    with pytest.raises(ValueError, match="images_per_task"):
        plan(specs(tree, tiny_model_dir, "r"), images_per_task=0)


def test_split_grid_equals_sequential_runner(tree, tiny_model_dir, tiny_backbone):
    for spec in specs(tree, tiny_model_dir, "sequential"):
        run_bench(spec)
    encoded = tiny_backbone.counters["images_encoded"]
    lines: list[str] = []
    report = run_grid(specs(tree, tiny_model_dir, "grid"), images_per_task=5, echo=lines.append)
    assert tiny_backbone.counters["images_encoded"] == encoded  # the views were cached by the first run
    assert not report.failed and report.images == 48 and len(lines) == 5
    assert lines[0].startswith("[1/4] eurosat/zero/seed0: eurosat") and "12 images in" in lines[0]
    assert lines[-1].startswith("grid: 4 done (0 already finished), 0 failed, 0 remaining of 4 cells; 48 images in")
    assert_same_results(tree / "sequential", tree / "grid")
    assert not list((tree / "grid" / ".partial").glob("*"))  # parts and checkpoints are gone once merged


def test_failed_cell_is_reported_and_the_rerun_does_only_what_is_left(tree, tiny_model_dir, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "dtd/tda/seed0:raise;eurosat/zero/seed0[5:10]:raise")
    lines: list[str] = []
    report = run_grid(specs(tree, tiny_model_dir, "grid"), images_per_task=5, echo=lines.append)
    assert sorted(c.label for c in report.failed) == ["dtd/tda/seed0", "eurosat/zero/seed0"]
    assert any("dtd/tda/seed0 FAILED: RuntimeError: injected fault in dtd/tda/seed0" in line for line in lines)
    assert sorted(p.name.split("__")[:2] == ["eurosat", "zero"] or p.name.split("__")[0]
                  for p in (tree / "grid").glob("*.json")) == ["dtd", "eurosat"]  # dtd/zero and eurosat/tda
    saved = {p.name: p.read_text() for p in (tree / "grid").glob("*.json")}
    assert len(list((tree / "grid" / ".partial").glob("*.part*.npz"))) == 2  # eurosat/zero's parts 0:5, 10:12
    monkeypatch.delenv(FAULT_ENV)
    report = run_grid(specs(tree, tiny_model_dir, "grid"), images_per_task=5, echo=lines.append)
    assert not report.failed and report.images == 5 + 12  # the missing part and dtd/tda only
    assert lines[-1].startswith("grid: 4 done (2 already finished), 0 failed, 0 remaining of 4 cells")
    assert all((tree / "grid" / name).read_text() == text for name, text in saved.items())  # skipped, not rerun
    for spec in specs(tree, tiny_model_dir, "sequential"):
        run_bench(spec)
    assert_same_results(tree / "sequential", tree / "grid")


def test_part_resumes_from_its_checkpoint(tree, tiny_model_dir, monkeypatch):
    grid = specs(tree, tiny_model_dir, "grid", methods=["zero"], checkpoint_every=2, batch_images=1)[:1]
    monkeypatch.setenv(bench.FAIL_ENV, "3")
    report = run_grid(grid, images_per_task=6, echo=None)
    assert report.failed and InjectedFailure.__name__ in report.failed[0].error
    monkeypatch.delenv(bench.FAIL_ENV)
    report = run_grid(grid, images_per_task=6, echo=None)
    result = json.loads(next((tree / "grid").glob("*.json")).read_text())
    assert not report.failed and result["resumed_from"] == 2 + 2 and report.images == 12 - 4
    path = part_path(tree / "grid" / "x.json", 0, 6)
    assert path.name == "x.part0-6.npz" and path.parent.name == ".partial"


def test_cli_grid_flags_and_seeds(tree, tiny_model_dir, capsys, monkeypatch):
    base = ["bench", "--methods", "zeroshot", "--datasets", "eurosat", "--root", str(tree / "data"), "--model",
            tiny_model_dir, "--pretrained", "none", "--device", "cpu", "--results", str(tree / "r"), "--cache-dir",
            str(tree / "cache"), "--no-progress"]
    for extra, message in ((["--gpus-per-cell", "0.25"], "--gpus-per-cell applies to --engine ray only"),
                           (["--address", "auto", "--images-per-task", "4"],
                            "--address, --images-per-task apply to --engine ray only")):
        assert main([*base, *extra]) == 2 and message in capsys.readouterr().err
    assert main(["bench", "--suite", "testbed", "--engine", "ray"]) == 2
    assert "--engine ray runs --datasets or --features grids" in capsys.readouterr().err
    assert main(["bench", "--suite", "testbed", "--seed", "0,1"]) == 2
    assert "--suite testbed takes one --seed" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray absent
    assert main([*base, "--engine", "ray"]) == 2
    assert 'pip install -e ".[distributed]"' in capsys.readouterr().err
    assert main([*base, "--seed", "0,1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in out] == ["0", "1"] and len(list((tree / "r").glob("*.json"))) == 2
    with pytest.raises(SystemExit):
        main([*base, "--seed", "1,1"])
