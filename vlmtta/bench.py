"""The evaluation runner behind ``vlmtta bench``: stream a test set through registered methods.

* Sources: a dataset under a data root (``vlmtta.data``), or a precomputed-features file
  (``vlmtta.features.FeatureFile``).
* Order (``vlmtta.streams``): ``shuffled`` / ``iid`` (seeded permutation, the default for datasets), ``sorted``
  (dataset / file order, the default for features files), ``grouped`` (classes in a seeded order, each class's
  images contiguous) or ``dirichlet[:ALPHA]`` (Dirichlet label shift); labels shape the order only.
* Continual (``BenchSpec.domains``): each method streams the datasets one after the other, each in its own
  order, keeping its state across them (``reset_between="never"``) or resetting it at every new domain
  (``"domain"``); one result per domain, tagged ``continual-<reset>``, whose protocol names the sequence.
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
* Episodic methods without a batch protocol take ``batch_images`` images per step (``Adapter.adapt_features_many``
  on cached or file features, ``adapt_views_many`` on views), with results equal to one image at a time; online
  methods take one image per step (their order is the protocol).  ``batch_images="auto"`` (``auto_batch_images``)
  picks it per method and device.  The result records it outside its ``config_key``: a run with any
  ``batch_images`` resumes or skips a run of the same settings with another.
* Grids (datasets x methods x seeds, each cell a task, optionally on Ray): ``vlmtta.grid``, built on
  ``open_stream`` / ``stream_run`` here, so a cell's result is the one this runner writes.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .api import Adapter
from .cache import cache_key
from .data import get_spec, read_split
from .data.readers import Split
from .features import FeatureFile, ViewFeatureCache, encode_missing, load_features_file, view_cache_parts
from .images import load_image
from .methods import Need, check_options, get_method_class
from .metrics import DamagedSamples, Recorder, Samples
from .options import check_option_scopes, scoped_options
from .results import read_result, result_name, save_result
from .speed import memory_record, peak_memory
from .streams import StreamOrder
from .version import __version__
from .views import VIEW_POLICIES, make_views, view_seed
from .writable import ensure_writable_dir

RESETS = ("never", "domain")
FAIL_ENV = "VLMTTA_FAIL_AFTER"  # inject a failure after this many streamed images (resume tests)


class InjectedFailure(RuntimeError):
    """Raised on purpose after ``fail_after`` images, to test resuming."""


class EmptySource(ValueError):
    """A test split or features file with no samples (an accuracy over 0 images means nothing)."""


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
    pretrained: str | None = "auto"  # see vlmtta.backbone.resolve_weights
    device: str = "auto"
    templates: str | None = None  # default: the method's own, else TDA's per-dataset set
    seed: int = 0
    order: str | None = None  # vlmtta.streams order; default: shuffled for datasets, sorted for features files
    domains: list[str] | None = None  # continual: stream these datasets in turn (instead of ``dataset``)
    reset_between: str = "never"  # continual: reset each method's state at every new domain ("domain") or never
    options: dict[str, Any] = field(default_factory=dict)  # over per-dataset defaults; key: all, method.key: one
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
    batch_images: int | str = "auto"  # episodic methods: images adapted at once (same results); "auto": see below


PRECISIONS = ("auto", "fp32", "fp16")
# ``batch_images="auto"`` (measured on a 2-core CPU, see README "Batched episodic adaptation"): methods that run on
# view features read them from a cache or file, so a step is cheap and per-image Python overhead dominates;
# methods that encode their views on CPU are bound by the encoder, which a larger batch does not speed up.
AUTO_FEATURES_BATCH = 32  # methods on view features, any device
AUTO_CUDA_MAX = 32  # methods that encode their views, on CUDA: up to this many images ...
AUTO_CUDA_BYTES_PER_IMAGE = 2 * 2**30  # ... at most one per 2 GiB of free GPU memory (a step that still runs out
#                                        of memory is retried with half as many images)


def auto_batch_images(device: torch.device, on_features: bool) -> int:
    """Images per step for an episodic method: ``AUTO_FEATURES_BATCH`` on view features; 1 for methods that
    encode their views on CPU; on CUDA the largest power of two up to ``AUTO_CUDA_MAX`` with
    ``AUTO_CUDA_BYTES_PER_IMAGE`` of free memory per image."""
    if on_features:
        return AUTO_FEATURES_BATCH
    if device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(device)
    fits = max(1, int(free // AUTO_CUDA_BYTES_PER_IMAGE))
    return min(AUTO_CUDA_MAX, 1 << (fits.bit_length() - 1))


def check_batch_images(value: int | str) -> int | str:
    """``value`` as a whole number of images (at least 1) or ``"auto"``; a one-line error otherwise."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        number = int(value)
        if number < 1 or (isinstance(value, float) and value != number) or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"batch_images must be a whole number of images (at least 1) or 'auto', got {value!r}.") from None
    return number


