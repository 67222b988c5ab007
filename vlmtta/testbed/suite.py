"""The testbed suite: every method on every corruption of the Fashion-MNIST test split, one table.

Each (method, corruption) cell is the top-1 accuracy (%) of ``vlmtta.Adapter(CLASSNAMES, method,
backbone=<vlmtta-testbed>, seed=seed)`` fed a fixed, seeded subset of the test split, corrupted at
``severity`` and streamed in ``order``.  Methods that run on view features share the encoded views:
each image's views are made (``vlmtta.views.make_views``, the seed ``Adapter.step`` would use) and
encoded once per view configuration, then reused by every such method.  Batch methods (SubTTA, Tent,
SAR, DeYO, BATCLIP, WATT, CLIPArTT) take the stream ``batch_size`` original views at a time (their
papers' protocol) and are reset at the start of each corruption's stream (one domain); episodic methods take
``batch_images`` images per step (``vlmtta.bench``'s option, same results).  Labels are read by the
metric only (and, for the ``dirichlet`` order, to build the correlated order, as published
protocols do).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from ..api import Adapter
from ..backbone import FrozenCLIP, load_backbone
from ..cache import atomic_write
from ..metrics import Samples
from ..methods import Need, get_method_class, method_names
from ..speed import memory_record, peak_memory
from ..streams import StreamOrder, iid_order, stream_order
from ..views import make_views, view_seed
from . import corruptions as C
from .fashion_mnist import CLASSNAMES, load_split, to_rgb

MODEL = "vlmtta-testbed"
_CANNOT_RUN = (ImportError, OSError, RuntimeError, ValueError, NotImplementedError)
DEFAULT_N = 200


@dataclass
class SuiteResult:
    """Accuracy (%) per method and corruption, with what the numbers depend on."""

    accuracy: dict[str, dict[str, float]]  # method -> corruption -> top-1 %
    errors: dict[str, str] = field(default_factory=dict)  # method -> why it could not run
    seconds: dict[str, float] = field(default_factory=dict)  # method -> wall time (views shared: first pays)
    protocol: dict[str, Any] = field(default_factory=dict)
    cells: dict[str, dict[str, "Cell"]] = field(default_factory=dict)  # method -> corruption -> per-sample record

    def mean(self, method: str) -> float:
        row = self.accuracy[method]
        return sum(row.values()) / len(row)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "cells"}
        return {**data, "mean": {m: self.mean(m) for m in self.accuracy}}


@dataclass
class Cell:
    """One method on one corruption: its per-sample record, the shared encoding cost and peak memory."""

    samples: Samples
    encode_ms_per_image: float  # views encoded once and shared (0 for methods that encode their own)
    memory: dict[str, Any]


def subset(n: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded subset of ``n`` test images (uint8 [n, 28, 28]) and labels; ``None`` = all 10,000."""
    images, labels = load_split("test")
    if n is None or n >= len(labels):
        return images, labels
    rows = iid_order(len(labels), seed)[:n]
    return images[rows], labels[rows]


