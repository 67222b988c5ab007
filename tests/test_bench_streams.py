"""`vlmtta bench` stream protocols on synthetic CIFAR-10-C arrays: Dirichlet order, continual runs with and without
reset between domains, and labels that order a stream but never reach a method."""
from __future__ import annotations

import json
from dataclasses import replace
from typing import ClassVar

import numpy as np
import pytest
import torch
from test_corruption_data import cifar_c_tree

from vlmtta.bench import BenchSpec, run_bench
from vlmtta.cli import main
from vlmtta.data import read_split
from vlmtta.methods import Need, register
from vlmtta.methods.zeroshot import ZeroShot
from vlmtta.streams import StreamOrder
from vlmtta.testbed.suite import subset

DOMAINS = ["cifar10_c:fog:5", "cifar10_c:snow:5", "cifar10_c:frost:5"]
N = 6  # images per domain


@register
class _Probe(ZeroShot):
    """Online test method that logs what it is given: (images seen since reset, the features of each call)."""

    name = "test_stream_probe"
    episodic = False
    log: ClassVar[list[tuple[int, torch.Tensor]]] = []

    def reset(self) -> None:
        self.seen = 0

    def predict_features(self, *args, **kwargs) -> torch.Tensor:
        (features,) = args  # one positional argument, nothing else: no labels, no indices
        assert not kwargs and features.dtype == torch.float32 and features.shape == (1, 32)
        self.seen += 1
        _Probe.log.append((self.seen, features.clone()))
        return super().predict_features(features)


@register
class _NpyImages(ZeroShot):
    """Needs the images themselves: exercises the runner's image path on .npy rows."""

    name = "test_npy_image_path"
    needs = frozenset({Need.IMAGE_INTERNALS})


@pytest.fixture
def tree(tmp_path):
    cifar_c_tree(tmp_path / "data", ("fog", "snow", "frost"), per_severity=N)
    return tmp_path


def _spec(tree, tiny_model_dir, methods, **kw) -> BenchSpec:
    return BenchSpec(methods=methods, results_dir=tree / "results", root=tree / "data", model=tiny_model_dir,
                     pretrained=None, device="cpu", cache_dir=tree / "cache", progress=False, **kw)


def _probe_run(spec) -> tuple[list[dict], list[int], list[torch.Tensor]]:
    _Probe.log.clear()
    results = run_bench(spec)
    return results, [seen for seen, _ in _Probe.log], [f for _, f in _Probe.log]


def test_cifar_c_cached_and_image_paths_agree(tree, tiny_model_dir):
    cached, direct = run_bench(_spec(tree, tiny_model_dir, ["zeroshot", "test_npy_image_path"], dataset=DOMAINS[0]))
    assert cached["n"] == direct["n"] == N and cached["correct"] == direct["correct"]
    assert cached["protocol"]["templates_from"] == "dataset default (cifar18)" and len(cached["protocol"]["templates"]) == 18


def test_dirichlet_order_is_recorded_and_labels_stay_out(tree, tiny_model_dir):
    split = read_split(DOMAINS[1], tree / "data")
    result, seen, features = _probe_run(_spec(tree, tiny_model_dir, ["test_stream_probe"], dataset=DOMAINS[1],
                                              order="dirichlet:0.5", seed=3))
    protocol = result[0]["protocol"]
    assert protocol["order"] == "dirichlet:0.5" and protocol["labels_used_for"] == "metric only and the dirichlet order"
    n_classes = len(set(split.labels))
    assert protocol["stream"] == {"order": "dirichlet", "seed": 3, "alpha": 0.5, "slots": n_classes,
                                  "protocol": "RoTTA / NOTE"}
    assert seen == list(range(1, N + 1))
    # the method got the images' features in the Dirichlet order and nothing else
    _, _, in_file_order = _probe_run(_spec(tree, tiny_model_dir, ["test_stream_probe"], dataset=DOMAINS[1],
                                           order="sorted", tag="sorted"))
    order = StreamOrder.parse("dirichlet:0.5").indices(split.labels, 3).tolist()
    assert all(torch.equal(f, in_file_order[i]) for f, i in zip(features, order))


def test_method_inputs_do_not_depend_on_labels(tree, tiny_model_dir):
    """Same images, other labels, same (sorted) order: the method receives exactly the same inputs."""
    first, _, features = _probe_run(_spec(tree, tiny_model_dir, ["test_stream_probe"], dataset=DOMAINS[0],
                                          order="sorted"))
    labels = np.load(tree / "data" / "CIFAR-10-C" / "labels.npy")
    np.save(tree / "data" / "CIFAR-10-C" / "labels.npy", (labels + 1) % 10)
    second, _, relabelled = _probe_run(_spec(tree, tiny_model_dir, ["test_stream_probe"], dataset=DOMAINS[0],
                                             order="sorted", tag="relabelled"))
    assert len(features) == N and all(torch.equal(a, b) for a, b in zip(features, relabelled))
    assert first[0]["correct"] != second[0]["correct"]  # the labels did change: the metric saw them


