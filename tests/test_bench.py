"""The evaluation runner: view-feature cache reuse, resume after an injected failure, features files, orders."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from test_data_trees import coop_tree

from vlmtta import bench
from vlmtta.bench import BenchSpec, InjectedFailure, run_bench
from vlmtta.cli import main
from vlmtta.metrics import METRICS, Samples, compute_metrics
from vlmtta.methods import Need, register
from vlmtta.methods.zeroshot import ZeroShot


@register
class _CountingOnline(ZeroShot):
    """Online test method: its prediction depends on how many images it has seen since reset."""

    name = "test_online_counter"
    episodic = False

    def reset(self) -> None:
        self.seen = 0

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return super().predict_features(features)


@register
class _ImagePath(ZeroShot):
    """A method that needs the images (not cached features): exercises the runner's view path."""

    name = "test_image_path"
    needs = frozenset({Need.IMAGE_INTERNALS})


@pytest.fixture
def tree(tmp_path):
    coop_tree(tmp_path / "data", "eurosat", per_class=3, n_classes=4)
    return tmp_path


def _spec(tree, tiny_model_dir, methods, **kw) -> BenchSpec:
    return BenchSpec(methods=methods, results_dir=tree / "results", dataset="eurosat", root=tree / "data",
                     model=tiny_model_dir, pretrained=None, device="cpu", cache_dir=tree / "cache", progress=False, **kw)


def test_second_method_reencodes_nothing(tree, tiny_model_dir, tiny_backbone):
    before = tiny_backbone.counters["images_encoded"]
    first = run_bench(_spec(tree, tiny_model_dir, ["zeroshot"]))[0]
    assert tiny_backbone.counters["images_encoded"] - before == 12
    middle = tiny_backbone.counters["images_encoded"]
    second = run_bench(_spec(tree, tiny_model_dir, ["ensemble", "test_online_counter"]))
    assert tiny_backbone.counters["images_encoded"] == middle  # same views, served from the disk cache
    assert {r["n"] for r in [first, *second]} == {12}
    protocol = first["protocol"]
    assert protocol["templates"] == ["a centered satellite photo of {}."] and protocol["order"] == "shuffled"
    assert protocol["protocol"] == "episodic" and protocol["views_from"] == "view-feature cache"
    assert second[1]["protocol"]["protocol"] == "online" and set(first["versions"]) >= {"torch", "open_clip"}
    saved = json.loads(next((tree / "results").glob("eurosat__zeroshot__*.json")).read_text())
    assert saved["accuracy"] == first["accuracy"] and saved["timing"]["latency_ms_mean"] > 0


def test_multi_view_cache_resumes_after_interrupted_encoding(tree, tiny_model_dir, tiny_backbone, monkeypatch):
    def interrupt(done):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "_encode_hook", interrupt)
    spec = _spec(tree, tiny_model_dir, ["zeroshot"], options={"n_views": 4}, batch_views=8,
                 augmentation="family")  # 2 images a batch
    before = tiny_backbone.counters["images_encoded"]
    with pytest.raises(KeyboardInterrupt):
        run_bench(spec)
    assert tiny_backbone.counters["images_encoded"] - before == 2 * 4
    monkeypatch.setattr(bench, "_encode_hook", None)
    result = run_bench(spec)[0]
    assert tiny_backbone.counters["images_encoded"] - before == 12 * 4  # the 2 finished rows were kept
    assert result["protocol"]["n_views"] == 4 and result["protocol"]["augmentation"] == "augmix"  # fine-grained default


def test_resume_after_injected_failure(tree, tiny_model_dir):
    spec = _spec(tree, tiny_model_dir, ["zeroshot"], checkpoint_every=2, batch_images=1)  # one image per step
    with pytest.raises(InjectedFailure):
        run_bench(spec, fail_after=5)
    assert not list((tree / "results").glob("*.json"))  # never a half-written result
    resumed = run_bench(spec)[0]
    assert resumed["resumed_from"] == 4 and resumed["n"] == 12
    clean = run_bench(_spec(tree, tiny_model_dir, ["zeroshot"], tag="clean", batch_images=1))[0]
    assert clean["resumed_from"] == 0 and clean["correct"] == resumed["correct"]
    assert resumed["metrics"] == clean["metrics"]  # the checkpointed per-sample record resumes exactly
    assert run_bench(spec)[0]["finished_at"] == resumed["finished_at"]  # finished work is skipped
    with pytest.raises(ValueError, match="--tag"):
        run_bench(_spec(tree, tiny_model_dir, ["zeroshot"], order="sorted"))


def test_online_stream_restarts_cleanly(tree, tiny_model_dir, monkeypatch):
    spec = _spec(tree, tiny_model_dir, ["test_online_counter"], checkpoint_every=2)
    monkeypatch.setenv(bench.FAIL_ENV, "7")
    with pytest.raises(InjectedFailure):
        run_bench(spec)
    monkeypatch.delenv(bench.FAIL_ENV)
    result = run_bench(spec)[0]
    assert result["resumed_from"] == 0 and result["n"] == 12


def test_image_path_matches_cached_path(tree, tiny_model_dir):
    cached, direct = run_bench(_spec(tree, tiny_model_dir, ["zeroshot", "test_image_path"], order="sorted"))
    assert direct["protocol"]["views_from"].startswith("images") and direct["correct"] == cached["correct"]