def versions() -> dict[str, str]:
    import open_clip

    return {"vlmtta": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLMTTA_CACHE", Path.home() / ".cache" / "vlmtta")).expanduser()


def method_options(method: str, dataset: str | None, user: dict[str, Any], augmentation: str = "method") -> dict[str, Any]:
    """The method's per-dataset defaults (``options_for``) under the user's options (its own: plain keys and
    ``method.key`` ones, ``vlmtta.options.scoped_options``).

    ``augmentation`` picks the view policy of methods that take one and were given none: ``method`` keeps the
    method's own (its constructor or per-dataset default), ``family`` takes the dataset family's TPT convention
    (AugMix on the fine-grained sets, crops + flips on the ImageNet family), any other value is a policy name.
    """
    cls = get_method_class(method)
    user = scoped_options(method, user)
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
        """The dataset key whose per-dataset settings apply (ImageNet's for ImageNet-C; None for an unknown label)."""
        try:
            return get_spec(self.name).clean_key
        except ValueError:
            return None

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
            spec = get_spec(self.name)
            templates, origin = ((cls.default_templates, "method default") if cls.default_templates
                                 else (spec.default_templates, f"dataset default ({spec.template_set})"))
        adapter = Adapter(self.classnames, method, backbone=self.backbone, templates=templates, seed=self.spec.seed,
                          **options)
        return adapter, origin

    def batch_predictor(self, adapter: Adapter) -> Callable[[list[int]], torch.Tensor]:
        """``predict(rows) -> probabilities [len(rows), C]``: one adaptation step on those images (batch methods)."""
        if self.file is not None:
            raise ValueError(f"{adapter.method.name} adapts on images; it cannot run on a features file.")
        return lambda rows: adapter.adapt_batch(adapter.original_views(self.split.image(i) for i in rows))

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
            pixels = load_image(self.split.image(i)).to(self.backbone.device)
            return adapter.adapt_views(make_views(pixels, config, seed=view_seed(seed, name, i)), pixels)

        return predict, {"views_from": "images (encoded per method)"}

    def many_predictor(self, adapter: Adapter) -> Callable[[list[int]], torch.Tensor]:
        """``predict(rows) -> probabilities [len(rows), C]``: episodic adaptation of those images at once, equal to
        ``predictor`` on each (view features stacked from the file or cache, or the views of each image)."""
        method = adapter.method
        if self.file is not None:
            return lambda rows: adapter.adapt_features_many(torch.stack([self.file.row(i, method.n_views)
                                                                         for i in rows]))
        config, seed, name = adapter.view_config, self.spec.seed, self.name
        if Need.VIEW_FEATURES in method.needs:
            cache = self.view_cache(config)
            return lambda rows: adapter.adapt_features_many(torch.stack([cache.row(i) for i in rows]))

        def predict(rows: list[int]) -> torch.Tensor:  # methods that need the images themselves
            sources = [load_image(self.split.image(i)).to(self.backbone.device) for i in rows]
            views = torch.stack([make_views(pixels, config, seed=view_seed(seed, name, i))
                                 for i, pixels in zip(rows, sources)])
            return adapter.adapt_views_many(views, sources)

        return predict

    def view_cache(self, config) -> ViewFeatureCache:
        """The view-feature cache for ``config``, encoding the rows still missing (and any found damaged later)."""
        paths = self.split.relative_paths()
        parts = view_cache_parts(self.backbone, self.name, paths, config, self.spec.seed)

        def encode(target: ViewFeatureCache) -> int:
            return encode_missing(target, self.split.images, self.backbone, config, self.name, self.spec.seed,
                                  batch_views=self.spec.batch_views, workers=self.spec.workers,
                                  progress=self.spec.progress, on_rows=_encode_hook)

        cache = ViewFeatureCache.open(self.spec.cache_dir or default_cache_dir(), parts, len(paths), config.n_views,
                                      self.backbone.embed_dim, encoder=encode)
        encode(cache)
        return cache


_encode_hook: Callable[[int], None] | None = None  # tests set this to interrupt an encoding


def run_bench(spec: BenchSpec, fail_after: int | None = None) -> list[dict[str, Any]]:
    """Run every method of ``spec`` on its source; returns the results (finished ones are read, not rerun)."""
    if fail_after is None and os.environ.get(FAIL_ENV):
        fail_after = int(os.environ[FAIL_ENV])
    for name in ("limit", "checkpoint_every"):
        if getattr(spec, name) is not None and getattr(spec, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(spec, name)}.")
    check_batch_images(spec.batch_images)
    ensure_writable_dir(spec.results_dir, "Results folder")  # before any work, not after it
    if spec.features is None:
        ensure_writable_dir(spec.cache_dir or default_cache_dir(), "Cache folder (--cache-dir)")
    if spec.domains:
        return _run_continual(spec, fail_after)
    source, order, stream = open_stream(spec)
    return [_run_method(spec, source, method, order, stream, fail_after) for method in spec.methods]


def open_stream(spec: BenchSpec) -> tuple[_Source, StreamOrder, list[int]]:
    """The source of ``spec`` (its methods' options checked), its order and the stream of image indices."""
    source = _nonempty(_Source(spec))
    _check_options(spec, source)
    order = StreamOrder.parse(spec.order or ("sorted" if source.file is not None else "shuffled"))
    return source, order, order.indices(source.labels, spec.seed)[:spec.limit].tolist()


def _check_options(spec: BenchSpec, source: _Source) -> None:
    """Every method's options, type-checked before any stream runs (a ``method.key`` must name one of them)."""
    check_option_scopes(spec.options, spec.methods)
    for method in spec.methods:
        check_options(method, **method_options(method, source.option_dataset, spec.options, spec.augmentation))


def _nonempty(source: _Source) -> _Source:
    """``source``, or :class:`EmptySource` when it holds no image (never scored as 0/0)."""
    if not source.labels:
        where = f"{source.file.path} holds no samples" if source.file is not None else \
            f"the test split of {source.name} lists no images ({source.split.folder})"
        raise EmptySource(f"{where}: nothing to evaluate.")
    return source


@dataclass
class _Run:
    """One method on one source: its adapter, protocol, config key and result path."""

    adapter: Adapter
    protocol: dict[str, Any]
    key: str
    path: Path
    model: str
    pretrained: str | None
    tag: str
    method: str  # the name it was asked for

    def finished(self) -> dict[str, Any] | None:
        """The saved result of exactly this run, or None; a result of other settings at ``path`` is an error."""
        existing = read_result(self.path, warn=_warn) if self.path.exists() else None
        if existing is None or existing.get("config_key") == self.key:
            return existing
        raise ValueError(f"{self.path} holds a result of {self.protocol['method']} on {self.protocol['dataset']} with "
                         "other settings; pass --tag NAME to keep both, or --force to overwrite it.")


def _prepare(spec: BenchSpec, source: _Source, method: str, order: StreamOrder, stream: list[int],
             bound: tuple[Adapter, str] | None = None, continual: dict[str, Any] | None = None) -> _Run:
    """The run of ``method`` on ``source`` (``bound``: a continual run's adapter, kept across domains)."""
    adapter, templates_from = bound or source.adapter(method)
    facts = {**order.describe(spec.seed, len(set(source.labels))), **({"continual": continual} if continual else {})}
    protocol = {**adapter.protocol(), **source.describe(), "dataset": source.name, "n_images": len(stream),
                "n_classes": len(source.classnames), "templates_from": templates_from, "order": str(order),
                "stream": facts, "limit": spec.limit,
                "labels_used_for": "metric only" + (f" and the {order.kind} order" if order.uses_labels else "")}
    if is_batch_method(adapter):
        protocol.update(batch_size=spec.batch_size, views="original view only",
                        reset_policy=getattr(adapter.method, "reset_policy", "domain"),
                        reset_at="start of each domain" if continual else "start of the stream")
    model, pretrained = ((adapter.backbone.model_name, adapter.backbone.pretrained) if adapter.backbone is not None
                         else ("precomputed", source.file.path.name))
    tag = "+".join(filter(None, (f"continual-{continual['reset_between']}" if continual else "", spec.tag)))
    path = Path(spec.results_dir) / result_name(source.name, method, model, pretrained, spec.seed, tag)
    return _Run(adapter, protocol, cache_key(protocol)[:32], path, model, pretrained, tag, method)


def _run_method(spec: BenchSpec, source: _Source, method: str, order: StreamOrder, stream: list[int],
                fail_after: int | None, run: _Run | None = None, reset: bool = True,
                rerun_finished: bool = False) -> dict[str, Any]:
    """Stream ``source`` through ``method`` and save the result (a finished one is returned unless ``rerun_finished``)."""
    run = run or _prepare(spec, source, method, order, stream)
    existing = None if spec.force else run.finished()
    if existing is not None and not rerun_finished:
        return existing
    result, samples = stream_run(spec, source, run, stream, fail_after, reset)
    result = save_result(run.path, result, samples)
    _checkpoint_path(run.path).unlink(missing_ok=True)
    return result


def stream_run(spec: BenchSpec, source: _Source, run: _Run, stream: list[int], fail_after: int | None,
               reset: bool = True, ckpt_path: Path | None = None) -> tuple[dict[str, Any], Samples]:
    """Stream ``stream`` (the whole stream or, for a split episodic cell, an image range of it) through ``run``;
    the result record (unsaved) and the per-sample record.  ``ckpt_path``: where an episodic stream checkpoints."""
    device = run.adapter.backbone.device if run.adapter.backbone is not None else torch.device("cpu")
    step = 1
    if is_batch_method(run.adapter):
        predict, view_facts = source.batch_predictor(run.adapter), {"views_from": "images (original view, batched)"}
        step = max(1, int(spec.batch_size))
    else:
        single, view_facts = source.predictor(run.adapter)
        predict = lambda rows: single(rows[0])[None]  # noqa: E731
        if run.adapter.method.episodic:
            step = images_per_step(spec.batch_images, run.adapter, device)
            view_facts["batch_images"] = step  # not in config_key: results do not depend on it
            if step > 1:
                predict = source.many_predictor(run.adapter)
    with peak_memory(device) as memory:
        outcome, samples = _stream(spec, run.adapter, predict, stream, source.labels, run.path, run.key, fail_after,
                                   reset, step, ckpt_path)
    result = {"dataset": source.name, "method": run.method, "tag": run.tag, "model": run.model,
              "pretrained": run.pretrained, "seed": spec.seed, **outcome, "memory": memory_record(device, memory),
              "protocol": {**run.protocol, **view_facts}, "config_key": run.key, "versions": versions(),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return result, samples


def _run_continual(spec: BenchSpec, fail_after: int | None) -> list[dict[str, Any]]:
    """Each method streams ``spec.domains`` in turn with one adapter (see the module docstring); results per domain.

    With ``reset_between="domain"`` a finished domain is skipped (the next one starts from a reset anyway); with
    ``"never"`` a run is finished only when every domain is, otherwise it restarts from the first domain (the
    state built on earlier domains is not checkpointed).
    """
    if spec.features is not None:
        raise ValueError("A continual run streams datasets (--datasets), not a features file.")
    if spec.reset_between not in RESETS:
        raise ValueError(f"Unknown reset policy {spec.reset_between!r}; accepted: {', '.join(RESETS)}.")
    domains = list(dict.fromkeys(spec.domains))
    sources = [_nonempty(_Source(replace(spec, dataset=key, domains=None))) for key in domains]
    for source in sources:
        _check_options(spec, source)
    other = next((s.name for s in sources if s.classnames != sources[0].classnames), None)
    if other is not None:
        raise ValueError(f"A continual run needs one class list for every domain; {other} and {domains[0]} differ.")
    order = StreamOrder.parse(spec.order or "shuffled")
    streams = [order.indices(s.labels, spec.seed)[:spec.limit].tolist() for s in sources]
    results = []
    for method in spec.methods:
        bound = sources[0].adapter(method)
        runs = [_prepare(spec, source, method, order, stream, bound,
                         {"domains": domains, "position": k, "reset_between": spec.reset_between})
                for k, (source, stream) in enumerate(zip(sources, streams))]
        done = [None if spec.force else run.finished() for run in runs]
        rerun = spec.reset_between == "never" and None in done  # replay every domain to rebuild the state
        results.extend(_run_method(spec, source, method, order, stream, fail_after, run,
                                   reset=k == 0 or spec.reset_between == "domain", rerun_finished=rerun)
                       for k, (source, stream, run) in enumerate(zip(sources, streams, runs)))
    return results


def _warn(message: str) -> None:
    print(f"vlmtta: warning: {message}", file=sys.stderr)


def images_per_step(batch_images: int | str, adapter: Adapter, device: torch.device) -> int:
    """How many images an episodic method adapts at once: ``batch_images``, or ``auto_batch_images``'s choice."""
    value = check_batch_images(batch_images)
    return auto_batch_images(device, Need.VIEW_FEATURES in adapter.method.needs) if value == "auto" else value


def is_batch_method(adapter: Adapter) -> bool:
    """Whether the adapter's method has a batch protocol (``predict_batch``) and runs on images."""
    return hasattr(adapter.method, "predict_batch") and adapter.backbone is not None


def _checkpoint_path(result_path: Path) -> Path:
    return result_path.parent / ".partial" / (result_path.stem + ".ckpt.npz")


def _resume(ckpt_path: Path, key: str) -> tuple[Samples | None, float]:
    """The per-sample record and wall time of a matching checkpoint (none when absent, damaged or stale)."""
    if not ckpt_path.is_file():
        return None, 0.0
    try:
        samples, meta = Samples.load(ckpt_path)
    except DamagedSamples as error:
        _warn(f"{error}; starting the stream over.")
        return None, 0.0
    return (samples, float(meta.get("wall_s", 0.0))) if meta.get("config_key") == key else (None, 0.0)


def _stream(spec: BenchSpec, adapter: Adapter, predict: Callable[[list[int]], torch.Tensor], stream: list[int],
            labels: list[int], path: Path, key: str, fail_after: int | None,
            reset: bool = True, step: int = 1, ckpt_path: Path | None = None) -> tuple[dict[str, Any], Samples]:
    """Feed the stream ``step`` images per step (one for online methods, ``batch_size`` for batch methods,
    ``batch_images`` for episodic ones; an episodic stream resumes from its checkpoint, whatever its step was);
    its timing and per-sample record.  Latency is per image (a step's time divided by its images).  An episodic
    step of several images that runs out of GPU memory is retried with half as many (episodic results do not
    depend on the step).  ``reset``: start from a fresh adapter state (a continual run keeps the state of the
    previous domain); ``ckpt_path``: where an episodic stream checkpoints."""
    from tqdm.auto import tqdm

    episodic, ckpt_path = adapter.method.episodic, ckpt_path or _checkpoint_path(path)
    done, wall_s = _resume(ckpt_path, key) if episodic else (None, 0.0)
    recorder = Recorder(start=done)
    resumed_from, start, first_step = len(recorder), time.perf_counter(), step
    if reset:
        adapter.reset()
    correct = int(done.correct.sum()) if done is not None else 0
    bar = tqdm(total=len(stream), initial=resumed_from, desc=f"{adapter.method.name} {path.name.split('__')[0]}",
               unit="img", disable=not spec.progress)
    try:
        pos = resumed_from
        while pos < len(stream):
            rows = stream[pos:pos + step]
            tick = time.perf_counter()
            try:
                probs = predict(rows)
            except torch.OutOfMemoryError:
                if not episodic or is_batch_method(adapter) or len(rows) == 1:
                    raise
                step = max(1, len(rows) // 2)
                _free_device_memory()
                _warn(f"{adapter.method.name}: out of memory at {len(rows)} images per step; retrying with {step}.")
                continue
            latency = 1000 * (time.perf_counter() - tick) / len(rows)
            for index, row in zip(rows, probs):
                label = labels[index]  # labels: metric only
                recorder.add(row, label, latency, index)
                correct += int(int(row.argmax()) == label)
            bar.update(len(rows))
            pos = done = pos + len(rows)
            if done % 50 < len(rows) or done == len(stream):
                bar.set_postfix(acc=f"{100 * correct / done:.2f}%", refresh=False)
            if episodic and done % spec.checkpoint_every < len(rows):
                recorder.samples().save(ckpt_path, meta={"config_key": key,
                                                         "wall_s": wall_s + time.perf_counter() - start})
            if fail_after is not None and done - resumed_from >= fail_after:
                raise InjectedFailure(f"injected failure after {fail_after} images ({FAIL_ENV} / fail_after)")
    finally:
        bar.close()
    if not len(recorder):
        raise ValueError("The stream is empty: no images to evaluate.")
    samples = recorder.samples()
    reduced = {"batch_images_reduced_to": step} if step != first_step else {}
    return {"resumed_from": resumed_from, **reduced,
            "timing": stream_timing(samples, wall_s + time.perf_counter() - start)}, samples


def stream_timing(samples: Samples, wall_s: float) -> dict[str, float]:
    """The ``timing`` record of a stream: its wall time and the per-image latency statistics."""
    latency = samples.latency_ms.astype(float)
    return {"wall_s": wall_s, "latency_ms_mean": float(latency.mean()), "latency_ms_median": float(np.median(latency)),
            "latency_ms_p90": float(np.percentile(latency, 90))}


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
