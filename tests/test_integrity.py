"""Fault injection on every on-disk artefact but result JSON: truncated, zero-filled, NaN and garbage files are
detected and rebuilt (with a warning) or refused with one line, never used."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import open_clip
import pytest
import torch
from conftest import TINY_CONFIG, write_model_dir
from test_data_trees import coop_tree
from test_generation import FakePipeline, pixels

from vlmtta.backbone import FrozenCLIP
from vlmtta.bench import BenchSpec, run_bench
from vlmtta.cache import CorruptFileError, load_torch_file
from vlmtta.cli import main
from vlmtta.features import ViewFeatureCache, load_features_file
from vlmtta.generation import DiffusionViews, VariationGenerator
from vlmtta.methods import register
from vlmtta.methods.zeroshot import ZeroShot

RNG = np.random.default_rng(15)


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def zero_fill(path):
    path.write_bytes(bytes(path.stat().st_size))


def garbage(path):
    path.write_bytes(RNG.bytes(path.stat().st_size))


WHOLE_FILE = {"truncated": truncate, "zero_filled": zero_fill, "garbage": garbage}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def malicious(path):
    path.write_bytes(pickle.dumps({"image_features": _Evil()}, protocol=2))


# ---- view-feature cache ------------------------------------------------------------------------------------------
@register
class _Recorder(ZeroShot):
    """Zero-shot that records the view features it is given (to prove which features a run used)."""

    name = "test_feature_recorder"
    seen: list[torch.Tensor] = []

    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        type(self).seen.append(features.clone())
        return super().predict_features(features)


def _rows(fill):
    """Overwrite the data of rows 2..5 of features.npy (its header and the checksums stay intact)."""
    def damage(path):
        array = np.load(path, mmap_mode="r+")
        array[2:6] = fill(array[2:6].shape)
        array.flush()
    return damage


ROW_DAMAGE = {"zero_rows": _rows(np.zeros), "nan_rows": _rows(lambda shape: np.full(shape, np.nan)),
              "garbage_rows": _rows(lambda shape: np.frombuffer(RNG.bytes(2 * int(np.prod(shape))),
                                                                 np.float16).reshape(shape))}
VIEW_CASES = [("features.npy", name) for name in [*WHOLE_FILE, *ROW_DAMAGE]] + \
             [("written.npy", name) for name in WHOLE_FILE] + [("meta.json", "garbage"), ("meta.json", "truncated")]


@pytest.fixture
def tree(tmp_path):
    coop_tree(tmp_path / "data", "eurosat", per_class=3, n_classes=4)
    return tmp_path


def _record(tree, tiny_model_dir, **kw) -> torch.Tensor:
    _Recorder.seen = []
    run_bench(BenchSpec(methods=["test_feature_recorder"], results_dir=tree / "results", dataset="eurosat",
                        root=tree / "data", model=tiny_model_dir, pretrained=None, device="cpu",
                        cache_dir=tree / "cache", progress=False, order="sorted", options={"n_views": 2},
                        augmentation="rrc_flip", **kw))
    return torch.stack(_Recorder.seen)


@pytest.mark.parametrize("file,damage", VIEW_CASES)
def test_damaged_view_cache_is_rebuilt_never_used(tree, tiny_model_dir, tiny_backbone, file, damage):
    clean = _record(tree, tiny_model_dir)
    assert clean.shape == (12, 2, 32)
    folder = next((tree / "cache" / "views").glob("*/"))
    {**WHOLE_FILE, **ROW_DAMAGE}[damage](folder / file)
    before = tiny_backbone.counters["images_encoded"]
    with pytest.warns(UserWarning, match="View-feature cache"):
        again = _record(tree, tiny_model_dir, force=True)
    assert torch.equal(again, clean)  # the run saw exactly the clean features
    if file == "meta.json":  # rewritten; the rows pass their checksums and are kept
        assert tiny_backbone.counters["images_encoded"] == before
    else:  # the damaged rows were encoded again
        assert tiny_backbone.counters["images_encoded"] > before
    cache = _reopen(folder)
    assert cache.verify().size == 0 and cache.missing().size == 0 and cache.complete


def _reopen(folder) -> ViewFeatureCache:
    """The cache in ``folder``, opened without an encoder."""
    meta = json.loads((folder / "meta.json").read_text())
    return ViewFeatureCache.open(folder.parent.parent, meta["parts"], meta["n"], meta["n_views"], meta["dim"])


def test_damaged_row_without_encoder_is_refused(tree, tiny_model_dir):
    _record(tree, tiny_model_dir)
    folder = next((tree / "cache" / "views").glob("*/"))
    ROW_DAMAGE["nan_rows"](folder / "features.npy")
    cache = _reopen(folder)
    assert cache.folder == folder and cache.row(0).shape == (2, 32)  # undamaged rows are served
    with pytest.warns(UserWarning, match="4 damaged row"), pytest.raises(CorruptFileError, match="no encoder"):
        cache.row(3)


def test_cache_of_an_older_format_is_rebuilt(tmp_path):
    cache = ViewFeatureCache.open(tmp_path, {"k": 1}, 4, 2, 3)
    cache.write([0, 1, 2, 3], torch.ones(4, 2, 3))
    meta = json.loads((cache.folder / "meta.json").read_text())
    (cache.folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    np.save(cache.folder / "written.npy", np.ones(4, np.uint8))  # format 1: a uint8 mask without checksums
    with pytest.warns(UserWarning, match="cache format 1; this version reads format 2"):
        again = ViewFeatureCache.open(tmp_path, {"k": 1}, 4, 2, 3)
    assert again.missing().tolist() == [0, 1, 2, 3]


def test_cache_refuses_to_store_non_finite_features(tree, tmp_path):
    cache = ViewFeatureCache.open(tmp_path, {"k": 1}, 4, 2, 3)
    with pytest.raises(RuntimeError, match="non-finite"):
        cache.write([1], torch.full((1, 2, 3), float("nan")))
    assert cache.missing().tolist() == [0, 1, 2, 3]


# ---- text-embedding cache (FrozenCLIP cache_dir) -----------------------------------------------------------------
def _in_tensor_data(fill):
    """Overwrite the middle of the stored tensor's bytes (the zip container and pickle stay valid)."""
    def damage(path, tensor):
        raw = bytearray(path.read_bytes())
        data = tensor.numpy().tobytes()
        start = raw.find(data) + 64
        raw[start:start + 64] = fill(64)
        path.write_bytes(bytes(raw))
    return damage


