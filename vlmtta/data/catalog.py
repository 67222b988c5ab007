"""The benchmark datasets: where each one lives under a data root and how its test split is read.

Two folder conventions are accepted for every dataset (the first folder found wins):

* the CoOp ``DATASETS.md`` layout (TDA family): ``<root>/caltech-101/``, ``<root>/imagenet/images/val``, ...
  with each ``split_zhou_*.json`` inside its dataset folder;
* the TPT root layout (TPT family): ``<root>/Caltech101/``, ``<root>/ImageNet/val``, ... whose split
  JSON files live in TPT's ``data/data_splits/``: copy them to ``<root>/data_splits/`` (or pass ``splits_dir``).

Corruption benchmarks are families of keys ``<benchmark>:<corruption>:<severity>`` (e.g.
``imagenet_c:gaussian_noise:5``, ``cifar10_c:fog:3``): ImageNet-C in its release layout
``<root>/imagenet-c/<corruption>/<severity>/<wnid>/*.JPEG`` (or ``ImageNet-C/``), CIFAR-10-C / CIFAR-100-C
as the ``.npy`` release ``<root>/CIFAR-10-C/<corruption>.npy`` + ``labels.npy``.  ``parse_datasets`` expands
``imagenet_c`` (the 15 corruptions) and ``imagenet_c:<corruption>`` over the chosen severities.

See ``datasets/DATASETS.md`` for the downloads and the full trees.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from ..prompts import dataset_classnames, resolve_templates

CROSS_DOMAIN = ("caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
                "stanford_cars", "sun397", "ucf101")
IMAGENET_VARIANTS = ("imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
OOD = ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
READERS = ("coop_split", "aircraft", "wnid_folders", "index_folders", "npy_arrays")
# Hendrycks & Dietterich (ICLR 2019): the 15 benchmark corruptions in the release's (and continual TTA's) order;
# the 4 extra ones of the release are accepted in explicit keys but not expanded by the group keys.
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)
DEFAULT_SEVERITIES = (5,)  # the level TENT, CoTTA, RoTTA and TTAB report


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read the test split of one dataset."""

    key: str  # dataset key of vlmtta.prompts (class names, templates)
    reader: str  # one of READERS
    test_count: int  # images in the published test split
    folders: tuple[str, ...]  # candidate folders under the root: CoOp layout first, then TPT layout
    split_file: str = ""  # CoOp split JSON (coop_split only)
    image_dir: str = ""  # folder inside the dataset folder that split paths are relative to
    base: str = ""  # corrupted sets: the clean dataset whose classes, templates and method settings apply
    corruption: str = ""  # corrupted sets: corruption name and severity 1..5
    severity: int = 0
    layouts: tuple[str, ...] = ("coop", "tpt")  # name of each candidate folder's layout

    @property
    def clean_key(self) -> str:
        """The dataset whose per-dataset settings (method hyperparameters, templates, views) apply."""
        return self.base or self.key

    @property
    def family(self) -> str:
        """``imagenet`` (ImageNet, its variants, ImageNet-C), ``cifar`` (CIFAR-10/100-C) or ``cross_domain``."""
        if self.clean_key in IMAGENET_VARIANTS:
            return "imagenet"
        return "cifar" if self.clean_key in _CIFAR else "cross_domain"

    @property
    def classnames(self) -> list[str]:
        """Class names in label order (ImageNet-V2, -Sketch and -C use the 1000 ImageNet classes)."""
        key = self.clean_key
        return dataset_classnames("imagenet" if key in ("imagenet_v2", "imagenet_sketch") else key)

    @property
    def default_augmentation(self) -> str:
        """View policy of view-based methods (METHODS.md §1.3, TPT): crops+flips on the ImageNet family, else AugMix
        (TPT's fine-grained choice, taken for CIFAR too: TPT has no CIFAR setting)."""
        return "rrc_flip" if self.family == "imagenet" else "augmix"

    @property
    def template_set(self) -> str:
        """Name of the default template set: TDA's per-dataset set (the 'CLIP ensemble' baseline), CLIP's 18 CIFAR
        templates on CIFAR."""
        return _CIFAR.get(self.clean_key, f"tda:{self.clean_key}")

    @property
    def default_templates(self) -> list[str]:
        return resolve_templates(self.template_set)


