"""The ``vlmtta`` console script."""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from typing import Sequence

from .options import check_option_scopes, scoped_options
from .version import __version__

FORMATS = ("table", "json", "csv")
SEVERITY_HELP = ("corruption severities that imagenet_c / cifar10_c / cifar100_c[:corruption] expand to: 5 (default), "
                 "a comma list such as 3,5, or all")
TABLE_METRICS = ("top1", "top5", "ece", "nll", "brier", "aurc", "auroc", "fpr95", "latency", "memory")
PLOT_KINDS = ("pareto", "reliability", "heatmap", "stream")


def _option(text: str) -> tuple[str, str]:
    """Split ``key=value``; the value stays text, parsed by the option's declared type (``vlmtta.options``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"method options look like key=value, got {text!r}")
    return key.strip(), value


def _classes(text: str) -> str | list[str]:
    """``@file.txt`` reads one class per line; anything else is passed on (comma list or ``dataset:<key>``)."""
    if text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as handle:
                return [line.strip() for line in handle if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise argparse.ArgumentTypeError(f"cannot read the class file {text[1:]!r}: {reason}") from None
    return text


def _batch_images(text: str) -> int | str:
    from .bench import check_batch_images

    try:
        return check_batch_images(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _seeds(text: str) -> list[int]:
    """An argparse type: one seed or a comma list of seeds."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a seed or a comma list of seeds, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {text!r}")
    return seeds


