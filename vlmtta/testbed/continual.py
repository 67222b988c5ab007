"""The continual-corruption stream: the 11 corruptions one after another, for batch methods, under each reset policy.

TTABC's finding is that online updates never reset can collapse on long shifting streams.  This
runner feeds one ``vlmtta.Adapter`` per (method, reset policy) the corruptions of the testbed in
sequence (each a seeded subset of the Fashion-MNIST test split at ``severity``), ``batch_size``
original views per step, and reports the accuracy per corruption:

* ``continual``: never reset (the parameters carry across every domain shift);
* ``domain``: reset at the start of each corruption (the runner knows where domains change);
* ``batch``: reset before every batch (episodic per batch).

Methods without a batch protocol (``zeroshot``) run per image as usual, reset at the start only.
Labels are read by the metric only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..api import Adapter
from ..backbone import FrozenCLIP, load_backbone
from ..methods.batch import RESET_POLICIES
from . import corruptions as C
from .fashion_mnist import CLASSNAMES
from .suite import MODEL, batch_predictions, corrupted_stream, subset

__all__ = ["ContinualResult", "format_continual", "run_continual"]


@dataclass
class ContinualResult:
    """Accuracy (%) per row (``method`` or ``method/policy``) and corruption, in stream order."""

    accuracy: dict[str, dict[str, float]]
    protocol: dict[str, Any] = field(default_factory=dict)

    def mean(self, row: str) -> float:
        values = self.accuracy[row].values()
        return sum(values) / len(values)


def _feed(adapter: Adapter, domains: list[tuple[str, torch.Tensor, torch.Tensor]], policy: str | None,
          batch_size: int) -> dict[str, float]:
    adapter.reset()
    accuracy = {}
    for position, (name, images, labels) in enumerate(domains):
        if policy is None:  # per-image method
            predictions = [adapter.step(image).index for image in images]
        else:
            if policy == "domain" and position:
                adapter.reset()
            predictions = batch_predictions(adapter, images, batch_size)
        accuracy[name] = 100.0 * float((torch.tensor(predictions) == labels).float().mean())
    return accuracy


def run_continual(methods: Sequence[str], severity: int = 5, n_per_corruption: int | None = 200, seed: int = 0,
                  policies: Sequence[str] = RESET_POLICIES, batch_size: int = 64,
                  options: dict[str, dict[str, Any]] | None = None, backbone: FrozenCLIP | None = None,
                  device: str = "auto", progress: Callable[[str], None] | None = None) -> ContinualResult:
    """Every method under every reset policy on the corruptions in sequence (see the module docstring)."""
    unknown = sorted(set(policies) - set(RESET_POLICIES))
    if unknown:
        raise ValueError(f"Unknown reset policies {unknown}; accepted: {', '.join(RESET_POLICIES)}.")
    backbone = backbone or load_backbone(MODEL, device=device)
    images, labels = subset(n_per_corruption, seed)
    domains = [(name, *corrupted_stream(images, labels, name, severity, seed)) for name in C.corruption_names()]
    table, described = {}, {}
    for method in methods:
        probe = Adapter(CLASSNAMES, method, backbone=backbone, seed=seed, **(options or {}).get(method, {}))
        runs = [(p, {"reset": p}) for p in policies] if hasattr(probe.method, "predict_batch") else [(None, {})]
        for policy, extra in runs:
            row = method if policy is None else f"{method}/{policy}"
            adapter = Adapter(CLASSNAMES, method, backbone=backbone, seed=seed,
                              **{**(options or {}).get(method, {}), **extra})
            table[row] = _feed(adapter, domains, policy, batch_size)
            described[row] = adapter.protocol()
            if progress:
                progress(f"{row:>22} mean {sum(table[row].values()) / len(table[row]):6.2f} %")
    protocol = {"backbone": backbone.describe(), "dataset": "fashion-mnist test", "severity": severity,
                "images_per_corruption": len(labels), "seed": seed, "batch_size": batch_size,
                "stream": "the corruptions in this order, each an i.i.d. shuffled subset: " + ", ".join(C.corruption_names()),
                "methods": described}
    return ContinualResult(table, protocol)


def format_continual(result: ContinualResult, fmt: str = "markdown") -> str:
    """The row x corruption table (in stream order) with a mean column, as Markdown or CSV."""
    corruptions = list(next(iter(result.accuracy.values())))
    header = ["method/reset", *corruptions, "mean"]
    rows = [[row, *(f"{values[c]:.1f}" for c in corruptions), f"{result.mean(row):.1f}"]
            for row, values in result.accuracy.items()]
    if fmt == "csv":
        return "\n".join(",".join(cells) for cells in [header, *rows])
    if fmt != "markdown":
        raise ValueError(f"Unknown table format {fmt!r}; accepted: markdown, csv.")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m vlmtta.testbed.continual --methods tent,sar [--severity 5] [-n 200] [--policies ...]``."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m vlmtta.testbed.continual", description=main.__doc__)
    parser.add_argument("--methods", required=True, help="comma-separated registered methods")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("-n", "--n-per-corruption", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--policies", default=",".join(RESET_POLICIES), help="comma-separated reset policies")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv"])
    parser.add_argument("--output", default=None, help="also write the result (table and protocol) as JSON here")
    args = parser.parse_args(argv)
    result = run_continual(args.methods.split(","), args.severity, args.n_per_corruption, args.seed,
                           args.policies.split(","), args.batch_size, progress=lambda line: print(line, flush=True))
    print(format_continual(result, args.format))
    if args.output:
        from ..cache import atomic_write

        text = json.dumps({"accuracy": result.accuracy, "protocol": result.protocol}, indent=2)
        atomic_write(args.output, lambda handle: handle.write(text.encode("utf-8")))


if __name__ == "__main__":
    main()
