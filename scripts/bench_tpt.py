"""TPT / C-TPT / DiffTPT speed: vlmtta's implementation vs the straightforward reference, at equal outputs.

The reference (``reference_impl=True``) runs the published algorithm as written: text encoded on
the full 77-token context at every step, and the original image encoded again for the final
prediction.  Per-sample latency is the median over ``--repeats`` images after ``--warmup``,
through ``Adapter.step`` (making the views included); peak memory as in ``vlmtta.speed``.
Equality: both run on the same images and views; the script prints the largest probability
difference and the top-1 agreement.  DiffTPT is timed excluding generation (variations already
cached) and, with ``--generation``, including it (Stable Diffusion Image Variations at its real
size, random weights: speed does not depend on the weights).

    python scripts/bench_tpt.py --device cpu --classes 37 --repeats 2 --warmup 1
    python scripts/bench_tpt.py --device cuda --difftpt --generation --output results/bench_tpt_cuda.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image

from vlmtta import Adapter, load_backbone
from vlmtta.generation import VariationGenerator
from vlmtta.speed import _time, benchmark_classnames

import vlmtta.methods.difftpt  # noqa: F401  (registers difftpt)
import vlmtta.methods.tpt  # noqa: F401  (registers tpt, ctpt)


def test_image(seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


class NoiseVariations:
    """A stand-in pipeline for pre-filling the cache: random 512x512 images (for timings without generation)."""

    def __call__(self, image, num_images_per_prompt, generator, **_: Any) -> SimpleNamespace:
        arrays = [torch.randint(0, 256, (512, 512, 3), dtype=torch.uint8, generator=g).numpy() for g in generator]
        return SimpleNamespace(images=[Image.fromarray(a) for a in arrays])


def sd_image_variations(device: torch.device) -> Any:
    """Stable Diffusion Image Variations (SD v1 UNet, VAE, CLIP ViT-L/14 image encoder) with random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImageVariationPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=512)
        encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
            patch_size=14, projection_dim=768))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True)
    pipe = StableDiffusionImageVariationPipeline(vae, encoder, unet, scheduler, None, CLIPImageProcessor(),
                                                 requires_safety_checker=False)
    return pipe.to(device, dtype)


def compare(a: Adapter, b: Adapter, n: int) -> dict[str, float]:
    """Largest probability difference and top-1 agreement of two adapters on the same ``n`` images."""
    diffs, agree = [], 0
    for i in range(n):
        pa, pb = (torch.tensor(list(x.step(test_image(10_000 + i)).probabilities.values())) for x in (a, b))
        diffs.append(float((pa - pb).abs().max()))
        agree += int(pa.argmax() == pb.argmax())
    return {"max_abs_prob_diff": max(diffs), "top1_agreement": agree / n}


def time_adapter(adapter: Adapter, device: torch.device, repeats: int, warmup: int) -> dict[str, float]:
    seconds, memory = _time(lambda i: adapter.step(test_image(i)), device, repeats, warmup)
    return {"latency_ms": 1000 * seconds, **memory}