def _coop(key: str, count: int, coop: str, tpt: str, split: str, image_dir: str) -> DatasetSpec:
    return DatasetSpec(key, "coop_split", count, (coop, tpt), f"split_zhou_{split}.json", image_dir)


DATASETS: dict[str, DatasetSpec] = {spec.key: spec for spec in (
    _coop("caltech101", 2465, "caltech-101", "Caltech101", "Caltech101", "101_ObjectCategories"),
    _coop("dtd", 1692, "dtd", "DTD", "DescribableTextures", "images"),
    _coop("eurosat", 8100, "eurosat", "eurosat", "EuroSAT", "2750"),
    DatasetSpec("fgvc_aircraft", "aircraft", 3333, ("fgvc_aircraft", "fgvc-aircraft-2013b/data"), image_dir="images"),
    _coop("food101", 30300, "food-101", "Food101", "Food101", "images"),
    _coop("oxford_flowers", 2463, "oxford_flowers", "Flower102", "OxfordFlowers", "jpg"),
    _coop("oxford_pets", 3669, "oxford_pets", "OxfordPets", "OxfordPets", "images"),
    _coop("stanford_cars", 8041, "stanford_cars", "StanfordCars", "StanfordCars", ""),
    _coop("sun397", 19850, "sun397", "SUN397", "SUN397", "SUN397"),
    _coop("ucf101", 3783, "ucf101", "UCF101", "UCF101", "UCF-101-midframes"),
    DatasetSpec("imagenet", "wnid_folders", 50000, ("imagenet/images/val", "ImageNet/val")),
    DatasetSpec("imagenet_a", "wnid_folders", 7500, ("imagenet-adversarial/imagenet-a", "imagenet-a")),
    DatasetSpec("imagenet_v2", "index_folders", 10000, ("imagenetv2/imagenetv2-matched-frequency-format-val",
                                                         "imagenetv2-matched-frequency-format-val")),
    DatasetSpec("imagenet_r", "wnid_folders", 30000, ("imagenet-rendition/imagenet-r", "imagenet-r")),
    DatasetSpec("imagenet_sketch", "wnid_folders", 50889, ("imagenet-sketch/images", "ImageNet-Sketch")),
)}


_CIFAR = {"cifar10": "cifar18", "cifar100": "cifar18"}  # clean key -> template set


@dataclass(frozen=True)
class CorruptionBenchmark:
    """A corruption benchmark: one dataset per (corruption, severity), named ``<name>:<corruption>:<severity>``."""

    name: str
    base: str  # the clean dataset (class names, templates, per-dataset method settings)
    reader: str
    per_domain: int  # test images of one (corruption, severity)
    folders: tuple[str, ...]  # candidate folders under the root; ``{corruption}`` / ``{severity}`` are filled in

    def spec(self, corruption: str, severity: int) -> DatasetSpec:
        folders = tuple(f.format(corruption=corruption, severity=severity) for f in self.folders)
        return DatasetSpec(f"{self.name}:{corruption}:{severity}", self.reader, self.per_domain, folders,
                           base=self.base, corruption=corruption, severity=severity,
                           layouts=("release",) * len(folders))


CORRUPTION_BENCHMARKS: dict[str, CorruptionBenchmark] = {b.name: b for b in (
    CorruptionBenchmark("imagenet_c", "imagenet", "wnid_folders", 50000,
                        ("imagenet-c/{corruption}/{severity}", "ImageNet-C/{corruption}/{severity}")),
    CorruptionBenchmark("cifar10_c", "cifar10", "npy_arrays", 10000, ("CIFAR-10-C",)),
    CorruptionBenchmark("cifar100_c", "cifar100", "npy_arrays", 10000, ("CIFAR-100-C",)),
)}
GROUPS = {"cross_domain": CROSS_DOMAIN, "imagenet_variants": IMAGENET_VARIANTS}