def corrupted_stream(images: torch.Tensor, labels: torch.Tensor, corruption: str, severity: int, seed: int = 0,
                     order: str = "iid") -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB images [N, 3, 28, 28] corrupted (``clean``: untouched) and put in stream order, with labels."""
    pixels = images[:, None].float().div(255.0)
    if corruption != "clean":
        pixels = C.corrupt(pixels, corruption, severity, seed)
    rows = stream_order(labels, order, seed)
    return to_rgb(C.to_uint8(pixels)[rows, 0]), labels[rows]


class ViewFeatures:
    """Encoded views of one stream, made and encoded once per view configuration, reused by methods."""

    def __init__(self, backbone: FrozenCLIP, images: torch.Tensor, seed: int):
        self.backbone, self.images, self.seed = backbone, images, seed
        self._cache: dict[Any, list[torch.Tensor]] = {}
        self.encode_seconds: dict[Any, float] = {}  # config -> time to make and encode every image's views

    def get(self, config, batch_size: int = 512) -> list[torch.Tensor]:
        """Features [n_views, D] of every image, views seeded as ``Adapter.step`` seeds them (encoded in batches)."""
        if config not in self._cache:
            began = time.perf_counter()
            per_batch = max(1, batch_size // config.n_views)
            features = []
            for start in range(0, len(self.images), per_batch):
                views = [make_views(image.to(self.backbone.device), config, seed=view_seed(self.seed, start + k))
                         for k, image in enumerate(self.images[start:start + per_batch])]
                features.extend(self.backbone.encode_images(torch.cat(views), batch_size).split(config.n_views))
            self._cache[config] = features
            self.encode_seconds[config] = time.perf_counter() - began
        return self._cache[config]


def batch_predictions(adapter: Adapter, images: torch.Tensor, batch_size: int) -> list[int]:
    """Predictions of a batch method fed ``images`` (uint8 [N, 3, H, W]) ``batch_size`` at a time, in order."""
    return [int(i) for start in range(0, len(images), batch_size)
            for i in adapter.adapt_batch(adapter.original_views(images[start:start + batch_size])).argmax(dim=-1)]


def evaluate(adapter: Adapter, images: torch.Tensor, labels: torch.Tensor, views: ViewFeatures | None = None,
             batch_size: int | None = 64) -> float:
    """Top-1 accuracy (%) of ``adapter`` on a stream, using shared view features when it can."""
    return 100.0 * float(evaluate_samples(adapter, images, labels, views, batch_size)[0].correct.mean())


def evaluate_samples(adapter: Adapter, images: torch.Tensor, labels: torch.Tensor,
                     views: ViewFeatures | None = None, batch_size: int | None = 64,
                     batch_images: int | str = 1) -> tuple[Samples, float]:
    """The per-sample record of ``adapter`` on a stream, and the shared encoding cost per image (ms; 0 when
    the method encodes its own views, which its per-sample latency then includes).  Batch methods take
    ``batch_size`` images per step (``None``: one image's views per step, their streaming mode); episodic
    methods ``batch_images`` (``"auto"``: ``vlmtta.bench.auto_batch_images``; same results as one at a time);
    latency is a step's time divided by its images."""
    adapter.reset()
    on_features = views is not None and Need.VIEW_FEATURES in adapter.method.needs
    step_images = _images_per_step(adapter, on_features, batch_size, batch_images)
    if step_images > 1:
        return _evaluate_many(adapter, images, labels, views, step_images)
    rows, latency, encode_ms = [], [], 0.0
    if batch_size and hasattr(adapter.method, "predict_batch"):
        for start in range(0, len(images), batch_size):
            tick = time.perf_counter()
            probs = adapter.adapt_batch(adapter.original_views(images[start:start + batch_size])).float().cpu()
            rows.extend(probs)
            latency.extend([1000.0 * (time.perf_counter() - tick) / len(probs)] * len(probs))
        return Samples.from_probabilities(torch.stack(rows), labels.tolist(), latency), encode_ms
    if views is not None and Need.VIEW_FEATURES in adapter.method.needs:
        features = views.get(adapter.view_config)
        encode_ms = 1000.0 * views.encode_seconds[adapter.view_config] / max(1, len(features))
        step = adapter.adapt_features
    else:
        features = images

        def step(image: torch.Tensor) -> torch.Tensor:
            return torch.tensor(list(adapter.step(image).probabilities.values()))
    for item in features:
        tick = time.perf_counter()
        rows.append(step(item).float().cpu())
        latency.append(1000.0 * (time.perf_counter() - tick))
    return Samples.from_probabilities(torch.stack(rows), labels.tolist(), latency), encode_ms


def _images_per_step(adapter: Adapter, on_features: bool, batch_size: int | None, batch_images: int | str) -> int:
    """Images per step of an episodic method without a batch protocol (1 for every other method)."""
    from ..bench import auto_batch_images, check_batch_images

    value = check_batch_images(batch_images)
    if not adapter.method.episodic or (batch_size and hasattr(adapter.method, "predict_batch")):
        return 1
    return auto_batch_images(adapter.backbone.device, on_features) if value == "auto" else value


def _evaluate_many(adapter: Adapter, images: torch.Tensor, labels: torch.Tensor, views: ViewFeatures | None,
                   step_images: int) -> tuple[Samples, float]:
    """``evaluate_samples`` of an episodic method ``step_images`` images per step (shared features, or
    ``Adapter.step_many``, whose views are seeded as ``step`` seeds them)."""
    rows, latency, encode_ms = [], [], 0.0
    if views is not None and Need.VIEW_FEATURES in adapter.method.needs:
        features = views.get(adapter.view_config)
        encode_ms = 1000.0 * views.encode_seconds[adapter.view_config] / max(1, len(features))

        def step(start: int) -> torch.Tensor:
            return adapter.adapt_features_many(torch.stack(features[start:start + step_images]))
    else:
        def step(start: int) -> torch.Tensor:
            predictions = adapter.step_many(list(images[start:start + step_images]))
            return torch.tensor([list(p.probabilities.values()) for p in predictions])
    for start in range(0, len(images), step_images):
        tick = time.perf_counter()
        probs = step(start).float().cpu()
        rows.extend(probs)
        latency.extend([1000.0 * (time.perf_counter() - tick) / len(probs)] * len(probs))
    return Samples.from_probabilities(torch.stack(rows), labels.tolist(), latency), encode_ms


def run_suite(methods: Sequence[str] | None = None, severity: int = 3, n_per_corruption: int | None = DEFAULT_N,
              seed: int = 0, corruptions: Iterable[str] | None = None, order: str = "iid",
              options: dict[str, dict[str, Any]] | None = None, backbone: FrozenCLIP | None = None,
              device: str = "auto", progress: Callable[[str], None] | None = None,
              batch_size: int | None = 64, batch_images: int | str = "auto") -> SuiteResult:
    """Run ``methods`` (default: every registered one) on every corruption; see the module docstring.

    Args:
        severity: corruption severity 1..5.
        n_per_corruption: test images per corruption (the same seeded subset for each), 1..10000; ``None`` = all.
        corruptions: names from ``corruptions.corruption_names()`` (and/or ``"clean"``); default: all.
        order: stream order (``vlmtta.streams``), e.g. ``iid`` or ``dirichlet:0.1`` (labels shape the order only).
        options: per-method hyperparameters, e.g. ``{"tpt": {"n_views": 16}}``; a name the method does not
            take is an error.
        backbone: a ``FrozenCLIP`` (default: ``load_backbone("vlmtta-testbed", device=device)``).
        progress: called with a line after every cell.
        batch_size: images per adaptation step of batch methods (``None``: per image, on its views).
        batch_images: images adapted at once by episodic methods (``"auto"``: ``vlmtta.bench.auto_batch_images``);
            the results are those of one image at a time.
    """
    methods = list(methods or method_names())
    corruptions = list(corruptions or C.corruption_names())
    unknown = [c for c in corruptions if c != "clean" and c not in C.CORRUPTIONS]
    if unknown:
        raise ValueError(f"Unknown corruption(s) {', '.join(unknown)}; accepted: clean, {', '.join(C.CORRUPTIONS)}.")
    _check_settings(severity, n_per_corruption)
    order = str(StreamOrder.parse(order))
    _check_options(methods, options or {})
    backbone = backbone or load_backbone(MODEL, device=device)
    adapters, errors = _adapters(methods, backbone, seed, options or {})
    images, labels = subset(n_per_corruption, seed)
    result = SuiteResult({name: {} for name in adapters}, errors, {name: 0.0 for name in adapters},
                         _protocol(adapters, severity, labels, seed, order, backbone, batch_size, batch_images),
                         {name: {} for name in adapters})
    for corruption in corruptions:
        stream, truth = corrupted_stream(images, labels, corruption, severity, seed, order)
        views = ViewFeatures(backbone, stream, seed)
        for name, adapter in list(adapters.items()):
            start = time.perf_counter()
            try:
                if Need.VIEW_FEATURES in adapter.method.needs and not (batch_size and
                                                                    hasattr(adapter.method, "predict_batch")):
                    views.get(adapter.view_config)  # shared: encoded once, outside every method's memory peak
                with peak_memory(backbone.device) as memory:
                    samples, encode_ms = evaluate_samples(adapter, stream, truth, views, batch_size, batch_images)
            except _CANNOT_RUN as error:  # e.g. a method whose extra model is not available offline
                result.errors[name] = f"{type(error).__name__}: {error}"
                del adapters[name], result.accuracy[name], result.seconds[name], result.cells[name]
                continue
            result.seconds[name] += time.perf_counter() - start
            result.accuracy[name][corruption] = 100.0 * float(samples.correct.mean())
            result.cells[name][corruption] = Cell(samples, encode_ms, memory_record(backbone.device, memory))
            if progress:
                progress(f"{name:>14} {corruption:<15} {result.accuracy[name][corruption]:6.2f} %")
    return result


def _check_settings(severity: int, n_per_corruption: int | None) -> None:
    if isinstance(severity, bool) or severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}.")
    if n_per_corruption is not None and (isinstance(n_per_corruption, bool) or not 1 <= n_per_corruption <= 10_000):
        raise ValueError(f"n_per_corruption must be in 1..10000 (the Fashion-MNIST test split), got "
                         f"{n_per_corruption!r}.")