def test_features_file_source(tmp_path):
    torch.manual_seed(0)
    text = torch.randn(5, 16)
    labels = torch.arange(40) % 5
    image = (text[labels] + 0.9 * torch.randn(40, 16)) * 3  # not normalised
    path = tmp_path / "feats.pt"
    torch.save({"image_features": image.half(), "labels": labels, "text_features": text.half()}, path)
    spec = BenchSpec(methods=["zeroshot"], results_dir=tmp_path / "res", features=path, progress=False)
    result = run_bench(spec)[0]
    expected = (F.normalize(image.half().float(), dim=-1) @ F.normalize(text.half().float(), dim=-1).T).argmax(1)
    assert result["correct"] == int((expected == labels).sum()) and result["dataset"] == "feats"
    assert result["protocol"]["order"] == "sorted" and result["protocol"]["source"] == "features_file"
    views = torch.stack([image, image + torch.randn(40, 16)], dim=1)
    torch.save({"image_features": views, "labels": labels, "text_features": text, "logit_scale": 50.0}, path)
    two = BenchSpec(methods=["zeroshot"], results_dir=tmp_path / "res2", features=path, options={"n_views": 2},
                    progress=False)
    assert run_bench(two)[0]["protocol"]["hyperparameters"]["n_views"] == 2
    with pytest.raises(ValueError, match="holds 2 per image"):
        run_bench(BenchSpec(methods=["zeroshot"], results_dir=tmp_path / "r3", features=path,
                            options={"n_views": 3}, progress=False))
    torch.save({"image_features": image}, path)
    assert main(["bench", "--features", str(path), "--methods", "zeroshot", "--results", str(tmp_path / "r4")]) == 2


def test_cli_bench_and_table(tree, tiny_model_dir, capsys):
    args = ["bench", "--methods", "zeroshot,ensemble", "--datasets", "eurosat,dtd", "--root", str(tree / "data"),
            "--model", tiny_model_dir, "--pretrained", "none", "--device", "cpu", "--results", str(tree / "res"),
            "--cache-dir", str(tree / "cache"), "--no-progress", "--table", "md"]
    assert main(args) == 1  # dtd is missing: reported, eurosat still runs
    captured = capsys.readouterr()
    assert "skipping: dtd" in captured.err and "| method | EuroSAT |" in captured.out
    assert main(["table", str(tree / "res"), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "method,EuroSAT,Average"


@pytest.mark.slow
@pytest.mark.timeout(900)  # streams 7000 images twice: past 300 s on a loaded 2-core machine
@pytest.mark.skipif(not (SHARED_DATA / "clip-vit-b32-imagenet" / "imagenet_stream.pt").is_file(),
                    reason="shared real features absent")
def test_real_imagenet_stream_zeroshot(tmp_path):
    """fp16 file: CLIP logits in fp16 (as fp16 CLIP inference) give the published 59.54 %; fp32 gives 59.51 %."""
    path = SHARED_DATA / "clip-vit-b32-imagenet" / "imagenet_stream.pt"
    data = torch.load(path)
    for precision, dtype, expected in (("auto", torch.float16, 4166), ("fp32", torch.float32, 4164)):
        spec = BenchSpec(methods=["zeroshot"], results_dir=tmp_path / precision, features=path, progress=False,
                         precision=precision)
        result = run_bench(spec)[0]
        image = F.normalize(data["image_features"].float(), dim=-1).to(dtype)
        text = F.normalize(data["text_features"].float(), dim=-1).to(dtype)
        direct = int(((100 * image @ text.T).argmax(1) == data["labels"]).sum())
        assert result["n"] == 6997 and result["correct"] == direct == expected
        assert result["protocol"]["logits_dtype"] == str(dtype).replace("torch.", "")


def test_results_carry_metrics_memory_and_a_per_sample_file(tree, tiny_model_dir):
    result = run_bench(_spec(tree, tiny_model_dir, ["zeroshot"]))[0]
    path = next((tree / "results").glob("eurosat__zeroshot__*.json"))
    samples, _ = Samples.load(path.with_suffix(".npz"))
    assert len(samples) == 12 and samples.probs.shape == (12, 10)  # EuroSAT: 10 classes, full rows kept
    assert compute_metrics(samples)["top1"] == result["accuracy"] == result["metrics"]["top1"]
    assert set(result["metrics"]) == set(METRICS) and result["memory"]["peak_mb"] >= 0
    assert sorted(samples.stream_index.tolist()) == list(range(12))  # every test image once, in stream order


def test_batch_methods_take_the_stream_in_batches(tree, tiny_model_dir):
    from vlmtta.methods.tent import Tent

    seen = []

    @register
    class _Recorder(Tent):
        name = "test_batch_recorder"

        def predict_batch(self, images):
            seen.append(images.shape[0])
            return super().predict_batch(images)

    result = run_bench(_spec(tree, tiny_model_dir, ["test_batch_recorder"], batch_size=5))[0]
    assert seen == [5, 5, 2] and result["n"] == 12
    protocol = result["protocol"]
    assert protocol["batch_size"] == 5 and protocol["reset_policy"] == "domain"
    assert protocol["protocol"] == "batch (reset: domain)" and protocol["hyperparameters"]["reset"] == "domain"
    assert protocol["views_from"] == "images (original view, batched)"
    seen.clear()
    assert main(["bench", "--root", str(tree / "data"), "--datasets", "eurosat", "--methods", "test_batch_recorder",
                 "--model", tiny_model_dir, "--pretrained", "none", "--device", "cpu", "--results",
                 str(tree / "results"), "--cache-dir", str(tree / "cache"), "--no-progress", "--batch-size", "12",
                 "--tag", "b12", "-o", "reset=continual"]) == 0
    assert seen == [12]
    other = json.loads(next((tree / "results").glob("eurosat__test-batch-recorder+b12__*.json")).read_text())
    assert other["protocol"]["batch_size"] == 12 and other["protocol"]["reset_policy"] == "continual"