def _count(minimum: int = 1):
    """An argparse type: a whole number >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line (``vlmtta predict: error: ...``) and exit code 2, as for every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_backbone_args(parser: argparse.ArgumentParser, pretrained_default: str | None = "auto") -> None:
    parser.add_argument("--model", default="ViT-B-16",
                        help="open_clip architecture, local-dir:/folder, hf-hub:org/repo or vlmtta-testbed")
    parser.add_argument("--pretrained", default=pretrained_default,
                        help="weights tag, local checkpoint file, or 'none' for random weights (default: %(default)s: "
                             "openai for architectures, the model's own weights for the others)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vlmtta", description="Test-time adaptation for CLIP-style models.")
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
    predict.add_argument("--top-k", type=_count(), default=5)
    predict.add_argument("--max-pixels", type=_count(), default=None,
                         help="downscale larger images to this many pixels before making views (default: 4096x4096)")
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
    speed.add_argument("--output", default=None, help="write the JSON result here, after every row; a re-run with the "
                       "same settings keeps the rows already there and times only the missing methods")
    speed.add_argument("--images-per-second", action="store_true",
                       help="stream synthetic images through Adapter.step_many B at a time and report images/s per "
                            "method and B, and its ratio to encoding the same views alone (instead of per-image "
                            "latency)")
    speed.add_argument("--batch-images", default="1,8,32", help="--images-per-second: images per step, comma-separated "
                       "(default: %(default)s)")
    speed.add_argument("--n-images", type=_count(), default=None,
                       help="--images-per-second: stream length (default: twice the largest --batch-images)")
    _add_bench_parser(commands)
    _add_demo_parser(commands)
    _add_generate_parser(commands)
    table = commands.add_parser("table", help="method x dataset tables from result JSON files")
    table.add_argument("results", nargs="?", default="results", help="folder of result JSON files (default: %(default)s)")
    table.add_argument("--format", choices=("md", "csv"), default="md")
    table.add_argument("--metric", choices=TABLE_METRICS, default="top1",
                       help="top1, top5, ece (20 bins), nll, brier, aurc, auroc, fpr95 (misclassification detection "
                            "from the max probability), latency (ms per sample), memory (peak MB)")
    table.add_argument("--output", default=None, help="also write the table to this file")
    _add_plot_parser(commands)
    data = commands.add_parser("data", help="dataset tools")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    check = data_commands.add_parser("check", help="is each dataset present, complete and readable?")
    check.add_argument("--root", required=True, help="data root holding the dataset folders")
    check.add_argument("--datasets", default="all", help="comma list, or all / cross_domain / imagenet_variants, or "
                                                         "imagenet_c / cifar10_c / cifar100_c[:corruption]")
    check.add_argument("--severity", default=None, help=SEVERITY_HELP)
    check.add_argument("--splits-dir", default=None, help="folder of split_zhou_*.json files (TPT layout)")
    check.add_argument("--no-decode", action="store_true", help="only check that files exist (faster)")
    check.add_argument("--allow-partial", action="store_true",
                       help="exit 0 when fewer images than the published test split are listed but none is missing")
    return parser


def _add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="run methods over benchmark datasets or a features file; write results")
    bench.add_argument("--methods", default=None,
                       help="comma-separated registered methods (required, except with --suite: default all)")
    bench.add_argument("--suite", choices=("testbed",), default=None,
                       help="testbed: the bundled Fashion-MNIST CLIP under 11 corruptions (no data needed)")
    bench.add_argument("--severity", default=None, help=SEVERITY_HELP + "; --suite testbed: one severity (default 3)")
    bench.add_argument("--n-per-corruption", type=int, default=200,
                       help="--suite testbed: seeded test images per corruption (default: %(default)s)")
    bench.add_argument("--datasets", default=None,
                       help="comma list, or all / cross_domain / imagenet_variants; corruption benchmarks as "
                            "imagenet_c:<corruption>:<severity> (also cifar10_c, cifar100_c), imagenet_c:<corruption> "
                            "or imagenet_c (15 corruptions) at the --severity levels; with --features: the dataset "
                            "key (its per-dataset options apply) or a label")
    bench.add_argument("--root", default=None, help="data root holding the dataset folders (see datasets/DATASETS.md)")
    bench.add_argument("--features", default=None, help="precomputed-features .pt file instead of images")
    bench.add_argument("--splits-dir", default=None, help="folder of split_zhou_*.json files (TPT layout)")
    _add_backbone_args(bench)
    bench.add_argument("--templates", default=None, help="template set for every method (default: the method's own, "
                                                         "else tda:<dataset>; cifar18 on CIFAR-C)")
    bench.add_argument("--seed", type=_seeds, default=[0],
                       help="seed of the views and the stream order; a comma list (0,1,2) runs every cell once per seed")
    bench.add_argument("--order", default=None,
                       help="stream order: shuffled (alias iid), sorted, grouped (classes contiguous) or "
                            "dirichlet[:ALPHA] (Dirichlet label shift, default ALPHA 0.1); default: shuffled, file "
                            "order for --features")
    bench.add_argument("--continual", action="store_true",
                       help="stream the --datasets one after the other (in the order given) through each method")
    bench.add_argument("--reset-between", choices=("never", "domain"), default=None,
                       help="--continual: keep each method's state across domains (never, default) or reset it at "
                            "every new domain")
    bench.add_argument("-o", "--option", dest="options", action="append", type=_option, default=[],
                       metavar="KEY=VALUE", help="method hyperparameter, repeatable: key=value for every method, "
                       "method.key=value for one (e.g. -o rlcf.reward_model=vlmtta-testbed)")
    bench.add_argument("--augmentation", default="method",
                       help="view policy of view-based methods: method (their own, default), family (AugMix on "
                            "fine-grained sets, crops+flips on ImageNet), rrc_flip or augmix")
    bench.add_argument("--results", default="results", help="folder of result JSON files (default: %(default)s)")
    bench.add_argument("--cache-dir", default=None, help="view-feature cache (default: $VLMTTA_CACHE or ~/.cache/vlmtta)")
    bench.add_argument("--tag", default="", help="suffix that keeps runs with other settings apart")
    bench.add_argument("--limit", type=_count(), default=None, help="only the first N images of each stream")
    bench.add_argument("--batch-size", type=_count(), default=64,
                       help="images per adaptation step of batch methods (subtta, tent, sar, deyo, batclip, watt, "
                            "clipartt; default: %(default)s, as their papers)")
    bench.add_argument("--batch-images", type=_batch_images, default="auto",
                       help="images adapted at once by episodic methods (tpt, zero, mta, sts, ...), with the same "
                            "results as one at a time; auto (default): 32 on view features, on CUDA up to 32 by "
                            "free memory, 1 for methods that encode their views on CPU; online methods take one "
                            "image at a time")
    bench.add_argument("--checkpoint-every", type=_count(), default=500)
    bench.add_argument("--workers", type=_count(), default=2, help="image-loading threads")
    bench.add_argument("--force", action="store_true", help="recompute finished results")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--table", choices=("md", "csv"), default=None, help="print the table of --results at the end")
    grid = bench.add_argument_group("grid engine", "run each (dataset, method) cell as a task (see 'Running a grid "
                                    "on Ray' in README.rst)")
    grid.add_argument("--engine", choices=("sequential", "ray"), default="sequential",
                      help="sequential: one cell after another in this process (default); ray: each cell a Ray task "
                           '(pip install -e ".[distributed]")')
    grid.add_argument("--address", default=None,
                      help="Ray cluster to join: auto (the running cluster), ray://HOST:10001; default: start a local Ray")
    grid.add_argument("--cpus-per-cell", type=float, default=1.0, help="CPUs each Ray task reserves (default: 1)")
    grid.add_argument("--gpus-per-cell", type=float, default=0.0,
                      help="GPUs each Ray task reserves, a fraction shares one (e.g. 0.25: four cells per GPU; "
                           "default: 0)")
    grid.add_argument("--images-per-task", type=_count(), default=None,
                      help="split episodic cells into Ray tasks of this many images, merged into one result (online "
                           "streams are never split)")
    grid.add_argument("--retries", type=int, default=1,
                      help="Ray: times a task is retried when its worker dies (default: 1)")
    bench.set_defaults(model=None, pretrained=None)  # ViT-B-16 / openai, or the testbed model with --suite testbed
    bench.add_argument("--precision", choices=("auto", "fp32", "fp16"), default="auto",
                       help="features files: CLIP logits in the file's precision (auto: fp16 files are scored as "
                            "fp16 CLIP inference does), or fp32 / fp16")


def _add_plot_parser(commands) -> None:
    plot = commands.add_parser("plot", help="figures from result files (needs the plot extra: matplotlib)")
    plot.add_argument("results", nargs="+", help="result folders or JSON files")
    plot.add_argument("--kind", choices=PLOT_KINDS, required=True,
                      help="pareto: metric against time per sample, one point per method (log-x); reliability: "
                           "reliability diagrams; heatmap: method x dataset gain over --baseline; stream: running "
                           "accuracy of the online methods along each stream")
    plot.add_argument("-o", "--output", required=True, help="image file (.png, .pdf or .svg)")
    plot.add_argument("--baseline", default="zeroshot", help="reference method (default: %(default)s)")
    plot.add_argument("--metric", choices=TABLE_METRICS[:8], default="top1", help="pareto and heatmap (default: top1)")
    plot.add_argument("--methods", default=None, help="comma-separated methods to keep (default: all)")
    plot.add_argument("--datasets", default=None, help="comma-separated datasets to keep (default: all)")


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options (shared by ``vlmtta demo`` and ``python -m vlmtta.demo``)."""
    _add_backbone_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio share link")
    return parser