def _check_options(methods: list[str], options: dict[str, dict[str, Any]]) -> None:
    """Every option must be a hyperparameter of its method (methods that are not registered are reported later)."""
    for name, given in options.items():
        if name not in methods or not given:
            continue
        try:
            accepted = get_method_class(name).defaults()
        except (KeyError, ValueError):
            continue
        wrong = sorted(set(given) - set(accepted))
        if wrong:
            raise ValueError(f"{name} takes no option {', '.join(wrong)}; accepted: {', '.join(accepted)}.")


def _adapters(methods: list[str], backbone: FrozenCLIP, seed: int,
              options: dict[str, dict[str, Any]]) -> tuple[dict[str, Adapter], dict[str, str]]:
    """An adapter per method; methods that cannot be built here (missing extras, ...) are reported, not run."""
    adapters, errors = {}, {}
    for name in methods:
        try:
            adapters[name] = Adapter(CLASSNAMES, name, backbone=backbone, seed=seed, **options.get(name, {}))
        except _CANNOT_RUN as error:
            errors[name] = f"{type(error).__name__}: {error}"
    return adapters, errors


def _protocol(adapters: dict[str, Adapter], severity: int, labels: torch.Tensor, seed: int, order: str,
              backbone: FrozenCLIP, batch_size: int | None = None, batch_images: int | str = 1) -> dict[str, Any]:
    stream = StreamOrder.parse(order).describe(seed, int(labels.unique().numel()))
    methods = {name: adapter.protocol() for name, adapter in adapters.items()}
    for name, adapter in adapters.items():
        if batch_size and hasattr(adapter.method, "predict_batch"):
            methods[name].update(batch_size=batch_size, views="original view only", reset_at="start of each corruption")
        elif adapter.method.episodic:  # same results whatever it is
            on_features = Need.VIEW_FEATURES in adapter.method.needs  # the suite shares encoded views
            methods[name]["batch_images"] = _images_per_step(adapter, on_features, batch_size, batch_images)
    return {"backbone": backbone.describe(), "dataset": "fashion-mnist test", "images_per_corruption": len(labels),
            "severity": severity, "seed": seed, "order": order, "stream": stream, "methods": methods}


