"""``vlmtta bench --engine ray``: a small grid on a local Ray (2 CPUs) equals the sequential runner bit for bit;
a killed worker and a failing cell are reported without losing the other cells, and a re-run finishes the grid."""
from __future__ import annotations

import json

import pytest
import torch
from test_grid import DATASETS, METHODS, assert_same_results, specs, tree  # noqa: F401 - tree is a fixture

from vlmtta.bench import run_bench
from vlmtta.cli import main
from vlmtta.grid import FAULT_ENV, run_grid

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # starting Ray and its workers takes tens of seconds on 2 cores


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def sequential(folder, model: str) -> None:
    """The sequential runner in this process, on the Ray workers' thread count (one per CPU of a task): CPU float
    reductions (matrix products) round differently with other thread counts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for spec in specs(folder, model, "sequential"):
            run_bench(spec)
    finally:
        torch.set_num_threads(threads)


def test_ray_grid_equals_sequential_runner(tree, tiny_model_dir, tiny_backbone):  # noqa: F811
    lines: list[str] = []
    report = run_grid(specs(tree, tiny_model_dir, "ray"), engine="ray", images_per_task=6, echo=lines.append)
    assert not report.failed and report.images == 48, lines
    assert sorted(line.split(":")[0].split("] ")[1] for line in lines[:-1]) == sorted(
        f"{d}/{m}/seed0" for d in DATASETS for m in METHODS)
    encoded = tiny_backbone.counters["images_encoded"]
    sequential(tree, tiny_model_dir)  # on the view caches the Ray tasks wrote
    assert tiny_backbone.counters["images_encoded"] == encoded  # the Ray encode tasks had encoded every view
    assert_same_results(tree / "sequential", tree / "ray")


def test_killed_worker_and_failing_cell_then_resume(tree, tiny_model_dir, monkeypatch, capsys):  # noqa: F811
    marker = tree / "killed-once"
    monkeypatch.setenv(FAULT_ENV, f"eurosat/zero/seed0[0:6]:exit:{marker};dtd/tda/seed0:raise")
    lines: list[str] = []
    report = run_grid(specs(tree, tiny_model_dir, "ray"), engine="ray", images_per_task=6, retries=0,
                      echo=lines.append)
    assert marker.exists() and sorted(c.label for c in report.failed) == ["dtd/tda/seed0", "eurosat/zero/seed0"]
    errors = {c.label: c.error for c in report.failed}
    assert "injected fault in dtd/tda/seed0" in errors["dtd/tda/seed0"]
    assert "Worker" in errors["eurosat/zero/seed0"] or "died" in errors["eurosat/zero/seed0"], errors
    assert len(list((tree / "ray").glob("*.json"))) == 2 and "2 done (0 already finished), 2 failed" in lines[-1]
    saved = {p.name: p.read_text() for p in (tree / "ray").glob("*.json")}
    monkeypatch.delenv(FAULT_ENV)
    args = ["bench", "--engine", "ray", "--images-per-task", "6", "--methods", ",".join(METHODS), "--datasets",
            ",".join(DATASETS), "--root", str(tree / "data"), "--model", tiny_model_dir, "--pretrained", "none",
            "--device", "cpu", "--results", str(tree / "ray"), "--cache-dir", str(tree / "cache"), "-o", "n_views=4"]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("grid: 4 done (2 already finished), 0 failed, 0 remaining of 4 cells; 18 images in")
    assert all((tree / "ray" / name).read_text() == text for name, text in saved.items())  # skipped, not rerun
    result = json.loads(next((tree / "ray").glob("eurosat__zero__*.json")).read_text())
    assert result["n"] == 12 and not list((tree / "ray" / ".partial").glob("*.npz"))
    sequential(tree, tiny_model_dir)
    assert_same_results(tree / "sequential", tree / "ray")