def _add_demo_parser(commands) -> None:
    add_demo_arguments(commands.add_parser("demo", help="open the Gradio demo (needs the demo extra)"))


def _add_generate_parser(commands) -> None:
    gen = commands.add_parser("generate", help="pre-generate DiffTPT's diffusion variations of image files (resumable)")
    gen.add_argument("images", nargs="+", metavar="IMG")
    gen.add_argument("--count", type=int, default=63, help="variations per image (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cache-dir", default=None, help="default: $VLMTTA_CACHE/diffusion or ~/.cache/vlmtta/diffusion")
    gen.add_argument("--pipeline", default="lambdalabs/sd-image-variations-diffusers",
                     help="diffusers image-variation pipeline: hub id or local folder (default: %(default)s)")
    gen.add_argument("--revision", default="v2.0")
    gen.add_argument("--guidance-scale", type=float, default=3.0)
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--image-size", type=int, default=224, help="the backbone's input size (cache key)")
    gen.add_argument("--device", default="auto")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"predict": _predict, "methods": _methods, "bench-speed": _bench_speed, "bench": _bench,
                    "table": _table, "plot": _plot, "data": _data_check, "demo": _demo, "generate": _generate}
        return commands[args.command](args)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"vlmtta: error: {error}", file=sys.stderr)
        return 2