def bench_classes(backbone, name: str, n_classes: int, args, extra: dict[str, Any] | None = None) -> list[dict]:
    classes, extra = benchmark_classnames(n_classes), extra or {}
    fast = Adapter(classes, name, backbone=backbone, n_views=args.n_views, **extra)
    ref = Adapter(classes, name, backbone=backbone, n_views=args.n_views, reference_impl=True, **extra)
    rows = []
    for label, adapter in (("vlmtta", fast), ("reference", ref)):
        row = {"method": name, "impl": label, "n_classes": n_classes, **time_adapter(adapter, backbone.device,
                                                                                      args.repeats, args.warmup)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    rows[0]["speedup"] = rows[1]["latency_ms"] / rows[0]["latency_ms"]
    rows[0].update(compare(fast, ref, args.check))
    print(f"{name} {n_classes} classes: {rows[0]['speedup']:.2f}x faster, max |dp| {rows[0]['max_abs_prob_diff']:.2e}, "
          f"top-1 agreement {rows[0]['top1_agreement']:.2f}", flush=True)
    return rows


def bench_difftpt(backbone, args, cache_dir: str) -> list[dict]:
    classes, rows = benchmark_classnames(args.difftpt_classes), []
    cached = VariationGenerator(NoiseVariations(), name="noise")
    adapter = Adapter(classes, "difftpt", backbone=backbone, n_views=args.n_views, pipeline=cached, cache_dir=cache_dir)
    for i in range(args.warmup + args.repeats):  # fill the cache, so the timing excludes generation
        adapter.method.diffusion.ensure(_source(adapter, test_image(i)), adapter.method.n_generated)
    rows.append({"method": "difftpt", "impl": "vlmtta, generation cached", "n_classes": len(classes),
                 **time_adapter(adapter, backbone.device, args.repeats, args.warmup)})
    print(json.dumps(rows[-1]), flush=True)
    if args.generation:
        sd = VariationGenerator(sd_image_variations(backbone.device), name="sd-random", batch_size=args.gen_batch,
                                num_inference_steps=args.gen_steps)
        adapter = Adapter(classes, "difftpt", backbone=backbone, n_views=args.n_views, pipeline=sd,
                          cache_dir=tempfile.mkdtemp(), n_generated=args.n_generated)
        adapter.step(test_image(0))  # warm-up (kernels, allocator)
        start = time.perf_counter()
        for i in range(1, 1 + args.gen_repeats):
            adapter.step(test_image(i))
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        rows.append({"method": "difftpt", "impl": f"vlmtta, including generation ({args.n_generated} images, "
                     f"{args.gen_steps} steps, batch {args.gen_batch})", "n_classes": len(classes),
                     "latency_ms": 1000 * (time.perf_counter() - start) / args.gen_repeats})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _source(adapter: Adapter, image: torch.Tensor) -> torch.Tensor:
    from vlmtta.generation import source_pixels

    b = adapter.backbone
    return source_pixels(image, b.image_size, b.mean, b.std)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--classes", default="1000,200,37", help="comma-separated class counts")
    parser.add_argument("--methods", default="tpt,ctpt")
    parser.add_argument("--n-views", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--check", type=int, default=3, help="images for the equal-output check")
    parser.add_argument("--difftpt", action="store_true", help="also time DiffTPT with cached variations")
    parser.add_argument("--difftpt-classes", type=int, default=200)
    parser.add_argument("--generation", action="store_true", help="also time DiffTPT including generation")
    parser.add_argument("--n-generated", type=int, default=63)
    parser.add_argument("--gen-steps", type=int, default=50)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--gen-repeats", type=int, default=1)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    backbone = load_backbone(args.model, None if args.pretrained == "none" else args.pretrained, args.device)
    rows = []
    for name in args.methods.split(","):
        for n in (int(c) for c in args.classes.split(",")):
            rows += bench_classes(backbone, name, n, args)
    if args.difftpt:
        with tempfile.TemporaryDirectory() as cache:
            rows += bench_difftpt(backbone, args, cache)
    result = {"protocol": {**backbone.describe(), "n_views": args.n_views, "repeats": args.repeats,
                           "warmup": args.warmup, "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "gpu": torch.cuda.get_device_name() if backbone.device.type == "cuda" else None,
                           "image": "random 500x375 RGB", "command": " ".join(sys.argv)},
              "rows": rows}
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
    return 0


def format_table(result: dict[str, Any]) -> str:
    p = result["protocol"]
    lines = [f"{p['model']} ({p['pretrained'] or 'random weights'}), {p['device']} {p['precision']} {p['gpu'] or ''}, "
             f"{p['n_views']} views, median of {p['repeats']}, torch {p['torch']}", "",
             "| method | impl | classes | latency (ms) | step mem (MB) | total mem (MB) | speed-up | max abs dp "
             "| top-1 agree |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cell = lambda key, fmt: format(r[key], fmt) if key in r else ""  # noqa: E731
        lines.append(f"| {r['method']} | {r['impl']} | {r['n_classes']} | {r['latency_ms']:.1f} | "
                     f"{cell('peak_mem_mb', '.0f')} | {cell('total_mem_mb', '.0f')} | {cell('speedup', '.2f')} | "
                     f"{cell('max_abs_prob_diff', '.1e')} | "
                     f"{cell('top1_agreement', '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
