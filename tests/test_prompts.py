"""Shipped templates and class names, and validation of user class lists."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from vlmtta.prompts import dataset_classnames, dataset_names, parse_classes, resolve_templates, template_set_names

EXPECTED_COUNTS = {"caltech101": 100, "dtd": 47, "eurosat": 10, "fgvc_aircraft": 100, "food101": 101,
                   "oxford_flowers": 102, "oxford_pets": 37, "stanford_cars": 196, "sun397": 397, "ucf101": 101,
                   "imagenet": 1000, "imagenet_a": 200, "imagenet_r": 200, "cifar10": 10, "cifar100": 100}


def test_template_sets():
    assert len(resolve_templates("imagenet80")) == 80
    assert resolve_templates("ensemble7")[0] == "itap of a {}."
    assert len(resolve_templates("ensemble7")) == 7
    assert resolve_templates(None) == ["a photo of a {}."]
    assert resolve_templates("coop:dtd") == ["{} texture."]
    assert resolve_templates("coop:eurosat") == ["a centered satellite photo of {}."]
    assert resolve_templates("tda:sun397") == resolve_templates("ensemble7")
    assert resolve_templates("tda:imagenet_r") == resolve_templates("imagenet80")
    assert resolve_templates("tda:ucf101") == ["a photo of a person doing {}."]
    assert resolve_templates("a sketch of a {}.") == ["a sketch of a {}."]
    cifar = resolve_templates("cifar18")  # CLIP's CIFAR templates: 9 "a ... of a {}." then the same with "the"
    assert len(cifar) == 18 and cifar[:2] == ["a photo of a {}.", "a blurry photo of a {}."]
    assert [t.replace(" the ", " a ") for t in cifar[9:]] == cifar[:9]
    for name in template_set_names():
        assert all(t.count("{}") == 1 for t in resolve_templates(name)), name


def test_template_errors():
    with pytest.raises(ValueError, match="Unknown template set 'ensemble8'.*'ensemble7'"):
        resolve_templates("ensemble8")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["a {} and {}"])
    with pytest.raises(ValueError, match="empty"):
        resolve_templates([])


def test_class_counts_and_masks():
    assert set(dataset_names()) == set(EXPECTED_COUNTS)
    for name, count in EXPECTED_COUNTS.items():
        names = dataset_classnames(name)
        assert len(names) == count, name
        assert not any("_" in n for n in names), name
    masks = json.loads(resources.files("vlmtta.prompt_files").joinpath("imagenet_masks.json").read_text())
    imagenet = dataset_classnames("imagenet")
    for variant in ("imagenet_a", "imagenet_r"):
        assert masks[variant] == sorted(set(masks[variant])) and len(masks[variant]) == 200
        assert dataset_classnames(variant) == [imagenet[i] for i in masks[variant]]
    assert dataset_classnames("eurosat")[0] == "Annual Crop Land"
    assert imagenet[:2] == ["tench", "goldfish"]
    assert dataset_classnames("cifar10")[::9] == ["airplane", "truck"]
    cifar100 = dataset_classnames("cifar100")  # fine-label order: the sorted CIFAR-100 names (underscores as spaces)
    assert cifar100 == sorted(cifar100) and cifar100[1] == "aquarium fish" and cifar100[-1] == "worm"


def test_parse_classes():
    assert parse_classes("cat, dog ,  big   bird") == ["cat", "dog", "big bird"]
    assert parse_classes("cat\ndog\n") == ["cat", "dog"]
    assert parse_classes(["cat", "dog"]) == ["cat", "dog"]
    assert parse_classes("dataset:eurosat") == dataset_classnames("eurosat")
    assert len(parse_classes(dataset_classnames("imagenet"))) == 1000  # CLIP's list keeps its two duplicates


@pytest.mark.parametrize("classes, message", [
    ([], "empty"), ("", "empty"), (" , ", "empty"), (["cat", ""], "blank"), (["cat"], "at least two"),
    (["Cat", "dog", "cat "], "Duplicate class names.*'Cat' / 'cat'"), (["big  dog", "Big Dog"], "Duplicate"),
    ("dataset:imagenett", "Unknown dataset 'imagenett'.*'imagenet'"),
])
def test_parse_classes_errors(classes, message):
    with pytest.raises(ValueError, match=message):
        parse_classes(classes)
