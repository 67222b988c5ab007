#!/usr/bin/env python
"""Cost per sample of the batch methods (SubTTA, Tent, SAR, DeYO, BATCLIP, CLIPArTT, WATT) next to the plain encoder.

Batch protocol (the papers'): ``predict_batch`` on ``--batch`` images, timed per batch and divided by the
batch size, next to ``encode_images`` of the same batch.  Streaming mode (``--n-views`` > 0):
``predict_views`` on one image's views.  Each method is reset before it is timed (its default reset
policy then applies).  Random weights by default: cost does not depend on them.  Median over
``--repeats`` after ``--warmup``; peak GPU memory when on CUDA.

Example:
    python scripts/bench_batch.py --model ViT-B-16 --device cuda --batch 64 --n-classes 1000 --output results/bench_batch.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlmtta.backbone import FrozenCLIP
from vlmtta.methods import create_method
from vlmtta.speed import median_seconds, random_context

BATCH_METHODS = ("subtta", "tent", "sar", "deyo", "batclip", "clipartt", "watt")


def timed(run, device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median wall-clock seconds of ``run()`` and peak GPU memory (GiB; 0 on CPU)."""
    for _ in range(warmup):
        run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(run, device, repeats)
    return seconds, (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default=None, help="weights (default: random)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--methods", default=",".join(BATCH_METHODS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-views", type=int, default=0, help="also time streaming mode on this many views")
    parser.add_argument("--n-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = FrozenCLIP(args.model, args.pretrained, args.device)
    device = backbone.device
    context = random_context(backbone, args.n_classes)
    size = backbone.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    views = torch.randn(max(1, args.n_views), 3, size, size, device=device)

    plain_s, plain_mem = timed(lambda: backbone.encode_images(images), device, args.warmup, args.repeats)
    rows = [{"setting": f"plain encode_images (batch {args.batch})", "ms_per_sample": plain_s / args.batch * 1e3,
             "peak_gib": plain_mem}]
    for name in args.methods.split(","):
        method = create_method(name)
        method.bind(context)
        seconds, mem = timed(lambda m=method: m.predict_batch(images), device, args.warmup, args.repeats)
        rows.append({"setting": f"{name} batch {args.batch}", "ms_per_sample": seconds / args.batch * 1e3,
                     "peak_gib": mem})
        if args.n_views:
            method.reset()
            seconds, mem = timed(lambda m=method: m.predict_views(views), device, args.warmup, args.repeats)
            rows.append({"setting": f"{name} stream {args.n_views} views", "ms_per_sample": seconds * 1e3,
                         "peak_gib": mem})

    print(f"{args.model}, {args.pretrained or 'random'} weights, {device} ({backbone.precision}), "
          f"{args.n_classes} classes, median of {args.repeats}")
    print(f"{'setting':<36}{'ms/sample':>11}{'x plain':>9}{'peak GiB':>10}")
    for row in rows:
        print(f"{row['setting']:<36}{row['ms_per_sample']:>11.2f}{row['ms_per_sample'] / rows[0]['ms_per_sample']:>9.2f}"
              f"{row['peak_gib']:>10.2f}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"model": args.model, "device": str(device), "precision": backbone.precision,
                                           "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
