"""The benchmark datasets: where each one lives under a data root and how its test split is read.

Two folder conventions are accepted for every dataset (the first folder found wins):

* the CoOp ``DATASETS.md`` layout (TDA family): ``<root>/caltech-101/``, ``<root>/imagenet/images/val``, ...
  with each ``split_zhou_*.json`` inside its dataset folder;
* the TPT root layout (TPT family): ``<root>/Caltech101/``, ``<root>/ImageNet/val``, ... whose split
  JSON files live in TPT's ``data/data_splits/``: copy them to ``<root>/data_splits/`` (or pass ``splits_dir``).

See ``datasets/DATASETS.md`` for the downloads and the full trees.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..prompts import dataset_classnames, resolve_templates

CROSS_DOMAIN = ("caltech101", "dtd", "eurosat", "fgvc_aircraft", "food101", "oxford_flowers", "oxford_pets",
                "stanford_cars", "sun397", "ucf101")
IMAGENET_VARIANTS = ("imagenet", "imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
OOD = ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch")
READERS = ("coop_split", "aircraft", "wnid_folders", "index_folders")


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and read the test split of one dataset."""

    key: str  # dataset key of vlmtta.prompts (class names, templates)
    reader: str  # one of READERS
    test_count: int  # images in the published test split
    folders: tuple[str, ...]  # candidate folders under the root: CoOp layout first, then TPT layout
    split_file: str = ""  # CoOp split JSON (coop_split only)
    image_dir: str = ""  # folder inside the dataset folder that split paths are relative to

    @property
    def family(self) -> str:
        return "imagenet" if self.key in IMAGENET_VARIANTS else "cross_domain"

    @property
    def classnames(self) -> list[str]:
        """Class names in label order (ImageNet-V2 and -Sketch use the 1000 ImageNet classes)."""
        return dataset_classnames("imagenet" if self.key in ("imagenet_v2", "imagenet_sketch") else self.key)

    @property
    def default_augmentation(self) -> str:
        """View policy of view-based methods (METHODS.md §1.3, TPT): AugMix on fine-grained sets, crops+flips on ImageNet."""
        return "rrc_flip" if self.family == "imagenet" else "augmix"

    @property
    def default_templates(self) -> list[str]:
        """TDA's per-dataset template set: the 'CLIP ensemble' baseline (64.59 cross-domain average)."""
        return resolve_templates(f"tda:{self.key}")


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


def get_spec(key: str) -> DatasetSpec:
    """The spec of dataset ``key``; a clear error listing the accepted keys otherwise."""
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {key!r}; accepted: {', '.join(DATASETS)} (groups: all, cross_domain, "
                         "imagenet_variants).")
    return DATASETS[key]


def parse_datasets(text: str | None) -> list[str]:
    """``None``/``all`` -> every dataset; ``cross_domain`` / ``imagenet_variants`` -> that family; else a comma list."""
    if text in (None, "", "all"):
        return list(DATASETS)
    groups = {"cross_domain": CROSS_DOMAIN, "imagenet_variants": IMAGENET_VARIANTS}
    keys: list[str] = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        keys.extend(groups[item] if item in groups else (get_spec(item).key,))
    return list(dict.fromkeys(keys))
