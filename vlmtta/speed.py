"""Speed benchmark: per-sample latency and peak memory of each method, next to encoding the views alone.

Every figure is a median over ``repeats`` timed steps after ``warmup`` untimed ones, on a random
500x375 test image; class text embeddings are built (and cached) before timing, as in a real
stream.  Two memory figures: ``peak_mem_mb``, the peak growth over the level before the timed
steps (what a step allocates on top of everything already held), and ``total_mem_mb``, the
absolute peak (model weights and state a method keeps between images included: the figure to
compare methods by).  On GPU both come from the CUDA allocator; on CPU from the process's resident
memory, sampled every millisecond (an approximation).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .api import Adapter
from .backbone import FrozenCLIP, load_backbone
from .methods import Context, create_method, method_names
from .prompts import dataset_classnames
from .views import make_views, view_seed


def benchmark_classnames(n_classes: int) -> list[str]:
    """ImageNet class names (synthetic names past 1000)."""
    names = dataset_classnames("imagenet")
    return names[:n_classes] + [f"synthetic class {i}" for i in range(len(names), n_classes)]


def random_context(backbone: FrozenCLIP, n_classes: int, seed: int = 0) -> Context:
    """A class set of ``n_classes`` random unit text features bound to ``backbone`` (scale 100), for timing methods."""
    generator = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(n_classes, backbone.embed_dim, generator=generator), dim=-1).to(backbone.device)
    return Context([f"class {i}" for i in range(n_classes)], [], text, 100.0, backbone)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Yield a dict that holds ``peak_mb`` (growth over the starting level) and ``total_mb`` (absolute peak)
    once the block ends."""
    result: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak_mb"] = (torch.cuda.max_memory_allocated(device) - start) / 2**20
        result["total_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    start, peak, done = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        top = max(peak[0], _rss_bytes())
        result["peak_mb"], result["total_mb"] = max(0, top - start) / 2**20, top / 2**20


def memory_record(device: torch.device, memory: dict[str, float]) -> dict[str, Any]:
    """Peak memory of a stream: the CUDA allocator's peak on GPU, the growth of resident memory on CPU."""
    if device.type == "cuda":
        return {"device": str(device), "peak_mb": memory["total_mb"], "growth_mb": memory["peak_mb"],
                "measure": "CUDA max_memory_allocated over the stream"}
    return {"device": str(device), "peak_mb": memory["peak_mb"], "rss_peak_mb": memory["total_mb"],
            "measure": "growth of the process's resident memory over the stream (sampled every ms)"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 0) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones (CUDA-synced)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time(fn: Callable[[int], Any], device: torch.device, repeats: int, warmup: int) -> tuple[float, dict[str, float]]:
    """Median seconds of ``fn(i)`` (i counts calls, so each sees new views) and the memory figures of the timed
    calls (``peak_mem_mb``, ``total_mem_mb``; see the module docstring)."""
    calls = iter(range(warmup + repeats))
    for _ in range(warmup):
        fn(next(calls))
    with peak_memory(device) as memory:
        seconds = median_seconds(lambda: fn(next(calls)), device, repeats)
    return seconds, {"peak_mem_mb": memory["peak_mb"], "total_mem_mb": memory["total_mb"]}


def _bench_adapter(name: str, classes: list[str], backbone: FrozenCLIP, n_views: int,
                   method_options: dict[str, dict[str, Any]] | None) -> Adapter:
    """``name`` bound to ``backbone`` with ``n_views`` views, a random reward model (RLCF) and the caller's options."""
    options = _view_options(name, n_views) | _random_reward(name, backbone) | (method_options or {}).get(name, {})
    return Adapter(classes, name, backbone=backbone, **options)


def run_speed_benchmark(
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    methods: Sequence[str] | None = None,
    n_views: int = 64,
    n_classes: int = 1000,
    device: str = "auto",
    repeats: int = 5,
    warmup: int = 1,
    backbone: FrozenCLIP | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    output: str | Path | None = None,
    on_row: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """Time every method (default: all registered) on one backbone; returns the protocol and one row per entry.
    ``on_row`` (if given) sees each row as soon as it is timed or taken from ``output``.

    Each method's ``ratio_to_encode`` divides its latency by an encode-only timing (``encode_ms``: making and
    encoding its views, same repeats) taken just before it, so a machine whose speed drifts during a long table
    (a shared CPU: +-15 % between minutes on the 2-core test machine) does not bias the later rows; the first row
    is that floor timed once at the start.

    With ``output``, the result so far is written there (atomically) after every row, marked ``"complete":
    false`` until the last; a re-run with the same protocol keeps the rows already in that file and times only
    the missing entries (a long CPU table survives an interruption).  Kept rows carry ``"resumed": true``:
    they were timed in the earlier run, under whatever load it had.
    """
    backbone = backbone or load_backbone(model, pretrained, device)
    classes = benchmark_classnames(n_classes)
    image = synthetic_stream(1, backbone.device)[0]
    protocol = {**backbone.describe(), "n_classes": n_classes, "n_views": n_views, "repeats": repeats,
                "warmup": warmup, "torch": torch.__version__, "threads": torch.get_num_threads(),
                "image": "random 500x375 RGB", "ratio_to_encode": "paired"}
    done = _finished_rows(output, protocol)
    encode = f"encode {n_views} views"
    rows = [{**(done.get(encode) or _encode_row(backbone, image, n_views, repeats, warmup)), "ratio_to_encode": 1.0}]
    report = on_row or (lambda row: None)
    report(rows[0])
    _save_partial(output, protocol, rows, complete=False)
    for name in methods or method_names():
        if name in done:
            rows.append(done[name])
            report(rows[-1])
            continue
        adapter = _bench_adapter(name, classes, backbone, n_views, method_options)
        encode_ms = _encode_row(backbone, image, adapter.view_config.n_views, repeats, warmup)["latency_ms"]
        seconds, memory = _time(lambda i, adapter=adapter: adapter.step(image), backbone.device, repeats, warmup)
        rows.append({"entry": name, "n_views": adapter.view_config.n_views, "latency_ms": 1000 * seconds, **memory,
                     "encode_ms": encode_ms, "ratio_to_encode": 1000 * seconds / encode_ms})
        del adapter  # its state must not count in the next method's memory
        report(rows[-1])
        _save_partial(output, protocol, rows, complete=False)
    _save_partial(output, protocol, rows, complete=True)
    return {"protocol": protocol, "rows": rows}


def _finished_rows(output: str | Path | None, protocol: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The rows of an earlier run saved at ``output`` under the same protocol, by entry (marked resumed)."""
    if output is None or not Path(output).is_file():
        return {}
    try:
        earlier = json.loads(Path(output).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(earlier, dict) or earlier.get("protocol") != protocol:
        return {}
    return {row["entry"]: {**row, "resumed": True} for row in earlier.get("rows", []) if "entry" in row}


def _save_partial(output: str | Path | None, protocol: dict[str, Any], rows: list[dict[str, Any]],
                  complete: bool) -> None:
    if output is not None:
        save_result({"protocol": protocol, "rows": rows, "complete": complete}, output)


def _view_options(name: str, n_views: int) -> dict[str, Any]:
    """Pass ``n_views`` to methods that take it."""
    return {"n_views": n_views} if "n_views" in create_method(name).defaults() else {}


def _random_reward(name: str, backbone: FrozenCLIP) -> dict[str, Any]:
    """Methods with a second CLIP (RLCF's reward model) get random weights too when the backbone has them."""
    return {"reward_pretrained": None} if backbone.pretrained is None and "reward_pretrained" in create_method(
        name).defaults() else {}


def _encode_row(backbone: FrozenCLIP, image: torch.Tensor, n_views: int, repeats: int, warmup: int) -> dict[str, Any]:
    """The floor: making ``n_views`` rrc+flip views and encoding them once."""
    config = create_method("zeroshot", n_views=n_views).view_config(backbone)
    seconds, memory = _time(lambda i: backbone.encode_images(make_views(image, config, view_seed(0, i))),
                            backbone.device, repeats, warmup)
    return {"entry": f"encode {n_views} views", "n_views": n_views, "latency_ms": 1000 * seconds, **memory}


def synthetic_stream(n_images: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """``n_images`` random 500x375 RGB images (uint8 [3, 375, 500]), each different, on ``device``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=generator).to(device)
            for _ in range(n_images)]


def run_images_per_second(
    model: str = "ViT-B-16",
    pretrained: str | None = None,
    methods: Sequence[str] | None = None,
    n_views: int = 64,
    n_classes: int = 1000,
    batch_images: Sequence[int] = (1, 8, 32),
    n_images: int | None = None,
    device: str = "auto",
    repeats: int = 1,
    warmup: int = 1,
    backbone: FrozenCLIP | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Images/s of a synthetic stream of ``n_images`` (default ``2 * max(batch_images)``) fed ``B`` images per
    ``Adapter.step_many`` call, for each method and each ``B``; next to the images/s of only making and encoding
    the same views ``B`` images per batch (``encode N views``).  ``x_encode`` = method images/s / encode-only
    images/s at the same ``B`` (1.0: adaptation costs nothing on top of the encoder).

    Each figure is the median over ``repeats`` passes over the stream, after ``warmup`` untimed steps; the
    entries are timed in turn within each pass (interleaved), so a changing machine load affects them alike.
    """
    sizes = sorted({int(b) for b in batch_images})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch_images must be whole numbers of images, at least 1; got {list(batch_images)}.")
    n_images = 2 * sizes[-1] if n_images is None else int(n_images)
    if n_images < 1 or repeats < 1 or warmup < 0:
        raise ValueError("n_images and repeats must be at least 1, warmup at least 0.")
    backbone = backbone or load_backbone(model, pretrained, device)
    classes = benchmark_classnames(n_classes)
    stream = synthetic_stream(n_images, backbone.device)
    config = create_method("zeroshot", n_views=n_views).view_config(backbone)

    def encode(images: list[torch.Tensor], first: int) -> None:
        views = torch.stack([make_views(image, config, view_seed(0, first + k)) for k, image in enumerate(images)])
        backbone.encode_images(views.flatten(0, 1))

    entries: dict[str, Callable[[list[torch.Tensor], int], Any]] = {f"encode {n_views} views": encode}
    for name in methods or method_names():
        adapter = _bench_adapter(name, classes, backbone, n_views, method_options)
        entries[name] = lambda images, first, adapter=adapter: adapter.step_many(images)
    times: dict[tuple[str, int], list[float]] = {(e, b): [] for e in entries for b in sizes}
    for b in sizes:
        for fn in entries.values():
            for k in range(warmup):
                fn(stream[:b], n_images + k * b)
    for _ in range(repeats):
        for b in sizes:
            for entry, fn in entries.items():
                times[entry, b].append(median_seconds(lambda: [fn(stream[i:i + b], i) for i in range(0, n_images, b)],
                                                      backbone.device, 1))
    rows = []
    for b in sizes:
        base = n_images / statistics.median(times[next(iter(entries)), b])
        for entry in entries:
            rate = n_images / statistics.median(times[entry, b])
            rows.append({"entry": entry, "batch_images": b, "images_per_s": rate, "x_encode": rate / base})
    return {"protocol": {**backbone.describe(), "n_classes": n_classes, "n_views": n_views, "n_images": n_images,
                         "repeats": repeats, "warmup": warmup, "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "image": "random 500x375 RGB, one per stream position",
                         "mode": "images per second (Adapter.step_many)"},
            "rows": rows}


def format_images_table(result: dict[str, Any]) -> str:
    """Markdown table of a ``run_images_per_second`` result, with its protocol line."""
    p = result["protocol"]
    lines = [f"{p['model']} ({p['pretrained'] or 'random weights'}), {p['device']} {p['precision']}, "
             f"{p['n_classes']} classes, {p['n_views']} views, {p['n_images']} images, median of {p['repeats']}, "
             f"torch {p['torch']}, {p['threads']} threads",
             "", "| method | B | device | images/s | x encode-only |", "|---|---:|---|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['entry']} | {row['batch_images']} | {p['device']} | {row['images_per_s']:.3g} "
                     f"| {row['x_encode']:.2f} |")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    """Markdown table of a ``run_speed_benchmark`` result, with its protocol line."""
    p = result["protocol"]
    lines = [f"{p['model']} ({p['pretrained'] or 'random weights'}), {p['device']} {p['precision']}, "
             f"{p['n_classes']} classes, {p['n_views']} views, median of {p['repeats']}, torch {p['torch']}, "
             f"{p['threads']} threads",
             "", "| entry | views | latency (ms) | encode just before (ms) | step mem (MB) | total mem (MB) "
             "| x encode |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        encode = f"{row['encode_ms']:.1f}" if "encode_ms" in row else "-"
        lines.append(f"| {row['entry']} | {row['n_views']} | {row['latency_ms']:.1f} | {encode} "
                     f"| {row['peak_mem_mb']:.0f} | {row['total_mem_mb']:.0f} | {row['ratio_to_encode']:.2f} |")
    return "\n".join(lines)


def save_result(result: dict[str, Any], path: str | Path) -> None:
    """Write ``result`` as JSON at ``path`` atomically (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(result, indent=2))
    os.replace(temporary, path)
