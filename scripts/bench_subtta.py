#!/usr/bin/env python
"""SubTTA cost per sample on a ViT (random weights: cost does not depend on them) next to the plain encoder.

Batch protocol (the paper's): ``predict_batch`` on ``--batch`` images (two forward+backward passes,
one more forward, SVDs of D x D covariances), timed per batch and divided by the batch size, next to
``encode_images`` of the same batch.  Streaming mode: ``predict_views`` on one image's
``--n-views`` views.  Median over ``--repeats`` after ``--warmup``; peak GPU memory when on CUDA.

Example:
    python scripts/bench_subtta.py --model ViT-B-16 --device cuda --batch 64 --n-classes 1000 --output results/bench_subtta.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vlmtta.backbone import FrozenCLIP
from vlmtta.methods.subtta import SubTTA
from vlmtta.speed import median_seconds, random_context


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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n-views", type=int, default=64)
    parser.add_argument("--n-classes", type=int, default=1000)
    parser.add_argument("--losses", nargs="+", default=["mint", "source"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = FrozenCLIP(args.model, None, args.device)
    device = backbone.device
    context = random_context(backbone, args.n_classes)
    size = backbone.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    views = torch.randn(args.n_views, 3, size, size, device=device)

    plain_s, plain_mem = timed(lambda: backbone.encode_images(images), device, args.warmup, args.repeats)
    rows = [{"setting": f"plain encode_images (batch {args.batch})", "ms_per_sample": plain_s / args.batch * 1e3,
             "peak_gib": plain_mem}]
    for loss in args.losses:
        method = SubTTA(n_views=args.n_views, loss=loss)
        method.bind(context)
        seconds, mem = timed(lambda m=method: m.predict_batch(images), device, args.warmup, args.repeats)
        rows.append({"setting": f"SubTTA {loss} batch {args.batch}", "ms_per_sample": seconds / args.batch * 1e3,
                     "peak_gib": mem})
        method.reset()
        seconds, mem = timed(lambda m=method: m.predict_views(views), device, args.warmup, args.repeats)
        rows.append({"setting": f"SubTTA {loss} stream {args.n_views} views", "ms_per_sample": seconds * 1e3,
                     "peak_gib": mem})

    print(f"{args.model}, random weights, {device} ({backbone.precision}), {args.n_classes} classes, "
          f"median of {args.repeats}")
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
