"""The ``vlmtta`` console script."""
from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import sys
from typing import Any, Sequence

from .version import __version__

FORMATS = ("table", "json", "csv")


def _option(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; values are Python literals when they parse as such, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"method options look like key=value, got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def _classes(text: str) -> str | list[str]:
    """``@file.txt`` reads one class per line; anything else is passed on (comma list or ``dataset:<key>``)."""
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    return text


def _add_backbone_args(parser: argparse.ArgumentParser, pretrained_default: str | None = "openai") -> None:
    parser.add_argument("--model", default="ViT-B-16", help="open_clip architecture, local-dir:/folder or hf-hub:org/repo")
    parser.add_argument("--pretrained", default=pretrained_default,
                        help="weights tag, local checkpoint file, or 'none' for random weights (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmtta", description="Test-time adaptation for CLIP-style models.")
    parser.add_argument("--version", action="version", version=f"vlmtta {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    predict = commands.add_parser("predict", help="classify images with a TTA method")
    predict.add_argument("images", nargs="+", metavar="IMG")
    predict.add_argument("--classes", required=True, type=_classes,
                         help="comma-separated names, @file.txt (one per line) or dataset:<key>")
    predict.add_argument("--method", default=None, help="registered method (default: the package default)")
    predict.add_argument("--templates", default=None, help="template set name (e.g. ensemble7, tda:eurosat) or one template with {}")
    _add_backbone_args(predict)
    predict.add_argument("--seed", type=int, default=0)
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--format", choices=FORMATS, default="table")
    predict.add_argument("-o", "--option", dest="options", action="append", type=_option, default=[],
                         metavar="KEY=VALUE", help="method hyperparameter, repeatable (e.g. -o n_views=64)")

    methods = commands.add_parser("methods", help="list the registered methods")
    methods.add_argument("--format", choices=("table", "json"), default="table")

    speed = commands.add_parser("bench-speed", help="per-sample latency and peak memory of each method")
    _add_backbone_args(speed, pretrained_default="none")
    speed.add_argument("--methods", default=None, help="comma-separated (default: all registered)")
    speed.add_argument("--n-views", type=int, default=64)
    speed.add_argument("--n-classes", type=int, default=1000)
    speed.add_argument("--repeats", type=int, default=5)
    speed.add_argument("--warmup", type=int, default=1)
    speed.add_argument("--output", default=None, help="write the JSON result here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"predict": _predict, "methods": _methods, "bench-speed": _bench_speed}[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"vlmtta: error: {error}", file=sys.stderr)
        return 2


def _predict(args: argparse.Namespace) -> int:
    from .api import DEFAULT_METHOD, Adapter
    from .images import ImageLoadError

    adapter = Adapter(args.classes, args.method or DEFAULT_METHOD, model=args.model, pretrained=args.pretrained,
                      templates=args.templates, device=args.device, seed=args.seed, top_k=args.top_k,
                      **dict(args.options))
    results, failed = [], 0
    for path in args.images:
        try:
            results.append((path, adapter.step(path)))
        except ImageLoadError as error:  # report, keep going with the other images
            print(f"vlmtta: skipping {path}: {error}", file=sys.stderr)
            failed += 1
    print(_render(results, args.format), end="")
    return 1 if failed else 0


def _render(results: list, fmt: str) -> str:
    if fmt == "json":
        return json.dumps([{"image": path, **p.to_dict()} for path, p in results], indent=2) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["image", "rank", "label", "probability", "method", "elapsed_s"])
        for path, p in results:
            for rank, (label, prob) in enumerate(p.top, 1):
                writer.writerow([path, rank, label, f"{prob:.6f}", p.method, f"{p.elapsed_s:.4f}"])
        return buffer.getvalue()
    lines = []
    for path, p in results:
        top = ", ".join(f"{label} {prob:.3f}" for label, prob in p.top)
        lines.append(f"{path}\t{p.label}\t[{top}]\t{p.method}\t{p.elapsed_s * 1000:.0f} ms")
    return "\n".join(lines) + ("\n" if lines else "")


def _methods(args: argparse.Namespace) -> int:
    from .methods import list_methods

    methods = list_methods()
    if args.format == "json":
        print(json.dumps(methods, indent=2, default=str))
        return 0
    width = max(len(m["name"]) for m in methods)
    for m in methods:
        print(f"{m['name']:<{width}}  {m['protocol']:<8}  {m['summary']}")
    return 0


def _bench_speed(args: argparse.Namespace) -> int:
    from .speed import format_table, run_speed_benchmark, save_result

    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    result = run_speed_benchmark(args.model, args.pretrained, methods, n_views=args.n_views, n_classes=args.n_classes,
                                 device=args.device, repeats=args.repeats, warmup=args.warmup)
    print(format_table(result))
    if args.output:
        save_result(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
