"""Prompt templates and class names: the shipped data files and validation of user input.

Template sets are named (``photo``, ``ensemble7``, ``ensemble7_v0``, ``imagenet80``) or per
dataset (``coop:<dataset>`` = CoOp's hand-crafted prompt, ``tda:<dataset>`` = TDA's set).  The
data live in the top-level ``prompts/`` folder, installed as the package ``vlmtta.prompt_files``.
"""
from __future__ import annotations

import difflib
import json
import re
from functools import lru_cache
from importlib import resources
from typing import Iterable, Sequence

DEFAULT_TEMPLATES = "photo"
_WHITESPACE = re.compile(r"\s+")


@lru_cache(maxsize=None)
def _template_data() -> dict:
    return json.loads(resources.files("vlmtta.prompt_files").joinpath("templates.json").read_text("utf-8"))


def template_set_names() -> list[str]:
    """Every name ``resolve_templates`` accepts, e.g. ``ensemble7`` or ``tda:eurosat``."""
    data = _template_data()
    return sorted(data["sets"]) + [f"{kind}:{ds}" for kind in ("coop", "tda") for ds in sorted(data[kind])]


def dataset_names() -> list[str]:
    """Dataset keys with shipped class names."""
    folder = resources.files("vlmtta.prompt_files").joinpath("classnames")
    return sorted(entry.name[:-4] for entry in folder.iterdir() if entry.name.endswith(".txt"))


def resolve_templates(templates: str | Sequence[str] | None = None) -> list[str]:
    """Turn a set name, a single template or a list of templates into validated template strings."""
    if templates is None:
        templates = DEFAULT_TEMPLATES
    if isinstance(templates, str):
        templates = _named_templates(templates) if "{}" not in templates else [templates]
    templates = list(templates)
    if not templates:
        raise ValueError("The template list is empty; give at least one template such as 'a photo of a {}.'.")
    for template in templates:
        if not isinstance(template, str) or template.count("{}") != 1:
            raise ValueError(f"Template {template!r} must be a string with exactly one '{{}}' for the class name.")
    return templates


def _named_templates(name: str) -> list[str]:
    data = _template_data()
    kind, _, dataset = name.partition(":")
    if dataset and kind in ("coop", "tda") and dataset in data[kind]:
        entry = data[kind][dataset]
        if isinstance(entry, str) and entry in data["sets"]:
            return list(data["sets"][entry])
        return [entry] if isinstance(entry, str) else list(entry)
    if not dataset and name in data["sets"]:
        return list(data["sets"][name])
    raise ValueError(_unknown("template set", name, template_set_names()) +
                     " A single template containing '{}' or a list of templates is also accepted.")


def dataset_classnames(dataset: str) -> list[str]:
    """Class names of a shipped dataset, in label order (CoOp order for the cross-domain sets)."""
    path = resources.files("vlmtta.prompt_files").joinpath("classnames", f"{dataset}.txt")
    if not path.is_file():
        raise ValueError(_unknown("dataset", dataset, dataset_names()))
    return [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]


def parse_classes(classes: str | Iterable[str]) -> list[str]:
    """Validate a class list; a string is split on commas or newlines, ``dataset:<key>`` loads a shipped list.

    Raises ``ValueError`` for an empty list, blank names, a single class or duplicates (compared ignoring case and
    repeated whitespace; shipped dataset lists are exempt, see ``_is_shipped_list``).
    """
    if isinstance(classes, str):
        text = classes.strip()
        if text.startswith("dataset:"):
            return dataset_classnames(text.split(":", 1)[1].strip())
        classes = re.split(r"[\n,]", text) if text else []
    names = [_WHITESPACE.sub(" ", str(name)).strip() for name in classes]
    if not names or all(not name for name in names):
        raise ValueError("The class list is empty; give at least two class names, e.g. 'cat, dog'.")
    if any(not name for name in names):
        raise ValueError(f"The class list contains a blank name: {names!r}.")
    if len(names) < 2:
        raise ValueError(f"Classification needs at least two class names; got {names!r}.")
    if not _is_shipped_list(names):
        _check_duplicates(names)
    return names


def _is_shipped_list(names: list[str]) -> bool:
    """Shipped dataset lists are kept as published: CLIP's ImageNet names hold 'missile' and 'sunglasses' twice."""
    return any(len(names) == len(known) and names == known for known in _shipped_lists())


@lru_cache(maxsize=1)
def _shipped_lists() -> tuple[list[str], ...]:
    return tuple(dataset_classnames(name) for name in dataset_names())


def _check_duplicates(names: list[str]) -> None:
    seen: dict[str, str] = {}
    duplicates = []
    for name in names:
        folded = name.casefold()
        if folded in seen:
            duplicates.append(f"{seen[folded]!r} / {name!r}")
        seen.setdefault(folded, name)
    if duplicates:
        raise ValueError("Duplicate class names (compared ignoring case and spacing): " + ", ".join(duplicates))


def _unknown(kind: str, value: str, accepted: Sequence[str]) -> str:
    close = difflib.get_close_matches(value, accepted, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return f"Unknown {kind} {value!r}.{hint} Accepted: {', '.join(accepted)}."