def _warn(message: str) -> None:
    print(f"vlmtta: warning: {message}", file=sys.stderr)


def _bench_testbed(args: argparse.Namespace) -> int:
    """``bench --suite testbed``: every option is honoured or refused; results are keyed by their settings."""
    from pathlib import Path

    from .streams import StreamOrder
    from .testbed.suite import MODEL, format_table, run_suite, save_suite, write_summary
    from .writable import ensure_writable_dir

    ignored = [flag for flag, value in (("--datasets", args.datasets), ("--root", args.root),
                                         ("--features", args.features), ("--splits-dir", args.splits_dir),
                                         ("--templates", args.templates), ("--tag", args.tag or None),
                                         ("--limit", args.limit),
                                         ("--reset-between", args.reset_between))
               if value is not None]
    ignored += [flag for flag, changed in (("--augmentation", args.augmentation != "method"),
                                           ("--precision", args.precision != "auto"),
                                           ("--cache-dir", args.cache_dir is not None),
                                           ("--checkpoint-every", args.checkpoint_every != 500),
                                           ("--workers", args.workers != 2), ("--force", args.force),
                                           ("--continual", args.continual)) if changed]
    if ignored:
        raise ValueError(f"--suite testbed does not take {', '.join(ignored)} (it streams its own corrupted "
                         "Fashion-MNIST images; use --n-per-corruption for the size, -o for method options).")
    ensure_writable_dir(args.results, "Results folder")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    order = str(StreamOrder.parse(args.order or "iid"))
    backbone = None
    if args.model is not None and args.model != MODEL:
        from .backbone import load_backbone

        backbone = load_backbone(args.model, "auto" if args.pretrained is None else args.pretrained, args.device)
    elif args.pretrained is not None:
        raise ValueError("--pretrained does not apply to the testbed model (its weights are shipped); pass --model "
                         "to run the suite on another backbone.")
    from .methods import method_names

    names = methods or method_names()
    check_option_scopes(dict(args.options), names)
    options = {m: scoped_options(m, dict(args.options)) for m in names} if args.options else None
    progress = None if args.no_progress else (lambda line: print(line, file=sys.stderr, flush=True))
    severity = _one_severity(args.severity)
    result = run_suite(methods, severity, args.n_per_corruption, args.seed, order=order, options=options,
                       backbone=backbone, device=args.device, progress=progress, batch_size=args.batch_size,
                       batch_images=args.batch_images)
    folder = Path(args.results) / "testbed"
    save_suite(result, folder, options)
    print(format_table(result, {"md": "markdown", "csv": "csv"}.get(args.table, "text")))
    table, figure = write_summary(folder, severity, result.protocol["images_per_corruption"],
                                  result.protocol["order"], args.seed, _warn)
    print(f"results: {folder}/ (one JSON + per-sample .npz per method and corruption); every method at these "
          f"settings: {table}" + (f", Pareto plot: {figure}" if figure else ""), file=sys.stderr)
    return 0


def _one_severity(text: str | None, default: int = 3) -> int:
    from .data import parse_severities

    levels = parse_severities(text) if text is not None else (default,)
    if len(levels) != 1:
        raise ValueError(f"--suite testbed runs one severity, got --severity {text}.")
    return levels[0]


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args)


