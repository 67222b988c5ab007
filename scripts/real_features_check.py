"""Accuracy of zero-shot and the online cache methods on real CLIP features, streamed in a fixed order.

Input: ``imagenet_stream.pt`` (real CLIP ViT-B/32 features of 6997 ImageNet images, one original view each, text
features of "a photo of a {}.", see shared/data/README.md).  Every method runs through
``Adapter.from_features(classnames, text_features, method, logit_scale=100.0)`` and ``adapt_features`` one image
at a time, in the file's order; labels are read only to score.  Single view: BoostAdapter has no boosting views
here (``int(1 * 0.1) = 0``), so it runs as TDA with its own ImageNet options; DMN runs in zero-shot mode.

    python scripts/real_features_check.py [--data PATH] [--limit N] [--only tda dmn] [--threads 1] [--output r.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

# importing the method modules registers tda, dmn and boostadapter
import vlmtta.methods.boostadapter
import vlmtta.methods.dmn
import vlmtta.methods.tda  # noqa: F401
from vlmtta.api import Adapter

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clip-vit-b32-imagenet" / "imagenet_stream.pt"
RUNS = {  # label: (method, options); single view everywhere
    "zeroshot": ("zeroshot", {}),
    "tda": ("tda", {"n_views": 1}),
    "dmn (zero-shot, 1 view)": ("dmn", {"n_views": 1}),
    "boostadapter (1 view = no boosting)": ("boostadapter", {"n_views": 1}),
}


def unique_names(names: list[str]) -> list[str]:
    """The file's WordNet names repeat (crane, maillot, cardigan): suffix repeats with their class index."""
    seen: set[str] = set()
    out = []
    for index, name in enumerate(names):
        key = " ".join(name.lower().split())
        out.append(f"{name} ({index})" if key in seen else name)
        seen.add(key)
    return out


def run(method: str, options: dict, data: dict, limit: int | None) -> dict:
    """Stream the features through one adapter; accuracy (%) and ms per image."""
    adapter = Adapter.from_features(unique_names(data["classnames"]), data["text_features"].float(), method, logit_scale=100.0,
                                    **options)
    features, labels = data["image_features"].float()[:limit], data["labels"][:limit]
    correct, start = 0, time.perf_counter()
    for feature, label in zip(features, labels):
        correct += int(adapter.adapt_features(feature[None]).argmax()) == int(label)
    seconds = time.perf_counter() - start
    return {"method": method, "options": options, "n": len(labels), "accuracy": 100.0 * correct / len(labels),
            "ms_per_image": 1000.0 * seconds / len(labels), "protocol": adapter.protocol()["hyperparameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--only", nargs="*", default=None, help="run labels to keep (default: all)")
    parser.add_argument("--output", type=Path, default=None, help="save the rows as JSON")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.exists():
        raise SystemExit(f"{args.data} not found (see shared/data/README.md).")
    data = torch.load(args.data, weights_only=False)
    print(f"{args.data.name}: {len(data['labels'])} images, {len(data['classnames'])} classes, CLIP ViT-B/32, "
          f"1 view, text 'a photo of a {{}}.', logit scale 100, stream order of the file, torch {torch.__version__}")
    rows = []
    print("| run | images | top-1 (%) | vs zero-shot | ms / image |\n|---|---:|---:|---:|---:|")
    for label, (method, options) in RUNS.items():
        if args.only and label.split()[0] not in args.only:
            continue
        row = {"run": label, **run(method, options, data, args.limit)}
        rows.append(row)
        gain = row["accuracy"] - rows[0]["accuracy"] if rows[0]["method"] == "zeroshot" else float("nan")
        print(f"| {label} | {row['n']} | {row['accuracy']:.2f} | {gain:+.2f} | {row['ms_per_image']:.2f} |", flush=True)
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