def format_table(result: SuiteResult, fmt: str = "text") -> str:
    """The method x corruption table with a mean column: ``text`` (aligned), ``markdown`` or ``csv``."""
    corruptions = list(next(iter(result.accuracy.values()), {}))
    header = ["method", *corruptions, "mean"]
    rows = [[name, *(f"{row[c]:.1f}" for c in corruptions), f"{result.mean(name):.1f}"]
            for name, row in result.accuracy.items() if row]
    rows += [[name, *("n/a" for _ in corruptions), "n/a"] for name in result.errors]
    if fmt == "csv":
        return "\n".join(",".join(cells) for cells in [header, *rows])
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])
    if fmt != "text":
        raise ValueError(f"Unknown table format {fmt!r}; accepted: text, markdown, csv.")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    notes = [f"{name}: not run ({why})" for name, why in result.errors.items()]
    return "\n".join(lines + notes)


def options_tag(options: dict[str, Any]) -> str:
    """What tells a run with non-default options apart in file names and table rows (``""`` for defaults)."""
    return ",".join(f"{k}={v}" for k, v in sorted(options.items()))


def settings_label(severity: int, n: int, order: str) -> str:
    return f"testbed-s{severity}-n{n}-{order.replace(':', '')}"


def save_suite(result: SuiteResult, folder: str | Path,
               options: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Write one result per method and corruption under ``folder`` (JSON + per-sample ``.npz``, atomically).

    The file name carries every setting (severity, images, order, corruption, method and its options, model,
    weights, seed), so runs with other settings or other methods never overwrite each other; a re-run with
    the same settings replaces its own files.
    """
    from ..bench import versions
    from ..results import result_name, save_result

    p, saved = result.protocol, []
    backbone, n, order = p["backbone"], p["images_per_corruption"], p["order"]
    settings = {"severity": p["severity"], "n_per_corruption": n, "order": order}
    suite_facts = {k: v for k, v in p.items() if k not in ("methods", "backbone")}
    for method, cells in result.cells.items():
        tag = options_tag((options or {}).get(method, {}))
        for corruption, cell in cells.items():
            name = result_name(f"{settings_label(p['severity'], n, order)}-{corruption}", method, backbone["model"],
                               backbone["pretrained"], p["seed"], tag)
            latency = cell.samples.latency_ms.astype(float)
            record = {"dataset": corruption, "method": method, "tag": tag, "model": backbone["model"],
                      "pretrained": backbone["pretrained"], "seed": p["seed"], "suite": "testbed",
                      "suite_settings": settings,
                      "timing": {"latency_ms_mean": float(latency.mean()),
                                 "latency_ms_median": float(np.median(latency)),
                                 "latency_ms_p90": float(np.percentile(latency, 90)),
                                 "encode_ms_per_image": cell.encode_ms_per_image},
                      "memory": cell.memory,
                      "protocol": {**suite_facts, **p["methods"][method], "corruption": corruption,
                                   "labels_used_for": "metric only" + (" and the dirichlet order"
                                                                       if order.startswith("dirichlet") else "")},
                      "versions": versions(), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            path = Path(folder) / name
            saved.append({**save_result(path, record, cell.samples), "_source": str(path)})
    return saved


def write_summary(folder: str | Path, severity: int, n: int, order: str, seed: int,
                  warn: Callable[[str], None] | None = None) -> tuple[Path, Path | None]:
    """The top-1 and ECE tables of every method run at these settings in ``folder`` (``.md``), and beside it
    their Pareto plot (``.png``; ``None`` without matplotlib)."""
    from ..results import format_tables, load_results, testbed_group

    results = [r for r in load_results(folder, warn) if testbed_group(r) == (severity, n, order) and r["seed"] == seed]
    stem = f"{settings_label(severity, n, order)}__seed{seed}"
    table, figure = Path(folder) / f"{stem}.md", Path(folder) / f"{stem}.png"
    text = "".join(format_tables(results, "md", metric) for metric in ("top1", "ece", "latency"))
    atomic_write(table, lambda handle: handle.write(text.encode("utf-8")))
    from ..plots import plot_pareto

    try:
        plot_pareto(results, figure,
                    title=f"Fashion-MNIST testbed: mean over the corruptions at severity {severity}, {n} images each")
    except (ImportError, ValueError) as error:  # no matplotlib (the plot extra), or nothing comparable
        if warn:
            warn(f"no Pareto plot: {error}")
        return table, None
    return table, figure


def severity_table(method: str = "zeroshot", n_per_corruption: int | None = 1000, seed: int = 0,
                   backbone: FrozenCLIP | None = None, device: str = "auto") -> SuiteResult:
    """``method``'s accuracy per corruption (rows ``severity 1..5``, plus ``clean``): how hard each shift is."""
    backbone = backbone or load_backbone(MODEL, device=device)
    table: dict[str, dict[str, float]] = {}
    for severity in range(1, 6):
        run = run_suite([method], severity, n_per_corruption, seed, ["clean", *C.corruption_names()],
                        backbone=backbone)
        if run.errors:
            raise ValueError(run.errors[method])
        table[f"severity {severity}"] = run.accuracy[method]
    return SuiteResult(table, protocol={**run.protocol, "severity": "1..5", "method": method})


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vlmtta.testbed.suite [--methods a,b] [--severity 3] [-n 200] [--severities]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vlmtta.testbed.suite", description=main.__doc__)
    parser.add_argument("--methods", default=None, help="comma-separated (default: all registered)")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("-n", "--n-per-corruption", type=int, default=DEFAULT_N)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", default="iid", help="iid (default) or dirichlet[:ALPHA] (vlmtta.streams)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step of batch methods")
    parser.add_argument("--batch-images", default="auto", help="images per step of episodic methods (same results)")
    parser.add_argument("--severities", action="store_true", help="zero-shot accuracy at every severity instead")
    parser.add_argument("--format", default="text", choices=["text", "markdown", "csv"])
    args = parser.parse_args(argv)
    if args.severities:
        result = severity_table(n_per_corruption=args.n_per_corruption, seed=args.seed)
    else:
        methods = args.methods.split(",") if args.methods else None
        result = run_suite(methods, args.severity, args.n_per_corruption, args.seed, order=args.order,
                           progress=lambda line: print(line, flush=True), batch_size=args.batch_size,
                           batch_images=args.batch_images)
    print(format_table(result, args.format))


if __name__ == "__main__":
    main()