def _generate(args: argparse.Namespace) -> int:
    from .generation import VariationGenerator, default_cache_dir, generate_dataset
    from .writable import ensure_writable_dir

    ensure_writable_dir(args.cache_dir or default_cache_dir(), "Cache folder")
    generator = VariationGenerator(args.pipeline, args.revision, args.guidance_scale, args.steps, args.device,
                                   args.batch_size)
    stats = generate_dataset(args.images, args.count, args.seed, args.cache_dir, generator, args.image_size,
                             on_error=lambda path, error: print(f"vlmtta: skipping {path}: {error}", file=sys.stderr))
    print(json.dumps(stats))
    return 1 if stats["failed"] else 0


def _predict(args: argparse.Namespace) -> int:
    from .api import DEFAULT_METHOD, Adapter
    from .images import DEFAULT_MAX_PIXELS, ImageLoadError

    method = args.method or DEFAULT_METHOD
    check_option_scopes(dict(args.options), [method])
    adapter = Adapter(args.classes, method, model=args.model, pretrained=args.pretrained,
                      templates=args.templates, device=args.device, seed=args.seed, top_k=args.top_k,
                      max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, **scoped_options(method, dict(args.options)))
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
    from .speed import format_table, run_speed_benchmark
    from .writable import ensure_writable_file

    if args.output:
        ensure_writable_file(args.output, "Output file")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if args.images_per_second:
        return _images_per_second(args, methods)
    result = run_speed_benchmark(args.model, args.pretrained, methods, n_views=args.n_views, n_classes=args.n_classes,
                                 device=args.device, repeats=args.repeats, warmup=args.warmup, output=args.output,
                                 on_row=_print_speed_row)
    print(format_table(result))
    return 0


def _print_speed_row(row: dict) -> None:
    """One progress line per timed entry (stderr), so a long CPU table shows where it is."""
    resumed = " (from the earlier run)" if row.get("resumed") else ""
    print(f"bench-speed: {row['entry']}: {row['latency_ms']:.1f} ms{resumed}", file=sys.stderr, flush=True)


