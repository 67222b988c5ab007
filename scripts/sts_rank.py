#!/usr/bin/env python
"""k_t that STS's Gavish-Donoho threshold keeps on real CLIP ViT-B/16 text classifiers.

Reads ../shared/data/clip-vit-b16-text/text_classifiers.pt (not shipped with vlmtta) and prints, per
classifier, its shape, the threshold tau = omega(beta) * median(s), k_t and the share of the squared
spectrum that the top-k_t directions hold.

Example:
    python scripts/sts_rank.py [--path PATH] [--output ranks.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from vlmtta.methods.sts import gavish_donoho_omega, gavish_donoho_rank

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "clip-vit-b16-text" / "text_classifiers.pt"


def rank_table(classifiers: dict[str, torch.Tensor]) -> list[dict]:
    rows = []
    for name, text in sorted(classifiers.items(), key=lambda item: (-item[1].shape[0], item[0])):
        singular = torch.linalg.svdvals(text.double())
        k_t = gavish_donoho_rank(singular, tuple(text.shape))
        beta = min(text.shape) / max(text.shape)
        tau = gavish_donoho_omega(beta) * float(np.median(singular.numpy()))
        energy = float(singular[:k_t].square().sum() / singular.square().sum())
        rows.append({"classifier": name, "classes": text.shape[0], "dim": text.shape[1], "beta": round(beta, 4),
                     "tau": round(tau, 4), "k_t": k_t, "energy": round(energy, 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", type=Path, default=DEFAULT)
    parser.add_argument("--output", type=Path, help="also write the table as JSON")
    args = parser.parse_args(argv)
    if not args.path.exists():
        print(f"{args.path} not found (the shared real-data folder is not available here).", file=sys.stderr)
        return 1
    rows = rank_table(torch.load(args.path, weights_only=True)["text_features"])
    print("| classifier | C | D | beta | tau | k_t | energy in top k_t |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['classifier']} | {r['classes']} | {r['dim']} | {r['beta']} | {r['tau']} | {r['k_t']} | {r['energy']:.3f} |")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
