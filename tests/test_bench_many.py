"""``batch_images``: episodic methods adapt several stream images per step in ``vlmtta bench`` and the testbed
suite, with the results of one image at a time; resuming and skipping ignore it."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_bench import _spec, tree  # noqa: F401  (fixture)

from vlmtta.bench import BenchSpec, InjectedFailure, auto_batch_images, check_batch_images, run_bench
from vlmtta.cli import main
from vlmtta.methods import Need, register
from vlmtta.methods.zero import Zero
from vlmtta.methods.zeroshot import ZeroShot
from vlmtta.metrics import Samples

SEEN: list[tuple[str, int]] = []  # (method, images) per call of the many-image entry points


@register
class _ManyRecorder(Zero):
    """Zero (64 views by default; 4 here) that records how many images each many-image step gets."""

    name = "test_many_recorder"

    def predict_features_many(self, features: torch.Tensor) -> torch.Tensor:
        SEEN.append((self.name, features.shape[0]))
        return super().predict_features_many(features)


@register
class _ImagesMany(ZeroShot):
    """An episodic method that needs the images: the runner feeds it ``adapt_views_many``."""

    name = "test_images_many"
    needs = frozenset({Need.IMAGE_INTERNALS})

    def predict_views_many(self, views, sources=None):
        SEEN.append((self.name, views.shape[0]))
        assert sources is not None and len(sources) == views.shape[0]
        return super().predict_views_many(views, sources)


@register
class _OutOfMemory(ZeroShot):
    """Runs out of (pretend) GPU memory with more than two images per step."""

    name = "test_out_of_memory"

    def predict_features_many(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[0] > 2:
            raise torch.OutOfMemoryError("pretend")
        return super().predict_features_many(features)


@pytest.mark.parametrize("method,options", [("test_many_recorder", {"n_views": 4}), ("test_images_many", {"n_views": 2})])
def test_batched_steps_equal_one_image_at_a_time(tree, tiny_model_dir, method, options):  # noqa: F811
    SEEN.clear()
    one = run_bench(_spec(tree, tiny_model_dir, [method], options=options, batch_images=1, tag="b1"))[0]
    assert SEEN == []  # one image per step: the one-image path
    many = run_bench(_spec(tree, tiny_model_dir, [method], options=options, batch_images=5, tag="b5"))[0]
    assert SEEN == [(method, 5), (method, 5), (method, 2)]
    assert one["protocol"]["batch_images"] == 1 and many["protocol"]["batch_images"] == 5
    assert one["config_key"] == many["config_key"] and one["correct"] == many["correct"]
    b1 = Samples.load(next((tree / "results").glob("*+b1__*.npz")))[0]
    b5 = Samples.load(next((tree / "results").glob("*+b5__*.npz")))[0]
    assert b1.stream_index.tolist() == b5.stream_index.tolist()
    np.testing.assert_allclose(b5.probs, b1.probs, rtol=0, atol=1e-6)
    assert (b5.latency_ms[:5] == b5.latency_ms[0]).all()  # a step's time, divided by its images


def test_online_methods_stay_one_image_per_step(tree, tiny_model_dir):  # noqa: F811
    result = run_bench(_spec(tree, tiny_model_dir, ["test_online_counter"], batch_images=8))[0]
    assert "batch_images" not in result["protocol"] and result["n"] == 12


def test_resume_and_skip_across_batch_images(tree, tiny_model_dir):  # noqa: F811
    """A stream checkpointed with 1 image per step resumes with 4 (and a finished one is skipped with 8): same
    config_key, same per-sample record as an uninterrupted run."""
    options = {"n_views": 4}
    spec = _spec(tree, tiny_model_dir, ["test_many_recorder"], options=options, checkpoint_every=3, batch_images=1)
    with pytest.raises(InjectedFailure):
        run_bench(spec, fail_after=7)  # checkpoints at 3 and 6
    SEEN.clear()
    resumed = run_bench(replace(spec, batch_images=4))[0]
    assert resumed["resumed_from"] == 6 and resumed["n"] == 12 and SEEN == [("test_many_recorder", 4),
                                                                             ("test_many_recorder", 2)]
    assert resumed["protocol"]["batch_images"] == 4
    clean = run_bench(_spec(tree, tiny_model_dir, ["test_many_recorder"], options=options, batch_images=1,
                            tag="clean"))[0]
    assert resumed["config_key"] == clean["config_key"] and resumed["metrics"] == clean["metrics"]
    skipped = run_bench(replace(spec, batch_images=8))[0]
    assert skipped["finished_at"] == resumed["finished_at"] and skipped["protocol"]["batch_images"] == 4


def test_features_file_in_batches(tmp_path):
    torch.manual_seed(0)
    text = torch.randn(7, 16)
    labels = torch.arange(30) % 7
    views = text[labels][:, None] + 1.2 * torch.randn(30, 8, 16)
    path = tmp_path / "feats.pt"
    torch.save({"image_features": views, "labels": labels, "text_features": text}, path)
    results = {}
    for b in (1, 8, "auto"):
        spec = BenchSpec(methods=["zero", "mta", "te"], results_dir=tmp_path / f"res{b}", features=path,
                         options={"n_views": 8}, progress=False, batch_images=b)
        results[b] = run_bench(spec)
    for r1, r8, auto in zip(results[1], results[8], results["auto"]):
        assert r8["protocol"]["batch_images"] == 8 and auto["protocol"]["batch_images"] == 32
        assert r1["metrics"] == r8["metrics"] == auto["metrics"] and r1["config_key"] == r8["config_key"]


def test_out_of_memory_halves_the_step(tree, tiny_model_dir):  # noqa: F811
    result = run_bench(_spec(tree, tiny_model_dir, ["test_out_of_memory"], batch_images=8, tag="oom"))[0]
    plain = run_bench(_spec(tree, tiny_model_dir, ["test_out_of_memory"], batch_images=1))[0]
    assert result["batch_images_reduced_to"] == 2 and result["protocol"]["batch_images"] == 8
    assert result["correct"] == plain["correct"] and result["metrics"] == pytest.approx(plain["metrics"], rel=1e-6)


def test_auto_and_validation(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_batch_images(cpu, on_features=True) == auto_batch_images(cuda, on_features=True) == 32
    assert auto_batch_images(cpu, on_features=False) == 1
    for free_gib, expected in ((1, 1), (5, 2), (17, 8), (70, 32), (139, 32)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, f=free_gib: (f * 2**30, 140 * 2**30))
        assert auto_batch_images(cuda, on_features=False) == expected
    assert check_batch_images("auto") == "auto" and check_batch_images("16") == 16 and check_batch_images(3) == 3
    for bad in ("0", "-2", "x", 2.5, True):
        with pytest.raises(ValueError, match="batch_images must be"):
            check_batch_images(bad)


def test_cli_batch_images(tree, tiny_model_dir, capsys):  # noqa: F811
    base = ["bench", "--root", str(tree / "data"), "--datasets", "eurosat", "--methods", "zeroshot", "--model",
            tiny_model_dir, "--pretrained", "none", "--device", "cpu", "--results", str(tree / "res"), "--cache-dir",
            str(tree / "cache"), "--no-progress"]
    with pytest.raises(SystemExit):
        main([*base, "--batch-images", "0"])
    assert "batch_images must be a whole number" in capsys.readouterr().err
    assert main([*base, "--batch-images", "3"]) == 0
    saved = json.loads(next((tree / "res").glob("eurosat__zeroshot__*.json")).read_text())
    assert saved["protocol"]["batch_images"] == 3


def test_testbed_suite_batches_episodic_methods():
    from vlmtta.testbed.suite import run_suite

    kwargs = dict(severity=3, n_per_corruption=10, corruptions=["gaussian_noise"], device="cpu",
                  options={"test_images_many": {"n_views": 2}, "zero": {"n_views": 4}})
    SEEN.clear()
    one = run_suite(["zero", "test_images_many", "tda"], batch_images=1, **kwargs)
    assert SEEN == []
    many = run_suite(["zero", "test_images_many", "tda"], batch_images=4, **kwargs)
    assert SEEN == [("test_images_many", 4), ("test_images_many", 4), ("test_images_many", 2)]
    for name in ("zero", "test_images_many", "tda"):
        np.testing.assert_allclose(many.cells[name]["gaussian_noise"].samples.probs,
                                   one.cells[name]["gaussian_noise"].samples.probs, rtol=0, atol=1e-6)
    assert many.protocol["methods"]["zero"]["batch_images"] == 4 and "batch_images" not in many.protocol["methods"]["tda"]


def test_images_per_second_mode(tiny_model_dir, tiny_backbone, capsys, tmp_path):
    """Every entry streams the whole synthetic stream at every B (counted by the encoder), next to encode-only."""
    from vlmtta.speed import run_images_per_second

    before = tiny_backbone.counters["images_encoded"]
    result = run_images_per_second(methods=["zeroshot", "tda"], n_views=4, n_classes=20, batch_images=[2, 1],
                                   n_images=4, backbone=tiny_backbone)
    encoded = tiny_backbone.counters["images_encoded"] - before
    assert encoded == 3 * 4 * ((1 + 4) + (2 + 4))  # 3 entries x 4 views x (warm-up step + stream) per B
    rows = {(r["entry"], r["batch_images"]): r for r in result["rows"]}
    assert list(rows) == [(e, b) for b in (1, 2) for e in ("encode 4 views", "zeroshot", "tda")]
    assert all(rows["encode 4 views", b]["x_encode"] == 1.0 for b in (1, 2))
    assert all(r["images_per_s"] > 0 and r["x_encode"] > 0 for r in rows.values())
    output = tmp_path / "ips.json"
    assert main(["bench-speed", "--images-per-second", "--model", tiny_model_dir, "--device", "cpu", "--n-views", "2",
                 "--n-classes", "10", "--methods", "zero", "--batch-images", "1,3", "--n-images", "3", "--repeats", "1",
                 "--output", str(output)]) == 0
    table = capsys.readouterr().out
    assert "| method | B | device | images/s | x encode-only |" in table and "| zero | 3 | cpu |" in table
    assert json.loads(output.read_text())["protocol"]["n_images"] == 3
    assert main(["bench-speed", "--images-per-second", "--batch-images", "1,x"]) == 2