def get_spec(key: str) -> DatasetSpec:
    """The spec of dataset ``key`` (or ``<benchmark>:<corruption>:<severity>``); a clear error otherwise."""
    if key in DATASETS:
        return DATASETS[key]
    name, _, rest = key.partition(":")
    if name in CORRUPTION_BENCHMARKS:
        corruption, _, severity = rest.partition(":")
        if not severity:
            raise ValueError(f"Dataset {key!r} names no severity; write {name}:<corruption>:<1..5> (or use it in "
                             "--datasets, where the severity filter expands it).")
        return _corrupted_spec(name, _corruption(key, corruption), _severity(severity))
    raise ValueError(f"Unknown dataset {key!r}; accepted: {', '.join(DATASETS)}, "
                     f"{', '.join(f'{b}:<corruption>:<severity>' for b in CORRUPTION_BENCHMARKS)} (groups: all, "
                     f"{', '.join(GROUPS)}, {', '.join(CORRUPTION_BENCHMARKS)}).")


@lru_cache(maxsize=None)
def _corrupted_spec(name: str, corruption: str, severity: int) -> DatasetSpec:
    return CORRUPTION_BENCHMARKS[name].spec(corruption, severity)


def _corruption(key: str, corruption: str) -> str:
    if corruption not in CORRUPTIONS + EXTRA_CORRUPTIONS:
        raise ValueError(f"{key}: unknown corruption {corruption!r}; accepted: {', '.join(CORRUPTIONS)} "
                         f"(and the release's extra {', '.join(EXTRA_CORRUPTIONS)}).")
    return corruption


def _severity(text: str | int) -> int:
    text = str(text).strip()
    if not text.isdigit() or int(text) not in SEVERITIES:
        raise ValueError(f"Severity {text!r} is not one of {', '.join(map(str, SEVERITIES))} (or 'all').")
    return int(text)


def parse_severities(text: str | int | Iterable[int] | None) -> tuple[int, ...]:
    """``None`` -> ``DEFAULT_SEVERITIES`` (5); ``"all"`` -> 1..5; ``"3,5"`` / ``[3, 5]`` / ``3`` -> those levels."""
    if text is None or text == "":
        return DEFAULT_SEVERITIES
    if text == "all":
        return SEVERITIES
    items = str(text).split(",") if isinstance(text, (str, int)) else list(text)
    return tuple(dict.fromkeys(_severity(item) for item in items))


def parse_datasets(text: str | None, severities: str | Iterable[int] | None = None) -> list[str]:
    """Dataset keys of a ``--datasets`` value, in the order given (duplicates dropped).

    ``None``/``all`` -> the 15 image-folder datasets; ``cross_domain`` / ``imagenet_variants`` -> that family;
    ``imagenet_c`` (``cifar10_c``, ``cifar100_c``) -> its 15 corruptions in the release's order, each at every
    level of ``severities`` (``parse_severities``: default 5); ``imagenet_c:<corruption>`` -> that corruption at
    those levels; ``imagenet_c:<corruption>:<severity>`` and the other keys are taken as written.
    """
    if text in (None, "", "all"):
        return list(DATASETS)
    levels = parse_severities(severities)
    keys: list[str] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, corruption = item.partition(":")
        if item in GROUPS:
            keys.extend(GROUPS[item])
        elif name in CORRUPTION_BENCHMARKS and ":" not in corruption:
            corruptions = [_corruption(item, corruption)] if corruption else CORRUPTIONS
            keys.extend(f"{name}:{c}:{level}" for c in corruptions for level in levels)
        else:
            keys.append(get_spec(item).key)
    return list(dict.fromkeys(keys))
