#!/usr/bin/env python
"""Train the testbed CLIP: a small open_clip ViT + text transformer on Fashion-MNIST, contrastively.

Captions are the class names in several templates (``vlmtta.testbed.fashion_mnist.TEMPLATES``);
each step encodes the 10 captions of one random template and applies CLIP's symmetric contrastive
loss between the batch images and those captions (an image's positive is its class caption; a
caption's positives are all images of its class).  Half of each batch is random-resized-cropped
(scale 0.08-1, like ``vlmtta.views``' ``rrc_flip``) and every image is flipped with probability
1/2, so augmented test views are in distribution.  The token embedding keeps its seeded random
initialisation (frozen: only ~30 of its 49,408 rows are ever used), which keeps the steps cheap.

Validation accuracy is measured on a held-out part of the train split; the test split is only
evaluated once, at the end, for the report.  Writes ``open_clip_config.json`` and an fp16
``open_clip_pytorch_model.bin`` into ``--out``.

    python scripts/train_testbed.py --data /usr/share/datasets/fashion-mnist
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from vlmtta.testbed import fashion_mnist as fm

MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": fm.IMAGE_SIZE, "patch_size": 4, "width": 96, "layers": 4, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {"size": fm.IMAGE_SIZE, "mean": list(fm.MEAN), "std": list(fm.STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "vlmtta" / "testbed" / "model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="folder with the four Fashion-MNIST IDX .gz files")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the packaged model)")
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--rrc-fraction", type=float, default=0.5, help="share of each batch that is cropped")
    parser.add_argument("--val", type=int, default=5000, help="train images held out for validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="{}", help="JSON overrides of vision_cfg, e.g. '{\"layers\": 6}'")
    return parser.parse_args(argv)


def sample_boxes(n: int, size: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop boxes (x0, y0, x1, y1) on a square ``size`` image, float [n, 4] (10 tries, then full)."""
    area = torch.empty(n, 10, dtype=torch.float64).uniform_(*scale, generator=gen) * size * size
    aspect = torch.empty(n, 10, dtype=torch.float64).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                              generator=gen).exp()
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    ok = (w <= size) & (h <= size) & (w > 0) & (h > 0)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
    w = torch.where(ok.any(1), w.gather(1, first).squeeze(1), float(size))
    h = torch.where(ok.any(1), h.gather(1, first).squeeze(1), float(size))
    u = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    top, left = (u[:, 0] * (size - h + 1)).floor(), (u[:, 1] * (size - w + 1)).floor()
    return torch.stack([left, top, left + w, top + h], dim=1).float()


