"""The testbed suite: every method on every corruption of the Fashion-MNIST test split, one table.

Each (method, corruption) cell is the top-1 accuracy (%) of ``vlmtta.Adapter(CLASSNAMES, method,
backbone=<vlmtta-testbed>, seed=seed)`` fed a fixed, seeded subset of the test split, corrupted at
``severity`` and streamed in ``order``.  Methods that run on view features share the encoded views:
each image's views are made (``vlmtta.views.make_views``, the seed ``Adapter.step`` would use) and
encoded once per view configuration, then reused by every such method.  Batch methods (SubTTA, Tent,
SAR, DeYO, BATCLIP, WATT, CLIPArTT) take the stream ``batch_size`` original views at a time (their
papers' protocol) and are reset at the start of each corruption's stream (one domain).  Labels are read by the
metric only (and, for the ``dirichlet`` order, to build the correlated order, as published
protocols do).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from ..api import Adapter
from ..backbone import FrozenCLIP, load_backbone
from ..methods import Need, method_names
from ..views import make_views, view_seed
from . import corruptions as C
from .fashion_mnist import CLASSNAMES, load_split, to_rgb
from .streams import iid_order, stream_order

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

    def mean(self, method: str) -> float:
        row = self.accuracy[method]
        return sum(row.values()) / len(row)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean": {m: self.mean(m) for m in self.accuracy}}


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

    def get(self, config, batch_size: int = 512) -> list[torch.Tensor]:
        """Features [n_views, D] of every image, views seeded as ``Adapter.step`` seeds them (encoded in batches)."""
        if config not in self._cache:
            per_batch = max(1, batch_size // config.n_views)
            features = []
            for start in range(0, len(self.images), per_batch):
                views = [make_views(image.to(self.backbone.device), config, seed=view_seed(self.seed, start + k))
                         for k, image in enumerate(self.images[start:start + per_batch])]
                features.extend(self.backbone.encode_images(torch.cat(views), batch_size).split(config.n_views))
            self._cache[config] = features
        return self._cache[config]


def batch_predictions(adapter: Adapter, images: torch.Tensor, batch_size: int) -> list[int]:
    """Predictions of a batch method fed ``images`` (uint8 [N, 3, H, W]) ``batch_size`` at a time, in order."""
    return [int(i) for start in range(0, len(images), batch_size)
            for i in adapter.adapt_batch(adapter.original_views(images[start:start + batch_size])).argmax(dim=-1)]


def evaluate(adapter: Adapter, images: torch.Tensor, labels: torch.Tensor, views: ViewFeatures | None = None,
             batch_size: int | None = 64) -> float:
    """Top-1 accuracy (%) of ``adapter`` on a stream, using shared view features when it can; batch methods take
    ``batch_size`` images per step (``None``: one image's views per step, their streaming mode)."""
    adapter.reset()
    if batch_size and hasattr(adapter.method, "predict_batch"):
        predictions = batch_predictions(adapter, images, batch_size)
    elif views is not None and Need.VIEW_FEATURES in adapter.method.needs:
        predictions = [int(adapter.adapt_features(f).argmax()) for f in views.get(adapter.view_config)]
    else:
        predictions = [adapter.step(image).index for image in images]
    return 100.0 * float((torch.tensor(predictions) == labels).float().mean())


def run_suite(methods: Sequence[str] | None = None, severity: int = 3, n_per_corruption: int | None = DEFAULT_N,
              seed: int = 0, corruptions: Iterable[str] | None = None, order: str = "iid",
              options: dict[str, dict[str, Any]] | None = None, backbone: FrozenCLIP | None = None,
              device: str = "auto", progress: Callable[[str], None] | None = None,
              batch_size: int | None = 64) -> SuiteResult:
    """Run ``methods`` (default: every registered one) on every corruption; see the module docstring.

    Args:
        severity: corruption severity 1..5.
        n_per_corruption: test images per corruption (the same seeded subset for each), ``None`` = all.
        corruptions: names from ``corruptions.corruption_names()`` (and/or ``"clean"``); default: all.
        order: stream order, ``iid`` or ``dirichlet``.
        options: per-method hyperparameters, e.g. ``{"tpt": {"n_views": 16}}``.
        backbone: a ``FrozenCLIP`` (default: ``load_backbone("vlmtta-testbed", device=device)``).
        progress: called with a line after every cell.
        batch_size: images per adaptation step of batch methods (``None``: per image, on its views).
    """
    methods = list(methods or method_names())
    corruptions = list(corruptions or C.corruption_names())
    unknown = [c for c in corruptions if c != "clean" and c not in C.CORRUPTIONS]
    if unknown:
        raise ValueError(f"Unknown corruption(s) {', '.join(unknown)}; accepted: clean, {', '.join(C.CORRUPTIONS)}.")
    backbone = backbone or load_backbone(MODEL, device=device)
    adapters, errors = _adapters(methods, backbone, seed, options or {})
    images, labels = subset(n_per_corruption, seed)
    result = SuiteResult({name: {} for name in adapters}, errors, {name: 0.0 for name in adapters},
                         _protocol(adapters, severity, len(labels), seed, order, backbone, batch_size))
    for corruption in corruptions:
        stream, truth = corrupted_stream(images, labels, corruption, severity, seed, order)
        views = ViewFeatures(backbone, stream, seed)
        for name, adapter in list(adapters.items()):
            start = time.perf_counter()
            try:
                result.accuracy[name][corruption] = evaluate(adapter, stream, truth, views, batch_size)
            except _CANNOT_RUN as error:  # e.g. a method whose extra model is not available offline
                result.errors[name] = f"{type(error).__name__}: {error}"
                del adapters[name], result.accuracy[name], result.seconds[name]
                continue
            result.seconds[name] += time.perf_counter() - start
            if progress:
                progress(f"{name:>14} {corruption:<15} {result.accuracy[name][corruption]:6.2f} %")
    return result


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


def _protocol(adapters: dict[str, Adapter], severity: int, n: int, seed: int, order: str,
              backbone: FrozenCLIP, batch_size: int | None = None) -> dict[str, Any]:
    methods = {name: adapter.protocol() for name, adapter in adapters.items()}
    for name, adapter in adapters.items():
        if batch_size and hasattr(adapter.method, "predict_batch"):
            methods[name].update(batch_size=batch_size, views="original view only", reset_at="start of each corruption")
    return {"backbone": backbone.describe(), "dataset": "fashion-mnist test", "images_per_corruption": n,
            "severity": severity, "seed": seed, "order": order, "methods": methods}


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
    parser.add_argument("--order", default="iid", choices=["iid", "dirichlet"])
    parser.add_argument("--batch-size", type=int, default=64, help="images per step of batch methods")
    parser.add_argument("--severities", action="store_true", help="zero-shot accuracy at every severity instead")
    parser.add_argument("--format", default="text", choices=["text", "markdown", "csv"])
    args = parser.parse_args(argv)
    if args.severities:
        result = severity_table(n_per_corruption=args.n_per_corruption, seed=args.seed)
    else:
        methods = args.methods.split(",") if args.methods else None
        result = run_suite(methods, args.severity, args.n_per_corruption, args.seed, order=args.order,
                           progress=lambda line: print(line, flush=True), batch_size=args.batch_size)
    print(format_table(result, args.format))


if __name__ == "__main__":
    main()
