"""Dataset readers on synthetic mini trees (tiny JPEGs) in the CoOp and the TPT layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtta.data import DATASETS, DatasetNotFound, parse_datasets, read_split
from vlmtta.data.readers import imagenet_masks
from vlmtta.prompts import dataset_classnames


def write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (10 + seed % 5, 12, 3), dtype=np.uint8), "RGB").save(path, quality=80)


def fake_wnid(index: int) -> str:
    return f"n{index:08d}"  # sorts like the ImageNet index, as real wnids do


def coop_tree(root: Path, key: str = "eurosat", per_class: int = 2, n_classes: int = 4, tpt: bool = False,
              broken: bool = False, missing: bool = False) -> list[tuple[str, int]]:
    """A CoOp split JSON + images for ``key``; TPT layout puts the JSON in ``<root>/data_splits``."""
    spec = DATASETS[key]
    folder = root / spec.folders[1 if tpt else 0]
    test = []
    for label in range(n_classes):
        for k in range(per_class):
            rel = f"class{label}/img{k}.jpg"
            test.append([rel, label, dataset_classnames(key)[label]])
            write_jpeg(folder / spec.image_dir / rel, seed=label * 10 + k)
    if broken:
        (folder / spec.image_dir / test[0][0]).write_bytes(b"not a jpeg")
    if missing:
        test.append(["class0/missing.jpg", 0, dataset_classnames(key)[0]])
    json_dir = root / "data_splits" if tpt else folder
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / spec.split_file).write_text(json.dumps({"train": [], "val": [], "test": test}))
    return [(rel, label) for rel, label, _ in test]


def aircraft_tree(root: Path) -> None:
    folder = root / "fgvc_aircraft"
    folder.mkdir(parents=True)
    names = dataset_classnames("fgvc_aircraft")
    (folder / "variants.txt").write_text("\n".join(names) + "\n")
    (folder / "images_variant_test.txt").write_text(f"0001 {names[0]}\n0002 {names[57]}\n")
    for k, name in enumerate(("0001", "0002")):
        write_jpeg(folder / "images" / f"{name}.jpg", seed=k)


def imagenet_tree(root: Path, key: str, classes: list[int], coop: bool, listing: bool, all_folders: int = 0) -> Path:
    """Folders of ``key`` holding one image for each ImageNet index in ``classes``."""
    folder = root / DATASETS[key].folders[0 if coop else 1]
    for index in classes:
        name = str(index) if key == "imagenet_v2" else fake_wnid(index)
        write_jpeg(folder / name / "a.jpg", seed=index)
    extra = imagenet_masks()[key] if all_folders == 200 else range(all_folders)
    for index in extra:
        (folder / fake_wnid(index)).mkdir(parents=True, exist_ok=True)
    if listing:
        (folder.parent / "classnames.txt").write_text("".join(f"{fake_wnid(k)} class {k}\n" for k in range(1000)))
    return folder


def test_coop_and_tpt_layouts(tmp_path):
    expected = coop_tree(tmp_path, "eurosat")
    split = read_split("eurosat", tmp_path)
    assert split.layout == "coop" and split.labels == [label for _, label in expected]
    assert split.paths[0] == tmp_path / "eurosat" / "2750" / "class0" / "img0.jpg"
    coop_tree(tmp_path, "dtd", tpt=True)
    split = read_split("dtd", tmp_path)
    assert split.layout == "tpt" and split.folder == tmp_path / "DTD" and split.classnames == dataset_classnames("dtd")
    assert all(path.is_file() for path in split.paths)


def test_aircraft_labels_come_from_variants(tmp_path):
    aircraft_tree(tmp_path)
    split = read_split("fgvc_aircraft", tmp_path)
    assert split.labels == [0, 57] and split.paths[1].name == "0002.jpg"


def test_imagenet_a_sorted_folders_give_mask_positions(tmp_path):
    mask = imagenet_masks()["imagenet_a"]
    imagenet_tree(tmp_path, "imagenet_a", [mask[3], mask[150]], coop=False, listing=False, all_folders=200)
    split = read_split("imagenet_a", tmp_path)
    assert split.layout == "tpt" and split.labels == [3, 150] and len(split.classnames) == 200


def test_imagenet_r_and_val_from_classnames_txt(tmp_path):
    mask = imagenet_masks()["imagenet_r"]
    imagenet_tree(tmp_path, "imagenet_r", [mask[5], mask[0]], coop=True, listing=True)
    assert read_split("imagenet_r", tmp_path).labels == [0, 5]
    imagenet_tree(tmp_path, "imagenet", [7, 999], coop=True, listing=True)
    split = read_split("imagenet", tmp_path)
    assert split.labels == [7, 999] and split.folder == tmp_path / "imagenet" / "images" / "val"


def test_imagenet_v2_uses_int_folder_names(tmp_path):
    imagenet_tree(tmp_path, "imagenet_v2", [2, 10, 100], coop=False, listing=False)
    assert read_split("imagenet_v2", tmp_path).labels == [2, 10, 100]  # a string sort would give 10 < 100 < 2


def test_sketch_needs_all_folders_or_a_listing(tmp_path):
    imagenet_tree(tmp_path, "imagenet_sketch", [1, 998], coop=False, listing=False)
    with pytest.raises(DatasetNotFound, match="classnames.txt"):
        read_split("imagenet_sketch", tmp_path)
    imagenet_tree(tmp_path, "imagenet_sketch", [], coop=False, listing=False, all_folders=1000)
    assert read_split("imagenet_sketch", tmp_path).labels == [1, 998]


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetNotFound, match="caltech-101"):
        read_split("caltech101", tmp_path)
    (tmp_path / "caltech-101").mkdir()
    with pytest.raises(DatasetNotFound, match="split_zhou_Caltech101.json"):
        read_split("caltech101", tmp_path)
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet-a'"):
        parse_datasets("imagenet-a")
    assert len(parse_datasets("cross_domain")) == 10 and parse_datasets("imagenet_variants")[0] == "imagenet"
