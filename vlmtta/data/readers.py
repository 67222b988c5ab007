"""Readers of the benchmark test splits: a list of (image path, label) in the dataset's canonical order.

Labels follow the shipped class lists of ``vlmtta.prompts`` (``dataset_classnames``):

* CoOp sets: the integer label of each ``[path, label, classname]`` triple of ``split_zhou_*.json``;
* FGVC-Aircraft: the line of the variant in ``variants.txt``;
* ImageNet val / -Sketch (wnid folders): the ImageNet index of the wnid, read from the dataset's own
  ``classnames.txt`` (CoOp layout: ``<wnid> <name>`` per line, in ImageNet order) when present, else
  the rank of the folder among the 1000 sorted wnid folders (sorted wnids = ImageNet index order);
* ImageNet-A / -R: the position of that ImageNet index in the 200-class mask (``imagenet_masks.json``),
  i.e. the rank among the 200 sorted wnid folders;
* ImageNet-V2: ``int(folder name)`` (folders ``0``..``999`` are ImageNet indices; not a string sort);
* ImageNet-C: as ImageNet val, in each ``<corruption>/<severity>/`` folder (``classnames.txt`` may sit in
  the ``imagenet-c/`` folder);
* CIFAR-10-C / -100-C (``.npy`` release): ``labels.npy`` [5 N] next to ``<corruption>.npy`` uint8 [5 N, 32, 32, 3],
  whose rows ``(severity - 1) N .. severity N - 1`` are severity ``severity``; the images are rows, not files
  (``Split.image``).
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from .catalog import SEVERITIES, DatasetSpec, get_spec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_WNID = re.compile(r"n\d{8}")


class DatasetNotFound(FileNotFoundError):
    """A dataset folder or one of its index files is missing."""


@dataclass(frozen=True)
class Split:
    """The test split of one dataset as found under a data root."""

    key: str
    folder: Path  # the dataset folder that was found
    layout: str  # "coop" or "tpt" (which candidate folder matched)
    paths: list[Path]  # the file of each image (array datasets: the .npy file holding it)
    labels: list[int]
    classnames: list[str]
    rows: list[int] | None = None  # array datasets: image i is row rows[i] of the [N, H, W, 3] array in paths[i]

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Path | np.ndarray:
        """What ``vlmtta.images.load_image`` reads for image ``index``: its file, or its HxWx3 row of an array."""
        if self.rows is None:
            return self.paths[index]
        return load_array(self.paths[index])[self.rows[index]]

    @property
    def images(self) -> Sequence[Path | np.ndarray]:
        """Every image as ``image(i)`` gives it, indexable lazily (arrays stay memory-mapped)."""
        return self.paths if self.rows is None else _Images(self)

    def relative_paths(self) -> list[str]:
        """Stable names of the images (file paths relative to the folder; ``file.npy[row]`` for array rows)."""
        names = [str(path.relative_to(self.folder)) for path in self.paths]
        return names if self.rows is None else [f"{name}[{row}]" for name, row in zip(names, self.rows)]


class _Images(Sequence):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return self.split.image(index)


def find_folder(spec: DatasetSpec, root: str | Path) -> tuple[Path, str]:
    """The dataset folder under ``root`` and its layout name; ``DatasetNotFound`` names every candidate."""
    root = Path(root).expanduser()
    for folder, layout in zip(spec.folders, spec.layouts):
        if (root / folder).is_dir():
            return root / folder, layout
    raise DatasetNotFound(f"{spec.key}: no folder {' or '.join(repr(str(root / f)) for f in spec.folders)} "
                          "(see datasets/DATASETS.md).")


def read_split(key: str, root: str | Path, splits_dir: str | Path | None = None) -> Split:
    """The test split of dataset ``key`` under ``root`` (files are listed, not opened)."""
    spec = get_spec(key)
    folder, layout = find_folder(spec, root)
    classnames, rows = spec.classnames, None
    if spec.reader == "npy_arrays":
        paths, labels, rows = _npy_arrays(spec, folder)
    else:
        if spec.reader == "coop_split":
            pairs = _coop_split(spec, folder, Path(root).expanduser(), splits_dir)
        else:
            readers = {"aircraft": _aircraft, "wnid_folders": _wnid_folders, "index_folders": _index_folders}
            pairs = readers[spec.reader](spec, folder)
        paths, labels = [p for p, _ in pairs], [lab for _, lab in pairs]
    bad = sorted({label for label in labels if not 0 <= label < len(classnames)})
    if bad:
        raise ValueError(f"{key}: labels {bad[:5]} fall outside the {len(classnames)} classes of {key}.")
    return Split(key, folder, layout, paths, labels, classnames, rows)


def split_file(spec: DatasetSpec, folder: Path, root: Path, splits_dir: str | Path | None = None) -> Path:
    """Where ``split_zhou_*.json`` is: the dataset folder, ``splits_dir``, ``<root>/data_splits`` or ``<root>``."""
    candidates = [folder / spec.split_file] + ([Path(splits_dir) / spec.split_file] if splits_dir else [])
    candidates += [root / "data_splits" / spec.split_file, root / spec.split_file]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetNotFound(f"{spec.key}: {spec.split_file} not found; looked in "
                          f"{', '.join(str(p.parent) for p in candidates)}.")


def _coop_split(spec: DatasetSpec, folder: Path, root: Path, splits_dir: str | Path | None) -> list[tuple[Path, int]]:
    path = split_file(spec, folder, root, splits_dir)
    try:
        test = json.loads(path.read_text("utf-8"))["test"]
        entries = [(str(rel), int(label)) for rel, label, *_ in test]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: expected {{'test': [[relative_path, label, classname], ...]}} ({error}).") from error
    return [(_inside(folder / spec.image_dir, rel, path), label) for rel, label in entries]


def _inside(base: Path, relative: str, index_file: Path) -> Path:
    """``base / relative``, refusing absolute paths and ``..`` (an index file must not point outside its dataset)."""
    parts = Path(relative.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts:
        raise ValueError(f"{index_file}: entry {relative!r} is an absolute path or contains '..'; split entries "
                         "must be paths inside the dataset folder.")
    return base / parts


def _aircraft(spec: DatasetSpec, folder: Path) -> list[tuple[Path, int]]:
    variants_file, test_file = folder / "variants.txt", folder / "images_variant_test.txt"
    for path in (variants_file, test_file):
        if not path.is_file():
            raise DatasetNotFound(f"{spec.key}: {path} is missing.")
    variants = [line.strip() for line in variants_file.read_text("utf-8").splitlines() if line.strip()]
    index = {name: k for k, name in enumerate(variants)}
    pairs = []
    for line in filter(None, (line.strip() for line in test_file.read_text("utf-8").splitlines())):
        name, _, variant = line.partition(" ")
        if variant not in index:
            raise ValueError(f"{test_file}: variant {variant!r} of image {name} is not in variants.txt.")
        pairs.append((_inside(folder / spec.image_dir, f"{name}.jpg", test_file), index[variant]))
    return pairs


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _index_folders(spec: DatasetSpec, folder: Path) -> list[tuple[Path, int]]:
    classes = sorted((d for d in folder.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
    if not classes:
        raise DatasetNotFound(f"{spec.key}: {folder} holds no class folders named 0..999.")
    return [(path, int(d.name)) for d in classes for path in _images(d)]


@lru_cache(maxsize=1)
def imagenet_masks() -> dict[str, list[int]]:
    """ImageNet index of each of the 200 classes of ImageNet-A and -R (label order)."""
    data = json.loads(resources.files("vlmtta.prompt_files").joinpath("imagenet_masks.json").read_text("utf-8"))
    return {key: data[key] for key in ("imagenet_a", "imagenet_r")}


def wnid_order(spec: DatasetSpec, folder: Path) -> tuple[dict[str, int], str]:
    """wnid -> label for a wnid-folder dataset, and where the order came from."""
    wnids = sorted(d.name for d in folder.iterdir() if d.is_dir() and _WNID.fullmatch(d.name))
    n_classes = 200 if spec.key in ("imagenet_a", "imagenet_r") else 1000
    listing = _classnames_txt(folder)
    if listing is not None:
        imagenet = {wnid: k for k, wnid in enumerate(_read_wnids(listing))}
        unknown = [w for w in wnids if w not in imagenet]
        if unknown:
            raise ValueError(f"{spec.key}: folders {unknown[:3]} are not listed in {listing}.")
        if n_classes == 1000:
            return imagenet, str(listing)
        mask = {index: k for k, index in enumerate(imagenet_masks()[spec.key])}
        outside = [w for w in wnids if imagenet[w] not in mask]
        if outside:
            raise ValueError(f"{spec.key}: folders {outside[:3]} are not among its 200 classes.")
        return {w: mask[imagenet[w]] for w in imagenet if imagenet[w] in mask}, str(listing)
    if len(wnids) != n_classes:
        raise DatasetNotFound(f"{spec.key}: {folder} holds {len(wnids)} wnid folders, expected {n_classes}; the class "
                              "index of a wnid cannot be inferred from an incomplete set. Put ImageNet's classnames.txt "
                              "('<wnid> <name>' per line, ImageNet order) next to the folders (see datasets/DATASETS.md).")
    return {wnid: k for k, wnid in enumerate(wnids)}, "sorted wnid folders"


def _classnames_txt(folder: Path) -> Path | None:
    for candidate in (folder, folder.parent, folder.parent.parent):
        if (candidate / "classnames.txt").is_file():
            return candidate / "classnames.txt"
    return None


def _read_wnids(path: Path) -> list[str]:
    wnids = [line.split()[0] for line in path.read_text("utf-8").splitlines() if line.strip()]
    if len(wnids) != 1000 or not all(_WNID.fullmatch(w) for w in wnids):
        raise ValueError(f"{path}: expected 1000 lines '<wnid> <class name>' in ImageNet order, got {len(wnids)}.")
    return wnids


def _wnid_folders(spec: DatasetSpec, folder: Path) -> list[tuple[Path, int]]:
    order, _ = wnid_order(spec, folder)
    folders = sorted((d for d in folder.iterdir() if d.is_dir() and d.name in order), key=lambda d: order[d.name])
    return [(path, order[d.name]) for d in folders for path in _images(d)]


def load_array(path: Path) -> np.ndarray:
    """The ``.npy`` array in ``path``, memory-mapped read-only (opened once per process and file version)."""
    stat = path.stat()
    return _memory_map(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _memory_map(path: Path, mtime_ns: int, size: int) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npy array ({error}).") from error


def _npy_arrays(spec: DatasetSpec, folder: Path) -> tuple[list[Path], list[int], list[int]]:
    """CIFAR-10-C style: the rows of ``<corruption>.npy`` that hold ``spec.severity``, and their ``labels.npy``."""
    images_file, labels_file = folder / f"{spec.corruption}.npy", folder / "labels.npy"
    for path in (images_file, labels_file):
        if not path.is_file():
            raise DatasetNotFound(f"{spec.key}: {path} is missing.")
    images, labels = load_array(images_file), load_array(labels_file)
    levels = len(SEVERITIES)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images) or len(images) % levels:
        raise ValueError(f"{images_file}: expected uint8 [{levels} * N, H, W, 3] (N images per severity 1..{levels}), "
                         f"got {images.dtype} {list(images.shape)}.")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise ValueError(f"{labels_file}: expected {len(images)} integer labels (one per row of {images_file.name}), "
                         f"got {labels.dtype} {list(labels.shape)}.")
    per = len(images) // levels
    rows = list(range((spec.severity - 1) * per, spec.severity * per))
    return [images_file] * per, [int(label) for label in labels[rows[0]:rows[-1] + 1]], rows