TEXT_DAMAGE = {**{name: (lambda f: lambda path, tensor: f(path))(f) for name, f in WHOLE_FILE.items()},
               "zero_data": _in_tensor_data(bytes),
               "nan_data": _in_tensor_data(lambda n: np.full(n // 4, np.nan, np.float32).tobytes()),
               "garbage_data": _in_tensor_data(RNG.bytes)}


@pytest.mark.parametrize("damage", list(TEXT_DAMAGE))
def test_damaged_text_cache_is_rebuilt_never_used(tiny_model_dir, tmp_path, damage):
    classes = ["apple", "pear", "plum"]
    expected = FrozenCLIP(tiny_model_dir, None, "cpu", cache_dir=tmp_path).class_embeddings(classes)
    (path,) = tmp_path.glob("*.pt")
    TEXT_DAMAGE[damage](path, expected)
    backbone = FrozenCLIP(tiny_model_dir, None, "cpu", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="corrupt embedding cache"):
        got = backbone.class_embeddings(classes)
    assert torch.equal(got, expected) and backbone.counters["texts_encoded"] == 3
    reloaded = FrozenCLIP(tiny_model_dir, None, "cpu", cache_dir=tmp_path)
    assert torch.equal(reloaded.class_embeddings(classes), expected)  # the rebuilt file is good
    assert reloaded.counters["texts_encoded"] == 0


def test_text_cache_entry_of_an_older_format_is_replaced(tiny_model_dir, tmp_path):
    import warnings

    expected = FrozenCLIP(tiny_model_dir, None, "cpu", cache_dir=tmp_path).class_embeddings(["a", "b"])
    (path,) = tmp_path.glob("*.pt")
    entry = torch.load(path, weights_only=True)
    torch.save({"format": 1, "key": entry["key"], "tensor": torch.zeros_like(expected)}, path)  # no checksum
    backbone = FrozenCLIP(tiny_model_dir, None, "cpu", cache_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an outdated entry is no damage: replaced quietly
        assert torch.equal(backbone.class_embeddings(["a", "b"]), expected)
    assert torch.load(path, weights_only=True)["format"] == 2


# ---- DiffTPT's diffusion image cache -----------------------------------------------------------------------------
def _valid_png_of_other_size(path):
    from PIL import Image

    Image.new("RGB", (5, 7), (1, 2, 3)).save(path, format="PNG")


def _garbage_middle(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3:len(raw) // 3 + 40] = RNG.bytes(40)
    path.write_bytes(bytes(raw))


PNG_DAMAGE = {**WHOLE_FILE, "garbage_middle": _garbage_middle, "other_size": _valid_png_of_other_size}


@pytest.mark.parametrize("damage", list(PNG_DAMAGE))
def test_damaged_diffusion_image_is_regenerated_never_used(tmp_path, damage):
    pipe = FakePipeline()
    views = DiffusionViews(VariationGenerator(pipe, name="fake"), tmp_path)
    clean = views.get(pixels(), 4, seed=2)
    PNG_DAMAGE[damage](views.folder(pixels(), 2) / "0001.png")
    with pytest.warns(UserWarning, match=r"1 damaged variation\(s\) \[1\]"):
        again = views.get(pixels(), 4, seed=2)
    assert torch.equal(again, clean) and pipe.generated == 5  # only the damaged one was made again


class _OfflinePipeline:
    def __call__(self, **kwargs):
        raise RuntimeError("Could not load the diffusion pipeline (offline)")


def test_damaged_diffusion_image_without_pipeline_is_refused(tmp_path):
    DiffusionViews(VariationGenerator(FakePipeline(), name="fake"), tmp_path).get(pixels(), 3)
    offline = DiffusionViews(VariationGenerator(_OfflinePipeline(), name="fake"), tmp_path)
    assert offline.get(pixels(), 3).shape == (3, 3, 12, 12)  # a complete cache needs no pipeline
    garbage(offline.folder(pixels(), 0) / "0002.png")
    with pytest.warns(UserWarning, match="damaged"), pytest.raises(RuntimeError, match="offline"):
        offline.get(pixels(), 3)


# ---- features files (--features) ---------------------------------------------------------------------------------
def _features(path, **changes):
    torch.manual_seed(0)
    data = {"image_features": torch.randn(6, 8), "labels": torch.arange(6) % 3, "text_features": torch.randn(3, 8),
            **changes}
    torch.save(data, path)
    return path


def _nan_rows(path):
    image = torch.randn(6, 8)
    image[[1, 4]] = float("nan")
    _features(path, image_features=image)


def _zero_rows(path):
    image = torch.randn(6, 2, 8)
    image[3] = 0
    _features(path, image_features=image)


FEATURE_DAMAGE = {**WHOLE_FILE, "malicious_pickle": malicious, "nan_rows": _nan_rows, "zero_rows": _zero_rows,
                  "nan_text": lambda path: _features(path, text_features=torch.full((3, 8), float("nan"))),
                  "not_a_tensor": lambda path: _features(path, image_features=[[0.1] * 8] * 6)}


@pytest.mark.parametrize("damage", list(FEATURE_DAMAGE))
def test_damaged_features_file_is_refused_in_one_line(tmp_path, capsys, damage):
    path = _features(tmp_path / "feats.pt")
    assert len(load_features_file(path)) == 6
    FEATURE_DAMAGE[damage](path)
    with pytest.raises(CorruptFileError):
        load_features_file(path)
    code = main(["bench", "--features", str(path), "--methods", "zeroshot", "--results", str(tmp_path / "results"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vlmtta: error: ") and err.count("\n") == 1 and str(path) in err
    assert "this must never run" not in capsys.readouterr().out
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").glob("*.json"))


def test_load_torch_file_stays_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    malicious(path)
    with pytest.raises(CorruptFileError, match="weights-only unpickler"):
        load_torch_file(path, "test file")
    with pytest.raises(FileNotFoundError):
        load_torch_file(tmp_path / "absent.pt")


# ---- backbone checkpoints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """A named open_clip architecture as small as the test model (so a checkpoint file can be given as pretrained)."""
    folder = tmp_path_factory.mktemp("arch")
    (folder / "vlmtta-test-tiny.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    good = folder / "good.pt"
    torch.save(open_clip.CLIP(**TINY_CONFIG).state_dict(), good)
    return "vlmtta-test-tiny", good


CHECKPOINT_DAMAGE = {**WHOLE_FILE, "malicious_pickle": malicious}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_checkpoint_file_is_one_line(tiny_arch, tmp_path, capsys, rgb_image, damage):
    arch, good = tiny_arch
    assert FrozenCLIP(arch, str(good), "cpu").embed_dim == 32
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes())
    CHECKPOINT_DAMAGE[damage](bad)
    with pytest.raises(CorruptFileError, match="Cannot load weights"):
        FrozenCLIP(arch, str(bad), "cpu")
    rgb_image.save(tmp_path / "img.png")
    code = main(["predict", str(tmp_path / "img.png"), "--classes", "a,b", "--model", arch, "--pretrained", str(bad),
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vlmtta: error: Cannot load weights") and err.count("\n") == 1


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_damaged_local_dir_weights_are_one_line(tmp_path, damage):
    torch.manual_seed(0)
    spec = write_model_dir(tmp_path / "model", state_dict=open_clip.CLIP(**TINY_CONFIG).state_dict())
    CHECKPOINT_DAMAGE[damage](tmp_path / "model" / "open_clip_pytorch_model.bin")
    with pytest.raises(CorruptFileError, match="Cannot load weights"):
        FrozenCLIP(spec, None, "cpu")


@pytest.mark.parametrize("error", [pickle.UnpicklingError("invalid load key, '\\x00'."), EOFError(),
                                   RuntimeError("PytorchStreamReader failed reading zip archive: failed finding "
                                                "central directory")])
def test_damaged_downloaded_weights_are_one_line(monkeypatch, error):
    def damaged_download(*args, **kwargs):
        raise error

    monkeypatch.setattr(open_clip, "create_model", damaged_download)
    with pytest.raises(CorruptFileError, match="cached download looks damaged") as caught:
        FrozenCLIP("ViT-B-32", "openai", "cpu")
    assert "\n" not in str(caught.value)
