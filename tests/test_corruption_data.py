"""Corruption benchmarks on synthetic trees: ImageNet-C folders, CIFAR-10/100-C .npy arrays, keys and `data check`."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data_trees import fake_wnid, write_jpeg

from vlmtta.cli import main
from vlmtta.data import CORRUPTIONS, DatasetNotFound, check_dataset, get_spec, parse_datasets, read_split
from vlmtta.images import load_image
from vlmtta.prompts import dataset_classnames


def imagenet_c_tree(root: Path, corruption: str, severity: int, classes: list[int], folder: str = "imagenet-c",
                    listing: bool = False, all_folders: bool = True) -> Path:
    """``<root>/<folder>/<corruption>/<severity>/<wnid>/*.JPEG``, one image per ImageNet index in ``classes``."""
    domain = root / folder / corruption / str(severity)
    for index in classes:
        write_jpeg(domain / fake_wnid(index) / f"ILSVRC2012_val_{index:08d}.JPEG", seed=index)
    for index in range(1000) if all_folders else ():
        (domain / fake_wnid(index)).mkdir(parents=True, exist_ok=True)
    if listing:
        (root / folder / "classnames.txt").write_text("".join(f"{fake_wnid(k)} class {k}\n" for k in range(1000)))
    return domain


def cifar_c_tree(root: Path, corruptions: tuple[str, ...] = ("fog", "snow"), per_severity: int = 4,
                 n_classes: int = 10, folder: str = "CIFAR-10-C") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The .npy release in miniature: ``<corruption>.npy`` uint8 [5 N, 32, 32, 3] and ``labels.npy`` [5 N]."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, n_classes, per_severity)
    labels = np.tile(base, 5).astype(np.int64)  # as released: the same test labels for every severity
    arrays = {}
    (root / folder).mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(corruptions):
        arrays[name] = rng.integers(0, 256, (5 * per_severity, 32, 32, 3), dtype=np.uint8)
        arrays[name][:, 0, 0, 0] = np.arange(5 * per_severity) + 50 * k  # row marker
        np.save(root / folder / f"{name}.npy", arrays[name])
    np.save(root / folder / "labels.npy", labels)
    return arrays, labels


def test_keys_groups_and_severities():
    assert parse_datasets("imagenet_c") == [f"imagenet_c:{c}:5" for c in CORRUPTIONS]  # release order, severity 5
    assert len(CORRUPTIONS) == 15 and len(parse_datasets("cifar100_c", "all")) == 75
    assert parse_datasets("cifar10_c:fog,imagenet_c:snow:2,eurosat", "3,1") == [
        "cifar10_c:fog:3", "cifar10_c:fog:1", "imagenet_c:snow:2", "eurosat"]  # explicit keys ignore the filter
    spec = get_spec("imagenet_c:fog:3")
    assert spec.folders == ("imagenet-c/fog/3", "ImageNet-C/fog/3") and spec.test_count == 50000
    assert (spec.clean_key, spec.family, spec.default_augmentation, spec.template_set) == (
        "imagenet", "imagenet", "rrc_flip", "tda:imagenet")
    cifar = get_spec("cifar100_c:speckle_noise:1")  # one of the release's 4 extra corruptions
    assert cifar.classnames == dataset_classnames("cifar100") and cifar.template_set == "cifar18"
    assert cifar.family == "cifar" and cifar.default_augmentation == "augmix" and cifar.test_count == 10000
    for bad, message in (("imagenet_c:fogg:3", "unknown corruption 'fogg'"), ("imagenet_c:fog:6", "Severity '6'"),
                         ("imagenet_c:fog", "names no severity"), ("imagenet-c", "imagenet_c:<corruption>")):
        with pytest.raises(ValueError, match=message):
            get_spec(bad)
    with pytest.raises(ValueError, match="Severity 'x'"):
        parse_datasets("imagenet_c", "5,x")


def test_imagenet_c_labels_from_sorted_wnids_or_listing(tmp_path):
    imagenet_c_tree(tmp_path, "fog", 3, [2, 999, 500])
    split = read_split("imagenet_c:fog:3", tmp_path)
    assert split.labels == [2, 500, 999] and split.layout == "release" and len(split.classnames) == 1000
    assert split.paths[0].name == "ILSVRC2012_val_00000002.JPEG" and split.rows is None
    assert split.image(1) == split.paths[1]
    imagenet_c_tree(tmp_path / "b", "snow", 5, [7, 3], folder="ImageNet-C", listing=True, all_folders=False)
    assert read_split("imagenet_c:snow:5", tmp_path / "b").labels == [3, 7]  # classnames.txt in ImageNet-C/
    with pytest.raises(DatasetNotFound, match="imagenet-c/snow/4.*ImageNet-C/snow/4"):
        read_split("imagenet_c:snow:4", tmp_path)


def test_cifar_c_rows_of_the_severity(tmp_path):
    arrays, labels = cifar_c_tree(tmp_path)
    split = read_split("cifar10_c:snow:3", tmp_path)
    assert split.rows == [8, 9, 10, 11] and split.labels == labels[8:12].tolist() and split.layout == "release"
    assert split.relative_paths() == [f"snow.npy[{row}]" for row in range(8, 12)]
    assert np.array_equal(split.image(2), arrays["snow"][10]) and np.array_equal(split.images[0], arrays["snow"][8])
    pixels = load_image(split.image(0))  # what the runner encodes: uint8 [3, 32, 32]
    assert pixels.shape == (3, 32, 32) and int(pixels[0, 0, 0]) == 50 + 8
    assert read_split("cifar10_c:fog:1", tmp_path).rows == [0, 1, 2, 3]


def test_cifar_c_errors(tmp_path):
    cifar_c_tree(tmp_path)
    with pytest.raises(DatasetNotFound, match="frost.npy is missing"):
        read_split("cifar10_c:frost:5", tmp_path)
    with pytest.raises(DatasetNotFound, match="CIFAR-100-C"):
        read_split("cifar100_c:fog:5", tmp_path)
    np.save(tmp_path / "CIFAR-10-C" / "labels.npy", np.zeros(19, dtype=np.int64))
    with pytest.raises(ValueError, match="expected 20 integer labels"):
        read_split("cifar10_c:fog:5", tmp_path)
    np.save(tmp_path / "CIFAR-10-C" / "labels.npy", np.full(20, 10))
    with pytest.raises(ValueError, match="outside the 10 classes"):
        read_split("cifar10_c:fog:5", tmp_path)
    np.save(tmp_path / "CIFAR-10-C" / "fog.npy", np.zeros((20, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="expected uint8"):
        read_split("cifar10_c:fog:5", tmp_path)
    (tmp_path / "CIFAR-10-C" / "fog.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        read_split("cifar10_c:fog:5", tmp_path)


def test_data_check_on_corruption_benchmarks(tmp_path, capsys):
    cifar_c_tree(tmp_path)
    imagenet_c_tree(tmp_path, "fog", 5, [1, 2])
    report = check_dataset("cifar10_c:fog:2", tmp_path)
    assert (report.status, report.found, report.expected) == ("partial", 4, 10000)
    assert check_dataset("imagenet_c:fog:5", tmp_path).found == 2
    args = ["data", "check", "--root", str(tmp_path), "--allow-partial"]
    assert main([*args, "--datasets", "cifar10_c:fog,cifar10_c:snow,imagenet_c:fog", "--severity", "5"]) == 0
    out = capsys.readouterr().out
    assert "cifar10_c:fog:5                partial       4 / 10000" in out and "release layout" in out
    assert main([*args, "--datasets", "cifar10_c", "--severity", "all"]) == 1  # 13 corruptions x 5 missing
    captured = capsys.readouterr()
    statuses = [line.split()[1] for line in captured.out.splitlines()]
    assert statuses.count("partial") == 10 and statuses.count("missing") == 65
    assert "cifar10_c:gaussian_noise:1" in captured.err
