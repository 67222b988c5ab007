#!/usr/bin/env python
"""Images/s of episodic prompt tuning on many images at once (``predict_views_many``), next to encoding alone.

For each batch size B (``--batch-images``) the script times, interleaved in every repeat: encoding the B x N
views alone (``encode_images`` on the same views, the floor) and each method's ``predict_views_many`` on them
(B = 1 is the one-image path, ``predict_views``).  Views are random preprocessed tensors, the same for every
entry (making views is not timed: it is the same for all).  Random weights by default (speed does not depend on
them); class names are ImageNet's first ``--classes`` (their prompt lengths decide the truncated text context).
Prints a table (method, B, images/s, x encode-only = method time / encode time) and saves it as JSON.  Warm-up
runs every method on tiny inputs (2 images of 2 views) so the timed runs exclude one-time costs.

    python scripts/bench_many.py --model ViT-B-16 --pretrained none --classes 200 --views 64 \\
        --batch-images 1,4,8 --methods tpt,ctpt,tps --output results/bench_many_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from vlmtta import load_backbone
from vlmtta.methods import Context, create_method
from vlmtta.speed import _sync, benchmark_classnames


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bound(name: str, context: Context, n_views: int, options: dict[str, Any]):
    method = create_method(name, n_views=n_views, **options)
    method.bind(context)
    return method


def run(name: str, method, views: torch.Tensor) -> torch.Tensor:
    """The method on B images: one image at a time for B = 1 (the one-image path), else the many-image path."""
    if len(views) == 1:
        method.reset()
        return method.predict_views(views[0])
    return method.predict_views_many(views)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none", help="weights ('none': random)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="tpt,ctpt,tps")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--batch-images", default="1,4,8", help="comma-separated batch sizes B")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of every entry on 2 images of 2 views")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("-o", "--option", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model, None if args.pretrained == "none" else args.pretrained, args.device)
    device = backbone.device
    classes = benchmark_classnames(args.classes)
    templates = ["a photo of a {}."]
    context = Context(classes, templates, backbone.class_embeddings(classes, templates), backbone.logit_scale, backbone)
    options: dict[str, dict[str, Any]] = {}
    for item in args.option:
        method, _, setting = item.partition(":")
        key, _, value = setting.partition("=")
        options.setdefault(method, {})[key] = value
    names = args.methods.split(",")
    methods = {name: bound(name, context, args.views, options.get(name, {})) for name in names}
    size = backbone.image_size
    rows = []
    small = torch.randn(2, 2, 3, size, size, generator=torch.Generator().manual_seed(99)).to(device)
    for _ in range(args.warmup):  # one-time costs (TPT's cached initial text graph, allocator) on tiny inputs
        for name in names:
            run(name, methods[name], small[:1]), run(name, methods[name], small)
    for b in (int(x) for x in args.batch_images.split(",")):
        views = torch.randn(b, args.views, 3, size, size, generator=torch.Generator().manual_seed(b)).to(device)
        entries: dict[str, Callable[[], Any]] = {"encode": lambda v=views: backbone.encode_images(v.flatten(0, 1))}
        entries |= {name: (lambda n=name, v=views: run(n, methods[n], v)) for name in names}
        times: dict[str, list[float]] = {key: [] for key in entries}
        for _ in range(args.repeats):  # interleaved: load changes hit every entry alike
            for key, fn in entries.items():
                times[key].append(seconds(fn, device))
        encode = statistics.median(times["encode"])
        for key in entries:
            median = statistics.median(times[key])
            rows.append({"method": key, "batch_images": b, "images_per_s": b / median, "seconds": median,
                         "x_encode": median / encode, "times": times[key]})
            print(f"{key:<8} B={b:<3} {b / median:8.3f} images/s  {median:8.2f} s  x encode-only {median / encode:5.2f}",
                  flush=True)
    protocol = {"model": args.model, "pretrained": args.pretrained, "device": str(device),
                "precision": backbone.precision, "classes": args.classes, "views": args.views,
                "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "machine": platform.machine(), "loadavg": os.getloadavg(),
                "options": options}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