def augment(images: torch.Tensor, resized: torch.Tensor, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Batch of uint8 [B,28,28] (and their 32x32 resizes): crop a share, flip half; normalised [B,3,32,32]."""
    n = images.shape[0]
    crop = torch.rand(n, generator=gen) < fraction
    boxes = sample_boxes(n, images.shape[-1], gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = resized.float()
    if crop.any():
        rows = crop.nonzero().squeeze(1)
        rois = torch.cat([torch.arange(len(rows), dtype=torch.float32)[:, None], boxes[rows]], dim=1)
        crops = roi_align(images[rows, None].float(), rois, output_size=fm.IMAGE_SIZE, sampling_ratio=-1, aligned=True)
        out[rows] = crops.round_().clamp_(0, 255)
    out = torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out).div_(255.0)
    return ((out - fm.MEAN[0]) / fm.STD[0]).expand(n, 3, *out.shape[-2:])


def clip_loss(image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss between images [B,D] and class captions [C,D] (multi-positive on the text side)."""
    logits = scale * image @ text.t()
    to_text = F.cross_entropy(logits, labels)
    positives = F.one_hot(labels, text.shape[0]).t().float()  # [C, B]
    present = positives.sum(1) > 0
    target = positives[present] / positives[present].sum(1, keepdim=True)
    to_image = -(target * logits.t()[present].log_softmax(dim=1)).sum(1).mean()
    return (to_text + to_image) / 2


@torch.no_grad()
def accuracy(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, text: torch.Tensor,
             device: torch.device) -> float:
    """Zero-shot top-1 of preprocessed images against class text features."""
    model.eval()
    hits = 0
    for start in range(0, len(labels), 1000):
        feats = F.normalize(model.encode_image(pixels[start:start + 1000].to(device)), dim=-1)
        hits += int(((feats @ text.t()).argmax(1).cpu() == labels[start:start + 1000]).sum())
    model.train()
    return hits / len(labels)


@torch.no_grad()
def class_text(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Zero-shot classifier for the single template "a photo of a {}." (the default of vlmtta)."""
    model.eval()
    text = F.normalize(model.encode_text(tokens[0]), dim=-1)
    model.train()
    return text


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    cfg = json.loads(json.dumps(MODEL_CFG))
    cfg["vision_cfg"].update(json.loads(args.arch))
    torch.manual_seed(args.seed)
    model = open_clip.CLIP(**cfg)
    model.token_embedding.requires_grad_(False)
    return model, cfg


def optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))


def lr_at(step: int, total: int, base: float, warmup: int = 200) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def save(model: torch.nn.Module, cfg: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": PREPROCESS_CFG},
                                                          indent=2) + "\n")
    state = {k: v.detach().cpu().half() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    torch.save(state, out / "open_clip_pytorch_model.bin")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start = time.perf_counter()
    images, labels = fm.load_split("train", args.data)
    test_images, test_labels = fm.load_split("test", args.data)
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(labels), generator=gen)
    train_idx, val_idx = order[args.val:], order[:args.val]
    resized = fm.preprocess(fm.to_rgb(images))[:, :1].mul_(fm.STD[0]).add_(fm.MEAN[0]).mul_(255).round_()
    val_pixels = fm.preprocess(fm.to_rgb(images[val_idx]))
    test_pixels = fm.preprocess(fm.to_rgb(test_images))

    model, cfg = build_model(args)
    model.to(device).train()
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=cfg["text_cfg"]["context_length"])
    tokens = torch.stack([tokenizer([t.format(c) for c in fm.CLASSNAMES]) for t in fm.TEMPLATES]).to(device)
    opt = optimizer(model, args)
    steps_per_epoch = len(train_idx) // args.batch_size
    total = int(args.epochs * steps_per_epoch)
    print(f"model {sum(p.numel() for p in model.parameters()):,} params; {total} steps of {args.batch_size}; "
          f"data ready in {time.perf_counter() - start:.0f}s", flush=True)
    for step in range(total):
        if step % steps_per_epoch == 0:
            perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        rows = perm[(step % steps_per_epoch) * args.batch_size:][:args.batch_size]
        pixels = augment(images[rows], resized[rows], args.rrc_fraction, gen).to(device)
        template = int(torch.randint(len(fm.TEMPLATES), (1,), generator=gen))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, args.lr)
        image_features, text_features, scale = model(pixels, tokens[template])
        loss = clip_loss(image_features, text_features, labels[rows].to(device), scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % 100 == 0 or step + 1 == total:
            val = accuracy(model, val_pixels, labels[val_idx], class_text(model, tokens), device)
            print(f"step {step + 1}/{total} loss {loss.item():.3f} scale {scale.item():.1f} val {val:.2%} "
                  f"[{time.perf_counter() - start:.0f}s]", flush=True)
    test = accuracy(model, test_pixels, test_labels, class_text(model, tokens), device)
    save(model, cfg, Path(args.out))
    print(f"done in {time.perf_counter() - start:.0f}s wall, {time.process_time():.0f}s CPU: clean zero-shot test accuracy {test:.2%} "
          f"(fp32 weights; saved fp16 to {args.out})", flush=True)


if __name__ == "__main__":
    main()
