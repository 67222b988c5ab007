"""The evaluation runner behind ``vlmtta bench``: stream a test set through registered methods.

* Sources: a dataset under a data root (``vlmtta.data``), or a precomputed-features file
  (``vlmtta.features.FeatureFile``).
* Order: ``shuffled`` (seeded permutation, the default for datasets), ``sorted`` (dataset / file order,
  the default for features files) or ``grouped`` (classes in a seeded order, each class's images
  contiguous: a temporally correlated stream to stress online methods; labels shape the order only).
* Methods that need only view features run on the on-disk view cache (encoded once per model, dataset,
  view policy, number of views and seed, then shared by every method); the others get the views.
  Episodic methods are reset before every image; online methods keep their state across the stream.
* Resume: a finished result (same settings) is skipped.  Episodic streams checkpoint their predictions
  every ``checkpoint_every`` images and continue from there; online streams restart from the first
  image, because their state (caches, memories) is not checkpointed; encoding work is never lost
  either way since view features are cached row by row.  Results are written atomically at the end.
* Batch methods (those with ``predict_batch``: SubTTA, Tent, SAR, DeYO, BATCLIP, WATT, CLIPArTT) take the
  stream ``batch_size`` images at a time (original views only), as their papers do; the result records
  the batch size and the method's reset policy (a dataset stream is one domain: reset at its start).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .api import Adapter
from .cache import cache_key
from .data import get_spec, read_split
from .data.readers import Split
from .features import FeatureFile, ViewFeatureCache, encode_missing, load_features_file, read_json, view_cache_parts, \
    write_json
from .images import load_image
from .methods import Need, get_method_class
from .results import result_name, save_result
from .version import __version__
from .views import VIEW_POLICIES, make_views, view_seed

ORDERS = ("shuffled", "sorted", "grouped")
FAIL_ENV = "VLMTTA_FAIL_AFTER"  # inject a failure after this many streamed images (resume tests)


class InjectedFailure(RuntimeError):
    """Raised on purpose after ``fail_after`` images, to test resuming."""


@dataclass
class BenchSpec:
    """One ``vlmtta bench`` run over one source (a dataset under ``root``, or a ``features`` file)."""

    methods: list[str]
    results_dir: Path
    dataset: str | None = None  # dataset key; with ``features``, an optional key (per-dataset options) or label
    root: Path | None = None
    features: Path | None = None
    splits_dir: Path | None = None
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    device: str = "auto"
    templates: str | None = None  # default: the method's own, else TDA's per-dataset set
    seed: int = 0
    order: str | None = None  # default: shuffled for datasets, sorted (file order) for features files
    options: dict[str, Any] = field(default_factory=dict)  # given to every method, over per-dataset defaults
    augmentation: str = "method"  # view policy: the method's own, "family" (METHODS.md §1.3) or a policy name
    cache_dir: Path | None = None  # default: $VLMTTA_CACHE or ~/.cache/vlmtta
    tag: str = ""  # distinguishes runs of one method with other settings
    limit: int | None = None  # only the first ``limit`` images of the stream
    checkpoint_every: int = 500
    batch_views: int = 256
    workers: int = 2
    progress: bool = True
    force: bool = False  # recompute finished results
    precision: str = "auto"  # features files: CLIP logits in the file's dtype ("auto"), or "fp32" / "fp16"
    batch_size: int = 64  # methods with a batch protocol (SubTTA, Tent, SAR, ...) adapt on this many images at once


PRECISIONS = ("auto", "fp32", "fp16")


def stream_order(labels: list[int], order: str, seed: int) -> list[int]:
    """Indices of the stream: ``sorted``, ``shuffled`` (seeded) or ``grouped`` (seeded class order, classes contiguous)."""
    n = len(labels)
    if order not in ORDERS:
        raise ValueError(f"Unknown order {order!r}; accepted: {', '.join(ORDERS)}.")
    if order == "sorted":
        return list(range(n))
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)
    if order == "shuffled":
        return perm.tolist()
    rank = torch.randperm(max(labels, default=-1) + 1, generator=gen)
    keys = rank[torch.as_tensor(labels, dtype=torch.long)[perm]]
    return perm[torch.sort(keys, stable=True).indices].tolist()


def versions() -> dict[str, str]:
    import open_clip

    return {"vlmtta": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLMTTA_CACHE", Path.home() / ".cache" / "vlmtta")).expanduser()


def method_options(method: str, dataset: str | None, user: dict[str, Any], augmentation: str = "method") -> dict[str, Any]:
    """The method's per-dataset defaults (``options_for``) under the user's options.

    ``augmentation`` picks the view policy of methods that take one and were given none: ``method`` keeps the
    method's own (its constructor or per-dataset default), ``family`` takes the dataset family's TPT convention
    (AugMix on the fine-grained sets, crops + flips on the ImageNet family), any other value is a policy name.
    """
    cls = get_method_class(method)
    options = cls.options_for(dataset, **user)
    if augmentation not in ("method", "family", *VIEW_POLICIES):
        raise ValueError(f"Unknown augmentation {augmentation!r}; accepted: method, family, {', '.join(VIEW_POLICIES)}.")
    if augmentation != "method" and "augmentation" in cls.defaults() and "augmentation" not in user:
        if augmentation != "family":
            options["augmentation"] = augmentation
        elif dataset:
            options["augmentation"] = get_spec(dataset).default_augmentation
    return options


class _Source:
    """What a stream reads: class names, labels, and features or views of image ``i``."""

    def __init__(self, spec: BenchSpec):
        self.spec = spec
        self.file: FeatureFile | None = None
        self.split: Split | None = None
        self.backbone = None
        if spec.features is not None:
            self.file = load_features_file(spec.features)
            self.name = spec.dataset or self.file.path.stem
            self.classnames, self.labels = self.file.classnames, self.file.labels.tolist()
        else:
            if not spec.dataset or spec.root is None:
                raise ValueError("bench needs a dataset and a data root (--datasets, --root), or --features FILE.")
            from .backbone import load_backbone

            self.split = read_split(spec.dataset, spec.root, spec.splits_dir)
            self.name, self.classnames, self.labels = spec.dataset, self.split.classnames, self.split.labels
            self.backbone = load_backbone(spec.model, spec.pretrained, spec.device)

    @property
    def logits_dtype(self) -> torch.dtype:
        """``auto``: CLIP logits in the file's precision (fp16 files as fp16 CLIP inference); else as asked."""
        choice = self.spec.precision
        if choice not in PRECISIONS:
            raise ValueError(f"Unknown precision {choice!r}; accepted: {', '.join(PRECISIONS)}.")
        return self.file.dtype if choice == "auto" else {"fp32": torch.float32, "fp16": torch.float16}[choice]

    @property
    def option_dataset(self) -> str | None:
        """The dataset key whose per-dataset settings apply (None for an unknown label)."""
        from .data import DATASETS

        return self.name if self.name in DATASETS else None

    def describe(self) -> dict[str, Any]:
        if self.file is not None:
            return {"source": "features_file", "features_file": str(self.file.path), "file_views": self.file.n_views,
                    "file_dtype": str(self.file.dtype).replace("torch.", ""),
                    "logits_dtype": str(self.logits_dtype).replace("torch.", "")}
        return {"source": "images", "dataset_folder": str(self.split.folder), "layout": self.split.layout}

    def adapter(self, method: str) -> tuple[Adapter, str]:
        """A bound adapter for ``method`` and where its templates came from."""
        options = method_options(method, self.option_dataset, self.spec.options, self.spec.augmentation)
        if self.file is not None:
            adapter = Adapter.from_features(self.classnames, self.file.text_features, method,
                                            logit_scale=self.file.logit_scale, logits_dtype=self.logits_dtype,
                                            **options)
            if adapter.method.n_views > self.file.n_views:
                raise ValueError(f"{method} wants {adapter.method.n_views} views; {self.file.path} holds "
                                 f"{self.file.n_views} per image.")
            return adapter, "features file (precomputed text_features)"
        templates, origin = self.spec.templates, "--templates"
        if templates is None:
            cls = get_method_class(method)
            templates, origin = ((cls.default_templates, "method default") if cls.default_templates
                                 else (get_spec(self.name).default_templates, f"dataset default (tda:{self.name})"))
        adapter = Adapter(self.classnames, method, backbone=self.backbone, templates=templates, seed=self.spec.seed,
                          **options)
        return adapter, origin

    def batch_predictor(self, adapter: Adapter) -> Callable[[list[int]], torch.Tensor]:
        """``predict(rows) -> probabilities [len(rows), C]``: one adaptation step on those images (batch methods)."""
        if self.file is not None:
            raise ValueError(f"{adapter.method.name} adapts on images; it cannot run on a features file.")
        return lambda rows: adapter.adapt_batch(adapter.original_views(self.split.paths[i] for i in rows))

    def predictor(self, adapter: Adapter) -> tuple[Callable[[int], torch.Tensor], dict[str, Any]]:
        """``predict(i) -> probabilities [C]`` for the stream, and facts about the views."""
        method = adapter.method
        if self.file is not None:
            return (lambda i: adapter.adapt_features(self.file.row(i, method.n_views))), {"views_from": "file"}
        config, seed, name = adapter.view_config, self.spec.seed, self.name
        if Need.VIEW_FEATURES in method.needs:
            cache = self.view_cache(config)
            return (lambda i: adapter.adapt_features(cache.row(i))), {
                "views_from": "view-feature cache", "cache": str(cache.folder),
                "encode_ms_per_image": 1000 * cache.meta["encode_s"] / max(1, len(self.split))}

        def predict(i: int) -> torch.Tensor:  # methods that need the images themselves
            pixels = load_image(self.split.paths[i]).to(self.backbone.device)
            return adapter.adapt_views(make_views(pixels, config, seed=view_seed(seed, name, i)), pixels)

        return predict, {"views_from": "images (encoded per method)"}

    def view_cache(self, config) -> ViewFeatureCache:
        """The view-feature cache for ``config``, encoding the rows still missing."""
        paths = self.split.relative_paths()
        parts = view_cache_parts(self.backbone, self.name, paths, config, self.spec.seed)
        cache = ViewFeatureCache.open(self.spec.cache_dir or default_cache_dir(), parts, len(paths), config.n_views,
                                      self.backbone.embed_dim)
        encode_missing(cache, self.split.paths, self.backbone, config, self.name, self.spec.seed,
                       batch_views=self.spec.batch_views, workers=self.spec.workers, progress=self.spec.progress,
                       on_rows=_encode_hook)
        return cache