def test_continual_keeps_or_resets_state(tree, tiny_model_dir):
    results, seen, _ = _probe_run(_spec(tree, tiny_model_dir, ["test_stream_probe"], domains=DOMAINS))
    assert seen == list(range(1, 3 * N + 1))  # never reset: one state across the three domains
    assert [r["dataset"] for r in results] == DOMAINS and {r["tag"] for r in results} == {"continual-never"}
    assert [r["protocol"]["stream"]["continual"] for r in results] == [
        {"domains": DOMAINS, "position": k, "reset_between": "never"} for k in range(3)]
    _, again, _ = _probe_run(_spec(tree, tiny_model_dir, ["test_stream_probe"], domains=DOMAINS))
    assert again == []  # finished: nothing is streamed again

    next((tree / "results").glob("cifar10-c-frost-5__test-stream-probe+continual-never__*.json")).unlink()
    _, replay, _ = _probe_run(_spec(tree, tiny_model_dir, ["test_stream_probe"], domains=DOMAINS))
    assert replay == list(range(1, 3 * N + 1))  # an unfinished never-reset run replays every domain

    results, seen, _ = _probe_run(_spec(tree, tiny_model_dir, ["test_stream_probe"], domains=DOMAINS,
                                        reset_between="domain"))
    assert seen == list(range(1, N + 1)) * 3 and {r["tag"] for r in results} == {"continual-domain"}


def test_continual_with_reset_equals_independent_runs(tree, tiny_model_dir):
    """TDA (online): resetting between domains gives each domain's independent result; no reset carries its cache."""
    spec = _spec(tree, tiny_model_dir, ["tda"], options={"n_views": 1})
    independent = [run_bench(replace(spec, dataset=key))[0] for key in DOMAINS]
    reset = run_bench(replace(spec, domains=DOMAINS, reset_between="domain"))
    never = run_bench(replace(spec, domains=DOMAINS))
    assert [r["correct"] for r in reset] == [r["correct"] for r in independent]
    assert never[0]["correct"] == independent[0]["correct"]  # the first domain starts from a fresh state either way
    assert never[0]["config_key"] != independent[0]["config_key"]  # but its protocol names the continual sequence


def test_continual_errors_and_cli(tree, tiny_model_dir, capsys):
    with pytest.raises(ValueError, match="one class list"):
        cifar_c_tree(tree / "data", ("fog",), folder="CIFAR-100-C", n_classes=100)
        run_bench(_spec(tree, tiny_model_dir, ["zeroshot"], domains=[DOMAINS[0], "cifar100_c:fog:5"]))
    with pytest.raises(ValueError, match="Unknown reset policy"):
        run_bench(_spec(tree, tiny_model_dir, ["zeroshot"], domains=DOMAINS, reset_between="always"))
    base = ["bench", "--methods", "test_stream_probe", "--root", str(tree / "data"), "--model", tiny_model_dir,
            "--pretrained", "none", "--device", "cpu", "--results", str(tree / "cli"), "--cache-dir",
            str(tree / "cache"), "--no-progress"]
    assert main([*base, "--datasets", "cifar10_c:fog", "--reset-between", "domain"]) == 2
    assert "--continual runs only" in capsys.readouterr().err
    assert main([*base, "--datasets", "cifar10_c:fog", "--order", "dirichlet:-1"]) == 2
    assert "ALPHA must be a finite number > 0" in capsys.readouterr().err
    _Probe.log.clear()
    assert main([*base, "--datasets", "cifar10_c:fog,cifar10_c:snow", "--severity", "2,5", "--continual",
                 "--reset-between", "domain", "--order", "iid"]) == 0
    assert [seen for seen, _ in _Probe.log] == list(range(1, N + 1)) * 4
    saved = [json.loads(p.read_text()) for p in sorted((tree / "cli").glob("*continual-domain*.json"))]
    assert len(saved) == 4 and {s["protocol"]["stream"]["continual"]["domains"][1] for s in saved} == {"cifar10_c:fog:5"}
    assert {s["protocol"]["order"] for s in saved} == {"shuffled"}


def test_testbed_suite_takes_the_order(tmp_path, capsys):
    args = ["bench", "--suite", "testbed", "--methods", "zeroshot", "--n-per-corruption", "8", "--device", "cpu",
            "--results", str(tmp_path), "--no-progress", "--order", "dirichlet:0.5", "--severity", "2"]
    assert main(args) == 0
    saved = json.loads(next((tmp_path / "testbed").glob("testbed-s2-n8-dirichlet0.5-*__zeroshot__*.json")).read_text())
    present = int(subset(8, 0)[1].unique().numel())  # RoTTA: one slot per class in the stream
    assert saved["protocol"]["stream"] == {"order": "dirichlet", "seed": 0, "alpha": 0.5, "slots": present,
                                           "protocol": "RoTTA / NOTE"}
    assert main([*args[:-1], "3,5"]) == 2 and "one severity" in capsys.readouterr().err
