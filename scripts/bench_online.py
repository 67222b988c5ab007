"""Per-sample cost of the online cache methods with FULL caches, as a ratio to one single-view image encode.

For each method: the median time of ``predict_features`` on one image's view features at ``--classes`` classes
with every cache slot filled (TDA: 3 + 2 per class, BoostAdapter: the same plus its boosting copy, DMN: 50 per
class), minus zero-shot's, divided by the median time of encoding one image (original view: resize, crop,
``encode_images``) with ``--model`` (random weights: speed does not depend on them).

    python scripts/bench_online.py [--classes 1000] [--threads 2] [--repeats 50] [--device cpu] [--output r.json]

``--stream FILE.pt`` (a ``--features`` file, e.g. the shared ImageNet ViT-B/32 stream) instead runs every method of
``--methods`` over the first ``--n`` images of that stream in file order, one view each, and reports per method the
mean and median time of ``predict_features`` per image (whatever the state has grown to), the accuracy, and the
mean time as a ratio to zero-shot scoring and to TDA measured in the same run:

    python scripts/bench_online.py --stream imagenet_stream.pt --methods zeroshot,tda,dota,onzeta,bca,ecalp,oga,freetta [--n 6997]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import vlmtta

# importing the method modules registers tda, dmn and boostadapter
import vlmtta.methods.boostadapter
import vlmtta.methods.dmn
import vlmtta.methods.tda
from vlmtta.features import load_features_file
from vlmtta.memory import ClassCache
from vlmtta.methods import Context, create_method
from vlmtta.views import original_view

ENTRIES = [  # label, method, options, views per image
    ("zeroshot", "zeroshot", {}, 1),
    ("tda", "tda", {"n_views": 1}, 1),
    ("dmn (zero-shot)", "dmn", {"n_views": 1}, 1),
    ("boostadapter, 1 view", "boostadapter", {"n_views": 1}, 1),
    ("zeroshot, 64 views", "zeroshot", {"n_views": 64}, 64),
    ("tda, 64 views", "tda", {"n_views": 64}, 64),
    ("boostadapter, 64 views", "boostadapter", {"n_views": 64}, 64),
    ("zeroshot, 32 views", "zeroshot", {"n_views": 32}, 32),
    ("dmn (zero-shot), 32 views", "dmn", {"n_views": 32}, 32),
]


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3, sync: Callable[[], None] = lambda: None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def fill(cache: ClassCache, generator: torch.Generator) -> None:
    """Every slot occupied by a random unit feature, entropy and 0/1 value."""
    cache.keys.copy_(F.normalize(torch.randn(cache.keys.shape, generator=generator), dim=-1))
    cache.entropy.copy_(torch.rand(cache.entropy.shape, generator=generator))
    cache.values.copy_((torch.rand(cache.values.shape, generator=generator) < 0.05).float())


def bound_full(method: str, options: dict, text: torch.Tensor, generator: torch.Generator):
    m = create_method(method, **options)
    m.bind(Context([str(i) for i in range(text.shape[0])], [], text, 100.0))
    for name in ("positive", "negative", "dynamic"):
        if getattr(m, name, None) is not None:
            fill(getattr(m, name), generator)
    return m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--stream", type=Path, default=None, help="a --features file: time methods over its stream")
    parser.add_argument("--methods", default="zeroshot,tda,dota,onzeta,bca,ecalp,oga,freetta", help="--stream: methods to run")
    parser.add_argument("--n", type=int, default=None, help="--stream: first N images (default: all)")
    parser.add_argument("--official-adte", type=Path, default=None,
                        help="--stream: also time the official TE/ADTE step (a checkout of Jinx630/ADTE)")
    parser.add_argument("--save-probs", type=Path, default=None, help="--stream: save every entry's probabilities")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stream is not None:
        return stream_costs(args)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    backbone = vlmtta.FrozenCLIP(args.model, None, args.device)
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 375, 500), dtype=torch.uint8, generator=generator).to(device)
    encode = median_ms(lambda: backbone.encode_images(
        original_view(image, backbone.image_size, backbone.mean, backbone.std)), max(5, args.repeats // 5), sync=sync)
    dim = backbone.encode_images(original_view(image, backbone.image_size, backbone.mean, backbone.std)).shape[1]
    text = F.normalize(torch.randn(args.classes, dim, generator=generator), dim=-1).to(device)
    print(f"{args.model} (random weights), {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.classes} classes, full caches, median of {args.repeats}")
    print(f"single-view image encode: {encode:.1f} ms\n")
    print("| entry | views | ms / image | overhead over zero-shot (ms) | overhead / encode |")
    print("|---|---:|---:|---:|---:|")
    rows, base = [], {}
    for label, method, options, n_views in ENTRIES:
        m = bound_full(method, options, text, generator)
        feats = F.normalize(torch.randn(n_views, dim, generator=generator), dim=-1).to(device)
        ms = median_ms(lambda m=m, feats=feats: m.predict_features(feats), args.repeats, sync=sync)
        if method == "zeroshot":
            base[n_views] = ms
        over = ms - base.get(n_views, float("nan"))
        rows.append({"entry": label, "views": n_views, "ms": ms, "overhead_ms": over, "ratio_to_encode": over / encode})
        print(f"| {label} | {n_views} | {ms:.2f} | {over:.2f} | {100 * over / encode:.1f} % |", flush=True)
    if args.output:
        args.output.write_text(json.dumps({"model": args.model, "device": str(device), "classes": args.classes,
                                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                                           "encode_ms": encode, "rows": rows}, indent=2))


def stream_costs(args: argparse.Namespace) -> None:
    """Per-image cost of each method over a real feature stream, as ratios to zero-shot scoring and TDA."""
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    source = load_features_file(args.stream)
    n = min(args.n or len(source), len(source))
    feats = source.image_features[:n, 0].float().to(device)
    feats = F.normalize(feats, dim=-1)
    labels = source.labels[:n].to(device)
    text = source.text_features.to(device)
    names = source.classnames
    print(f"{args.stream.name}: {n} images, {text.shape[0]} classes, dim {text.shape[1]}, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, one view, file order")
    steps = []  # (label, one image's features [1, D] -> probabilities [C])
    for method in args.methods.split(","):
        m = create_method(method, n_views=1)
        m.bind(Context(names, [], text, source.logit_scale))
        steps.append((method, m.predict_features))
    if args.official_adte is not None:
        steps += official_adte_steps(args.official_adte, text, source.logit_scale, feats)
    rows, saved = [], {}
    for label, step in steps:
        times, correct, probs_all = [], 0, []
        for i in range(n):
            sync()
            start = time.perf_counter()
            probs = step(feats[i:i + 1])
            sync()
            times.append(time.perf_counter() - start)
            correct += int(probs.argmax() == labels[i])
            if args.save_probs is not None:
                probs_all.append(probs.reshape(-1).float().cpu())
        if args.save_probs is not None:
            saved[label] = torch.stack(probs_all)
        rows.append({"method": label, "mean_ms": 1000 * statistics.fmean(times),
                     "median_ms": 1000 * statistics.median(times), "accuracy": 100 * correct / n})
        print(f"  {label}: {rows[-1]['mean_ms']:.3f} ms mean, {rows[-1]['accuracy']:.2f} %", flush=True)
    if args.save_probs is not None:
        torch.save(saved, args.save_probs)
    by_name = {row["method"]: row["mean_ms"] for row in rows}
    print("\n| method | accuracy % | ms / image (mean) | median | / zero-shot | / TDA |\n|---|---:|---:|---:|---:|---:|")
    for row in rows:
        row["ratio_zeroshot"] = row["mean_ms"] / by_name.get("zeroshot", float("nan"))
        row["ratio_tda"] = row["mean_ms"] / by_name.get("tda", float("nan"))
        print(f"| {row['method']} | {row['accuracy']:.2f} | {row['mean_ms']:.3f} | {row['median_ms']:.3f} | "
              f"{row['ratio_zeroshot']:.1f} | {row['ratio_tda']:.2f} |")
    if args.output:
        args.output.write_text(json.dumps({"stream": str(args.stream), "n": n, "device": str(device),
                                           "threads": torch.get_num_threads(), "torch": torch.__version__,
                                           "rows": rows}, indent=2))


def official_adte_steps(repo: Path, text: torch.Tensor, logit_scale: float, feats: torch.Tensor) -> list:
    """The official per-image step of TE and ADTE (``Zero.zero`` in ``ttas/zero.py`` of a Jinx630/ADTE checkout,
    run as released) on the same features: the image encoder is replaced by the identity (the stream's features are
    already L2-normalised).  ADTE runs the code's default path: a bias precomputed over the stream (transductive,
    ``estimate_log_bias`` = the code's pre-pass), ``q_l`` its min-max into [0.01, 0.9]; TE is ``--use_adte
    --same_q --scale_w 0.1`` (Tsallis with q = 0.1)."""
    import importlib.util
    import sys
    import types

    from vlmtta.methods.adte import class_q, estimate_log_bias
    stubs = {"adte_official": types.ModuleType("adte_official"),
             "adte_official.base": types.SimpleNamespace(BaseTTAModule=torch.nn.Module),
             "clip": types.ModuleType("clip"), "clip.custom_clip": types.SimpleNamespace(get_clip=None),
             "utils": types.ModuleType("utils"), "utils.tools": types.SimpleNamespace(print=print, greedy_break=None)}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("adte_official.zero", repo / "ttas" / "zero.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, previous in saved.items():
            sys.modules.pop(name)
            if previous is not None:
                sys.modules[name] = previous
    model = types.SimpleNamespace(get_image_features=lambda views: views,
                                  logit_scale=torch.nn.Parameter(torch.tensor(logit_scale).log(), requires_grad=False))
    log_pi = estimate_log_bias(logit_scale * feats @ text.t())
    steps = []
    for label, scale_w in (("te (official)", 0.1), ("adte (official)", class_q(log_pi, (0.01, 0.9)))):
        official = module.Zero.__new__(module.Zero)
        torch.nn.Module.__init__(official)
        official.model, official.z_txt, official.gamma = model, text, 0.1
        official.pre_compute_q, official.q, official.scale_w = 1, log_pi, scale_w
        steps.append((label, lambda f, o=official: o.zero(f, None, 0, 1)[0]))
    return steps


if __name__ == "__main__":
    main()