_encode_hook: Callable[[int], None] | None = None  # tests set this to interrupt an encoding


def run_bench(spec: BenchSpec, fail_after: int | None = None) -> list[dict[str, Any]]:
    """Run every method of ``spec`` on its source; returns the results (finished ones are read, not rerun)."""
    if fail_after is None and os.environ.get(FAIL_ENV):
        fail_after = int(os.environ[FAIL_ENV])
    source = _Source(spec)
    order = spec.order or ("sorted" if source.file is not None else "shuffled")
    stream = stream_order(source.labels, order, spec.seed)[:spec.limit]
    return [_run_method(spec, source, method, order, stream, fail_after) for method in spec.methods]


def _run_method(spec: BenchSpec, source: _Source, method: str, order: str, stream: list[int],
                fail_after: int | None) -> dict[str, Any]:
    adapter, templates_from = source.adapter(method)
    protocol = {**adapter.protocol(), **source.describe(), "dataset": source.name, "n_images": len(stream),
                "n_classes": len(source.classnames), "templates_from": templates_from, "order": order,
                "limit": spec.limit, "labels_used_for": "metric only" + (" and the grouped order" if order == "grouped"
                                                                         else "")}
    if is_batch_method(adapter):
        protocol.update(batch_size=spec.batch_size, views="original view only",
                        reset_policy=getattr(adapter.method, "reset_policy", "domain"), reset_at="start of the stream")
    key = cache_key(protocol)[:32]
    model, pretrained = ((adapter.backbone.model_name, adapter.backbone.pretrained) if adapter.backbone is not None
                         else ("precomputed", source.file.path.name))
    path = Path(spec.results_dir) / result_name(source.name, method, model, pretrained, spec.seed, spec.tag)
    existing = read_json(path)
    if existing is not None and not spec.force:
        if existing.get("config_key") == key:
            return existing
        raise ValueError(f"{path} holds a result of {method} on {source.name} with other settings; pass --tag NAME to "
                         "keep both, or --force to overwrite it.")
    if is_batch_method(adapter):
        predict, view_facts = source.batch_predictor(adapter), {"views_from": "images (original view, batched)"}
    else:
        single, view_facts = source.predictor(adapter)
        predict = lambda rows: single(rows[0])[None]  # noqa: E731
    outcome = _stream(spec, adapter, predict, stream, source.labels, path, key, fail_after)
    result = {"dataset": source.name, "method": method, "tag": spec.tag, "model": model, "pretrained": pretrained,
              "seed": spec.seed, **outcome, "protocol": {**protocol, **view_facts}, "config_key": key,
              "versions": versions(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_result(path, result)
    _checkpoint_path(path).unlink(missing_ok=True)
    return result


def is_batch_method(adapter: Adapter) -> bool:
    """Whether the adapter's method has a batch protocol (``predict_batch``) and runs on images."""
    return hasattr(adapter.method, "predict_batch") and adapter.backbone is not None


def _checkpoint_path(result_path: Path) -> Path:
    return result_path.parent / ".partial" / (result_path.stem + ".ckpt")


def _stream(spec: BenchSpec, adapter: Adapter, predict: Callable[[list[int]], torch.Tensor], stream: list[int],
            labels: list[int], path: Path, key: str, fail_after: int | None) -> dict[str, Any]:
    """Feed the stream (one image, or ``batch_size`` for batch methods, per step; an episodic stream resumes from
    its checkpoint) and score it.  Latency is per image (a batch's time divided by its size)."""
    from tqdm.auto import tqdm

    episodic, ckpt_path = adapter.method.episodic, _checkpoint_path(path)
    step = max(1, int(spec.batch_size)) if is_batch_method(adapter) else 1
    state = read_json(ckpt_path) if episodic else None
    if not state or state.get("config_key") != key:
        state = {"config_key": key, "predictions": [], "latency_ms": [], "wall_s": 0.0}
    resumed_from, start = len(state["predictions"]), time.perf_counter()
    adapter.reset()
    correct = sum(int(p == labels[i]) for p, i in zip(state["predictions"], stream))
    bar = tqdm(total=len(stream), initial=resumed_from, desc=f"{adapter.method.name} {path.name.split('__')[0]}",
               unit="img", disable=not spec.progress)
    try:
        for pos in range(resumed_from, len(stream), step):
            rows = stream[pos:pos + step]
            tick = time.perf_counter()
            predictions = predict(rows).argmax(dim=-1).tolist()
            state["latency_ms"].extend([1000 * (time.perf_counter() - tick) / len(rows)] * len(rows))
            state["predictions"].extend(predictions)
            correct += sum(int(p == labels[i]) for p, i in zip(predictions, rows))  # labels: metric only
            bar.update(len(rows))
            done = pos + len(rows)
            if done % 50 < len(rows) or done == len(stream):
                bar.set_postfix(acc=f"{100 * correct / done:.2f}%", refresh=False)
            if episodic and done % spec.checkpoint_every < len(rows):
                write_json(ckpt_path, {**state, "wall_s": state["wall_s"] + time.perf_counter() - start})
            if fail_after is not None and done - resumed_from >= fail_after:
                raise InjectedFailure(f"injected failure after {fail_after} images ({FAIL_ENV} / fail_after)")
    finally:
        bar.close()
    latency = state["latency_ms"] or [0.0]
    return {"accuracy": 100 * correct / max(1, len(stream)), "correct": correct, "n": len(stream),
            "resumed_from": resumed_from,
            "timing": {"wall_s": state["wall_s"] + time.perf_counter() - start,
                       "latency_ms_mean": statistics.fmean(latency), "latency_ms_median": statistics.median(latency),
                       "latency_ms_p90": float(np.percentile(latency, 90))}}