def _images_per_second(args: argparse.Namespace, methods: list[str] | None) -> int:
    from .speed import format_images_table, run_images_per_second, save_result

    try:
        sizes = [int(b) for b in args.batch_images.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch-images takes whole numbers separated by commas, got {args.batch_images!r}.") from None
    result = run_images_per_second(args.model, args.pretrained, methods, n_views=args.n_views,
                                   n_classes=args.n_classes, batch_images=sizes, n_images=args.n_images,
                                   device=args.device, repeats=args.repeats, warmup=args.warmup)
    print(format_images_table(result))
    if args.output:
        save_result(result, args.output)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import BenchSpec, EmptySource, run_bench
    from .data import DatasetNotFound, parse_datasets

    if args.suite == "testbed":
        if args.engine != "sequential":
            raise ValueError("--suite testbed runs in this process; --engine ray runs --datasets or --features grids.")
        if len(args.seed) > 1:
            raise ValueError("--suite testbed takes one --seed.")
        args.seed = args.seed[0]
        return _bench_testbed(args)
    args.model = "ViT-B-16" if args.model is None else args.model
    args.pretrained = "auto" if args.pretrained is None else args.pretrained
    if not args.methods:
        raise ValueError("bench needs --methods a,b,... (or --suite testbed).")
    if args.reset_between and not args.continual:
        raise ValueError("--reset-between applies to --continual runs only.")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    common = dict(methods=methods, results_dir=Path(args.results), root=Path(args.root) if args.root else None,
                  splits_dir=args.splits_dir, model=args.model, pretrained=args.pretrained, device=args.device,
                  templates=args.templates, order=args.order, options=dict(args.options),
                  augmentation=args.augmentation, cache_dir=args.cache_dir, tag=args.tag, limit=args.limit,
                  checkpoint_every=args.checkpoint_every, workers=args.workers, progress=not args.no_progress,
                  force=args.force, precision=args.precision, reset_between=args.reset_between or "never",
                  batch_size=args.batch_size, batch_images=args.batch_images)
    if args.features:
        if args.continual:
            raise ValueError("--continual streams datasets (--root, --datasets), not a features file.")
        sources = [dict(features=Path(args.features), dataset=args.datasets)]
    else:
        if not args.root:
            raise ValueError("bench needs --root DIR (with --datasets) or --features FILE.pt.")
        keys = parse_datasets(args.datasets, args.severity)
        sources = [dict(domains=keys)] if args.continual else [dict(dataset=key) for key in keys]
    sources = [dict(source, seed=seed) for seed in args.seed for source in sources]
    if args.engine == "ray":
        return _bench_grid(args, [BenchSpec(**common, **source) for source in sources])
    grid_flags = [flag for flag, value, default in (("--address", args.address, None), ("--cpus-per-cell",
                  args.cpus_per_cell, 1.0), ("--gpus-per-cell", args.gpus_per_cell, 0.0), ("--images-per-task",
                  args.images_per_task, None), ("--retries", args.retries, 1)) if value != default]
    if grid_flags:
        raise ValueError(f"{', '.join(grid_flags)} appl{'ies' if len(grid_flags) == 1 else 'y'} to --engine ray only.")
    failed = 0
    for source in sources:
        try:
            for r in run_bench(BenchSpec(**common, **source)):
                seed = f"  seed {r['seed']}" if len(args.seed) > 1 else ""
                print(f"{r['dataset']:<16} {r['method']:<14} {r['accuracy']:6.2f} %  ({r['correct']}/{r['n']}){seed}")
        except (DatasetNotFound, EmptySource) as error:
            print(f"vlmtta: skipping: {error}", file=sys.stderr)
            failed += 1
    if args.table:
        from .results import format_tables, load_results

        print(format_tables(load_results(args.results, _warn), args.table), end="")
    return 1 if failed else 0


def _bench_grid(args: argparse.Namespace, specs: list) -> int:
    """``bench --engine ray``: every cell a Ray task; one line per finished cell, then a summary."""
    from .grid import run_grid
    from .results import format_tables, load_results

    report = run_grid(specs, engine=args.engine, images_per_task=args.images_per_task, address=args.address,
                      cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell, retries=args.retries,
                      echo=lambda line: print(line, flush=True))
    if args.table:
        print(format_tables(load_results(args.results, _warn), args.table), end="")
    return 1 if report.failed else 0


def _table(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .results import format_tables, load_results

    if not Path(args.results).is_dir():
        raise FileNotFoundError(f"Results folder {args.results} does not exist.")
    if args.output:
        from .writable import ensure_writable_file

        ensure_writable_file(args.output, "Output file")
    text = format_tables(load_results(args.results, _warn), args.format, args.metric)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .plots import plot
    from .results import load_results, read_result

    results = []
    for item in args.results:
        path = Path(item)
        if path.is_dir():
            results += load_results(path, _warn)
        elif path.is_file():
            results += [r for r in [read_result(path, _warn)] if r is not None]
        else:
            raise FileNotFoundError(f"{item} is neither a results folder nor a result file.")
    for field, wanted in (("method", args.methods), ("dataset", args.datasets)):
        if wanted:
            keep = {w.strip() for w in wanted.split(",") if w.strip()}
            results = [r for r in results if r[field] in keep or (field == "method" and r["method"] == args.baseline)]
    try:
        out = plot(results, args.kind, args.output, args.baseline, args.metric, _warn)
    except ImportError as error:
        raise RuntimeError(str(error)) from None
    print(out)
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import check_dataset, parse_datasets

    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"Data root {args.root} does not exist.")
    reports = [check_dataset(key, args.root, args.splits_dir, decode=not args.no_decode)
               for key in parse_datasets(args.datasets, args.severity)]
    for report in reports:
        print(report.line())
    bad = [r.key for r in reports if not r.ok(args.allow_partial)]
    if bad:
        print(f"vlmtta: {len(bad)} dataset(s) not ready: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
