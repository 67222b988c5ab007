"""``vlmtta bench --engine ray``: a small grid on a local Ray (2 CPUs) equals the sequential runner bit for bit;
a killed worker and a failing cell are reported without losing the other cells, and a re-run finishes the grid."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_data_trees import coop_tree
from test_grid import DATASETS, METHODS, assert_same_results, specs

from vlmtta.cli import main
from vlmtta.grid import FAULT_ENV, run_grid

ray = pytest.importorskip("ray")
# starting Ray and its workers takes tens of seconds on 2 cores, minutes on a loaded machine
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """One data tree and view cache for the module: the first grid encodes it, the rest read it."""
    root = tmp_path_factory.mktemp("grid")
    for key in DATASETS:
        coop_tree(root / "data", key, per_class=3, n_classes=4)
    return root


def cli_args(tree, model: str, results: str) -> list[str]:
    return ["bench", "--methods", ",".join(METHODS), "--datasets", ",".join(DATASETS), "--root", str(tree / "data"),
            "--model", model, "--pretrained", "none", "--device", "cpu", "--results", str(tree / results),
            "--cache-dir", str(tree / "cache"), "-o", "n_views=4", "--no-progress"]


def sequential_reference(tree, model: str) -> None:
    """``vlmtta bench`` (the sequential engine) in a new process with one thread, as a Ray task with one CPU has:
    CPU float results can differ in the last bits with the thread configuration torch starts with (TDA's
    probabilities on this grid did, by ~1e-11, against a 2-thread run)."""
    if (tree / "sequential").is_dir():
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "vlmtta", *cli_args(tree, model, "sequential")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr


def test_ray_grid_equals_sequential_runner(tree, tiny_model_dir):
    lines: list[str] = []
    report = run_grid(specs(tree, tiny_model_dir, "ray"), engine="ray", images_per_task=6, echo=lines.append)
    assert not report.failed and report.images == 48, lines
    assert sorted(line.split(":")[0].split("] ")[1] for line in lines[:-1]) == sorted(
        f"{d}/{m}/seed0" for d in DATASETS for m in METHODS)
    metas = {p: p.read_bytes() for p in (tree / "cache").rglob("meta.json")}
    assert len(metas) == 2 * 2  # two view policies (zero's crops, TDA's AugMix) per dataset
    sequential_reference(tree, tiny_model_dir)
    assert {p: p.read_bytes() for p in (tree / "cache").rglob("meta.json")} == metas  # it encoded nothing
    assert_same_results(tree / "sequential", tree / "ray")


def test_killed_worker_and_failing_cell_then_resume(tree, tiny_model_dir, monkeypatch, capsys):
    marker = tree / "killed-once"
    monkeypatch.setenv(FAULT_ENV, f"eurosat/zero/seed0[0:6]:exit:{marker};dtd/tda/seed0:raise")
    lines: list[str] = []
    report = run_grid(specs(tree, tiny_model_dir, "faults"), engine="ray", images_per_task=6, retries=0,
                      echo=lines.append)
    assert marker.exists() and sorted(c.label for c in report.failed) == ["dtd/tda/seed0", "eurosat/zero/seed0"]
    errors = {c.label: c.error for c in report.failed}
    assert "injected fault in dtd/tda/seed0" in errors["dtd/tda/seed0"]
    assert "Worker" in errors["eurosat/zero/seed0"] or "died" in errors["eurosat/zero/seed0"], errors
    assert len(list((tree / "faults").glob("*.json"))) == 2 and "2 done (0 already finished), 2 failed" in lines[-1]
    saved = {p.name: p.read_text() for p in (tree / "faults").glob("*.json")}
    monkeypatch.delenv(FAULT_ENV)
    assert main([*cli_args(tree, tiny_model_dir, "faults"), "--engine", "ray", "--images-per-task", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("grid: 4 done (2 already finished), 0 failed, 0 remaining of 4 cells; 18 images in")
    assert all((tree / "faults" / name).read_text() == text for name, text in saved.items())  # skipped, not rerun
    result = json.loads(next((tree / "faults").glob("eurosat__zero__*.json")).read_text())
    assert result["n"] == 12 and not list((tree / "faults" / ".partial").glob("*.npz"))
    sequential_reference(tree, tiny_model_dir)
    assert_same_results(tree / "sequential", tree / "faults")
