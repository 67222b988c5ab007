#!/usr/bin/env python
"""Truncated causal text context vs open_clip's full 77-token ``encode_text``: equality and speed.

Encodes one prompt per class ("a photo of a {}." over ImageNet's 1000 class names by default)
with the architecture's text tower (random weights: speed does not depend on them), in fp32,
both ways, and reports the max abs difference and the median time of each.

Example:
    python scripts/bench_text.py --model ViT-B-16 --device cpu --repeats 3 --output results/text_truncation.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch

from vlmtta.backbone import resolve_device
from vlmtta.prompts import dataset_classnames
from vlmtta.speed import median_seconds
from vlmtta.text import TextTower, encode_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--template", default="a photo of a {}.")
    parser.add_argument("--n-classes", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, pretrained=None).eval().to(device)
    texts = [args.template.replace("{}", name) for name in dataset_classnames("imagenet")[: args.n_classes]]
    tokens = open_clip.get_tokenizer(args.model)(texts).to(device)
    batches = tokens.split(args.batch_size)

    def run(truncate: bool) -> torch.Tensor:
        with torch.inference_mode():
            if truncate:
                return torch.cat([encode_tokens(model, b, truncate=True) for b in batches])
            return torch.cat([model.encode_text(b) for b in batches])

    diff = (run(True) - run(False)).abs().max().item()
    full = median_seconds(lambda: run(False), device, args.repeats, warmup=1)
    truncated = median_seconds(lambda: run(True), device, args.repeats, warmup=1)
    tower = TextTower.of(model)
    result = {"model": args.model, "device": str(device), "dtype": "fp32", "n_prompts": len(texts),
              "template": args.template, "batch_size": args.batch_size, "repeats": args.repeats,
              "context_full": tokens.shape[1], "context_truncated_max": max(tower.needed_length(b) for b in batches),
              "max_abs_diff": diff, "full_s": full, "truncated_s": truncated, "speedup": full / truncated,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
