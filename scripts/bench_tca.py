#!/usr/bin/env python
"""TCA cost per image on a ViT (random weights: cost does not depend on them) next to the plain encoder.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one 224 px image (batch 1,
TCA's protocol) and reported as GFLOPs in the paper's fvcore convention (1 multiply-add = 1 FLOP,
i.e. FlopCounterMode's count / 2).  The counted forward runs every block's attention through
``vlmtta.vit`` with SDPA's math backend, because open_clip's fused MultiheadAttention kernel is
invisible to the counter (it would drop a third of the encoder); it equals ``encode_image``.  TCA runs with a full set of domain anchors (every class
ready), so the anchor key/value is counted.  Wall clock: median over ``--repeats`` single-image
steps after ``--warmup``; "encode" is the condensed forward alone, "step" the whole
``predict_views`` (encode + reservoir update + logits correction).

Example:
    python scripts/bench_tca.py --model ViT-B-16 --device cpu --ratios 0.9 0.7 --output results/bench_tca.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vlmtta.backbone import FrozenCLIP
from vlmtta.methods.base import Context
from vlmtta.methods.tca import TCA
from vlmtta.speed import median_seconds, random_context
from vlmtta.vit import forward_vit


def gflops(run) -> float:
    """Multiply-add GFLOPs (fvcore convention) of ``run()``, attention decomposed into matmuls."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 2e9


def counted_forward(backbone: FrozenCLIP, image: torch.Tensor, method: TCA | None = None):
    """The forward with every block's attention run by ``vlmtta.vit`` (open_clip's fused MHA kernel
    is invisible to FlopCounterMode); condensation and anchors only at the method's layers."""
    n_blocks = backbone.model.visual.transformer.layers
    at = set(method.layers) if method else set()
    anchor = (lambda layer, cls: method._anchor(layer, cls) if layer in at else None) if method else None
    reduce = lambda layer, x, attn: method._reduce(layer, x, attn) if layer in at else x
    with torch.inference_mode(), backbone.autocast():
        return forward_vit(backbone.model, image, hook_layers=range(n_blocks), anchor_fn=anchor,
                           reduce_fn=reduce if method else None)


def tca_method(backbone: FrozenCLIP, context: Context, keep_ratio: float, code_drop_rate: float | None) -> TCA:
    method = TCA(keep_ratio=keep_ratio, code_drop_rate=code_drop_rate)
    method.bind(context)
    blocks = backbone.model.visual.transformer
    generator = torch.Generator().manual_seed(0)
    method._anchors = torch.randn(len(context.classnames), blocks.layers, blocks.width, generator=generator).to(backbone.device)
    return method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.7])
    parser.add_argument("--code-drop-rates", type=float, nargs="*", default=[0.035, 0.1],
                        help="also run the official code's token counting at these drop rates")
    parser.add_argument("--n-classes", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    backbone = FrozenCLIP(args.model, None, args.device)
    device = backbone.device
    context = random_context(backbone, args.n_classes)
    image = torch.randn(1, 3, backbone.image_size, backbone.image_size, device=device)

    plain = lambda: backbone.encode_images(image)
    counted = counted_forward(backbone, image).features
    with torch.inference_mode(), backbone.autocast():  # the same precision as the counted forward
        reference = backbone.model.encode_image(image)
    tolerance = 1e-3 if backbone.precision == "fp32" else 2e-2 * float(reference.abs().max())
    assert torch.allclose(counted.float(), reference.float(), atol=tolerance), "counted forward != encode_image"
    base_flops, base_time = gflops(lambda: counted_forward(backbone, image)), median_seconds(plain, device, args.repeats, args.warmup)
    rows = [{"setting": "plain encode_image", "gflops": base_flops, "encode_ms": base_time * 1e3}]
    settings = [(f"TCA R={r}", r, None) for r in args.ratios]
    settings += [(f"TCA code drop={d}", 1.0, d) for d in args.code_drop_rates]
    for label, ratio, drop in settings:
        method = tca_method(backbone, context, ratio, drop)
        encode = lambda m=method: m.encode(image)
        step = lambda m=method, a=method._anchors: (m.predict_views(image), setattr(m, "_anchors", a))
        rows.append({"setting": label, "gflops": gflops(lambda m=method: counted_forward(backbone, image, m)),
                     "tokens_per_block": encode().n_tokens,
                     "encode_ms": median_seconds(encode, device, args.repeats, args.warmup) * 1e3,
                     "step_ms": median_seconds(step, device, args.repeats, args.warmup) * 1e3})

    print(f"{args.model}, random weights, {device} ({backbone.precision}), batch 1, {args.n_classes} classes, "
          f"median of {args.repeats}")
    print(f"{'setting':<22}{'GFLOPs':>9}{'vs plain':>10}{'encode ms':>11}{'ratio':>7}{'step ms':>9}{'ratio':>7}")
    for row in rows:
        step = row.get("step_ms")
        print(f"{row['setting']:<22}{row['gflops']:>9.2f}{row['gflops'] / base_flops - 1:>+10.1%}"
              f"{row['encode_ms']:>11.1f}{row['encode_ms'] / rows[0]['encode_ms']:>7.2f}"
              + (f"{step:>9.1f}{step / rows[0]['encode_ms']:>7.2f}" if step else ""))
    for row in rows[1:]:
        print(f"  {row['setting']}: tokens after each block {row['tokens_per_block']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"model": args.model, "device": str(device), "precision": backbone.precision,
                                           "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
