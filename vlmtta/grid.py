"""Evaluation grids: many ``vlmtta bench`` cells, run one after another or as Ray tasks on a cluster.

A *cell* is one method on one source (dataset or features file) with one backbone, seed and order (a
continual cell: one method over its sequence of datasets).  ``plan`` turns bench specs into tasks:

1. one *encode* task per source of images (backbone, dataset, views, seed): it fills the view-feature cache
   of every view configuration its methods need (``vlmtta.features.ViewFeatureCache``, file-locked), so
   the cells that share it never encode the same views twice;
2. one *cell* task per cell, after its encode task; or, for an episodic cell split by ``images_per_task``,
   one *part* task per image range of its stream and a *merge* task that concatenates the parts in stream
   order into the one result.  An online stream (and a batch method's) is never split: its order is part
   of the protocol.

Every task calls the sequential runner's own pieces (``vlmtta.bench``): a cell is ``run_bench`` on one
method; a part is ``stream_run`` on an image range, saved as a per-sample record under the results'
``.partial/`` folder; the merge writes the result with ``save_result`` exactly as ``run_bench`` does.  So
the result JSON and per-sample file of a cell are the same whichever engine ran it, and whether it was
split or not: same predictions, probabilities, metrics, protocol and ``config_key``.  Only what measures
the run differs: ``timing`` (a split cell's ``wall_s`` is the sum of its parts' and its latencies are the
parts' own), ``memory`` (a split cell's is its largest part's), ``finished_at``, the per-sample latencies
(hence ``per_sample.sha256`` and ``checksum``) and ``resumed_from`` (a split cell's sums its parts').

Engines (``run_grid(engine=...)``): ``local`` runs the tasks in this process, in plan order; ``ray`` submits
them as Ray tasks (``num_cpus`` / ``num_gpus`` per cell, fractions allowed), each task taking its encode
task's result as an argument so Ray starts it only after the encoding.  A finished cell is skipped on a
re-run (its result is read, not recomputed), a finished part is not streamed again, and an episodic part
resumes from its checkpoint, so a grid that dies resumes where it stopped.  A failed cell (an exception,
a worker killed by the OOM killer) is reported with its error; the other cells go on.

Fault injection (tests): ``VLMTTA_GRID_FAULT="LABEL:raise"`` makes the cell or part ``LABEL`` (as printed,
e.g. ``eurosat/zeroshot`` or ``eurosat/zeroshot[0:6]``) raise; ``"LABEL:exit:MARKER"`` kills its worker
process the first time (while the file ``MARKER`` does not exist), as a crash would.  Several faults are
separated by ``;``.  These variables, and ``VLMTTA_FAIL_AFTER``, travel with every task to its worker.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from .bench import (FAIL_ENV, BenchSpec, _checkpoint_path, _prepare, _Source, default_cache_dir, method_options,
                    open_stream, run_bench, stream_run, stream_timing)
from .data import read_split
from .features import load_features_file
from .methods import Need, check_options, get_method_class
from .metrics import DamagedSamples, Samples
from .options import check_option_scopes, narrow_options
from .results import save_result
from .writable import ensure_writable_dir

ENGINES = ("local", "ray")
FAULT_ENV = "VLMTTA_GRID_FAULT"
TASK_ENV = (FAULT_ENV, FAIL_ENV)  # forwarded to every task


@dataclass
class Cell:
    """One method on one source; ``parts``: the image ranges of a split episodic cell (empty: one task)."""

    spec: BenchSpec  # one source, ``methods == [method]``
    method: str
    n_images: int
    parts: list[tuple[int, int]] = field(default_factory=list)
    encode: int | None = None  # index of its encode task in ``Plan.encodes``

    @property
    def label(self) -> str:
        source = "+".join(self.spec.domains) if self.spec.domains else self.spec.dataset or Path(self.spec.features).stem
        return f"{source}/{self.method}/seed{self.spec.seed}"


@dataclass
class Plan:
    """Encode tasks (one spec per source of images, with the methods whose views it encodes) and cells."""

    encodes: list[BenchSpec]
    cells: list[Cell]
    missing: list[tuple[str, str]] = field(default_factory=list)  # (cell label, why) of sources not found


def plan(specs: list[BenchSpec], images_per_task: int | None = None) -> Plan:
    """The tasks of a grid: ``specs`` (one source each, any number of methods) x their methods."""
    if images_per_task is not None and images_per_task < 1:
        raise ValueError(f"images_per_task must be at least 1, got {images_per_task}.")
    from .data import DatasetNotFound

    encodes: list[BenchSpec] = []
    cells: list[Cell] = []
    missing: list[tuple[str, str]] = []
    for spec in specs:
        spec = replace(spec, progress=False)
        try:
            n, option_dataset = _source_size(spec)
        except DatasetNotFound as error:  # reported as failed cells; the other sources still run
            missing += [(Cell(_sub_spec(spec, [m]), m, 0).label, f"{type(error).__name__}: {error}")
                        for m in spec.methods]
            continue
        check_option_scopes(spec.options, spec.methods)
        for method in spec.methods:  # every option checked before any task runs, as run_bench does
            check_options(method, **method_options(method, option_dataset, spec.options, spec.augmentation))
        cached = [m for m in spec.methods if Need.VIEW_FEATURES in get_method_class(m).needs
                  and not hasattr(get_method_class(m), "predict_batch")]
        encode = None
        if spec.features is None and not spec.domains and cached:
            encodes.append(_sub_spec(spec, cached))
            encode = len(encodes) - 1
        for method in spec.methods:
            cell = Cell(_sub_spec(spec, [method]), method, n, encode=encode)
            if images_per_task and n > images_per_task and _splittable(spec, method):
                cell.parts = [(a, min(a + images_per_task, n)) for a in range(0, n, images_per_task)]
            cells.append(cell)
    return Plan(encodes, cells, missing)


def _sub_spec(spec: BenchSpec, methods: list[str]) -> BenchSpec:
    """``spec`` for some of its methods, without the options scoped to the others."""
    return replace(spec, methods=methods, options=narrow_options(spec.options, methods))


def _source_size(spec: BenchSpec) -> tuple[int, str | None]:
    """How many images the stream of ``spec`` holds (after ``limit``), and its per-dataset options key."""
    from .data import get_spec

    if spec.domains:
        sizes = [len(read_split(key, spec.root, spec.splits_dir)) for key in spec.domains]
        return sum(min(n, spec.limit or n) for n in sizes), get_spec(spec.domains[0]).clean_key
    if spec.features is not None:
        n, name = len(load_features_file(spec.features).labels), spec.dataset
    else:
        if not spec.dataset or spec.root is None:
            raise ValueError("bench needs a dataset and a data root (--datasets, --root), or --features FILE.")
        n, name = len(read_split(spec.dataset, spec.root, spec.splits_dir)), spec.dataset
    try:
        key = get_spec(name).clean_key if name else None
    except ValueError:
        key = None
    return min(n, spec.limit or n), key


def _splittable(spec: BenchSpec, method: str) -> bool:
    """Episodic methods without a batch protocol, on a single source: their images are independent."""
    cls = get_method_class(method)
    return cls.episodic and not hasattr(cls, "predict_batch") and not spec.domains


# ---------------------------------------------------------------- the tasks (run in a worker, or here)

def encode_task(spec: BenchSpec) -> dict[str, Any]:
    """Fill the view-feature cache of every view configuration that ``spec``'s methods read."""
    start = time.perf_counter()
    source = _Source(spec)
    configs = {}
    for method in spec.methods:
        config = source.adapter(method)[0].view_config
        configs.setdefault(repr(asdict(config)), config)
    caches = [str(source.view_cache(config).folder) for config in configs.values()]
    return {"kind": "encode", "label": f"{source.name} (views)", "caches": caches,
            "seconds": time.perf_counter() - start}


def cell_task(spec: BenchSpec, label: str, *_after: Any) -> dict[str, Any]:
    """Run one cell with the sequential runner; a finished cell is read, not rerun."""
    _fault(label)
    start = time.perf_counter()
    results = run_bench(spec)
    computed = [r for r in results if "_source" not in r]  # read_result marks results it read from disk
    return {"kind": "cell", "label": label, "skipped": not computed, "seconds": time.perf_counter() - start,
            "n": sum(r["n"] - r["resumed_from"] for r in computed), "results": [_brief(r) for r in results]}


def part_task(spec: BenchSpec, label: str, start: int, stop: int, *_after: Any) -> dict[str, Any]:
    """Stream images ``start:stop`` of an episodic cell's stream; save them as a part record (or find it saved)."""
    _fault(label)
    method, tick = spec.methods[0], time.perf_counter()
    source, order, stream = open_stream(spec)
    run = _prepare(spec, source, method, order, stream)
    existing = None if spec.force else run.finished()
    path = part_path(run.path, start, stop)
    info = {"kind": "part", "label": label, "part": str(path), "result": str(run.path), "range": [start, stop]}
    if existing is not None:
        return {**info, "finished": _brief(existing), "skipped": True, "n": 0}
    if not spec.force and _read_part(path, run.key) is not None:
        return {**info, "skipped": True, "n": 0}
    ckpt = path.with_name(path.name.replace(".npz", ".ckpt.npz"))
    fail_after = int(os.environ[FAIL_ENV]) if os.environ.get(FAIL_ENV) else None
    result, samples = stream_run(spec, source, run, stream[start:stop], fail_after, ckpt_path=ckpt)
    samples.save(path, meta={"config_key": run.key, "range": [start, stop], "result": result})
    ckpt.unlink(missing_ok=True)
    return {**info, "skipped": False, "n": len(samples) - result["resumed_from"], "seconds": time.perf_counter() - tick}


def merge_task(label: str, *parts: dict[str, Any]) -> dict[str, Any]:
    """Concatenate a split cell's part records in stream order into its result, written as ``run_bench`` does."""
    tick = time.perf_counter()
    finished = next((p["finished"] for p in parts if p.get("finished")), None)
    if finished is not None:
        return {"kind": "cell", "label": label, "skipped": True, "n": 0, "results": [finished], "seconds": 0.0}
    records = [_read_part(Path(p["part"]), None) for p in parts]
    if any(r is None for r in records):
        raise RuntimeError(f"{label}: a part record is missing or damaged; run the grid again to redo it.")
    keys = {meta["config_key"] for _, meta in records}
    ranges = [tuple(meta["range"]) for _, meta in records]
    if len(keys) != 1 or any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        raise RuntimeError(f"{label}: part records of different settings or non-contiguous ranges {ranges}.")
    samples = Samples.concat([s for s, _ in records])
    metas = [meta["result"] for _, meta in records]
    result = {**metas[0], "resumed_from": sum(m["resumed_from"] for m in metas),
              "timing": stream_timing(samples, sum(m["timing"]["wall_s"] for m in metas)),
              "memory": max((m["memory"] for m in metas), key=lambda m: m.get("peak_mb") or 0.0),
              "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = Path(parts[0]["result"])
    saved = save_result(path, result, samples)
    for p in parts:
        Path(p["part"]).unlink(missing_ok=True)
    _checkpoint_path(path).unlink(missing_ok=True)
    computed = sum(p["n"] for p in parts)
    return {"kind": "cell", "label": label, "skipped": False, "n": computed, "results": [_brief(saved)],
            "seconds": sum(p.get("seconds", 0.0) for p in parts) + time.perf_counter() - tick}


def part_path(result_path: Path, start: int, stop: int) -> Path:
    """The per-sample record of images ``start:stop`` of a split cell (under the results' ``.partial/``)."""
    return result_path.parent / ".partial" / f"{result_path.stem}.part{start}-{stop}.npz"


def _read_part(path: Path, key: str | None) -> tuple[Samples, dict[str, Any]] | None:
    """A part record and its meta (None when absent, damaged, or of other settings than ``key``)."""
    if not path.is_file():
        return None
    try:
        samples, meta = Samples.load(path)
    except DamagedSamples:
        return None
    return (samples, meta) if key is None or meta.get("config_key") == key else None


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result.get(k) for k in ("dataset", "method", "accuracy", "correct", "n")}


def _fault(label: str) -> None:
    """The test hook of ``VLMTTA_GRID_FAULT`` (see the module docstring)."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(";")):
        if item == f"{label}:raise":
            raise RuntimeError(f"injected fault in {label} ({FAULT_ENV})")
        target, _, marker = item.rpartition(":exit:")
        if target == label and marker and not Path(marker).exists():
            Path(marker).touch()
            os._exit(3)


# ---------------------------------------------------------------- executors

@dataclass
class Outcome:
    """What became of one submitted task."""

    task: str  # "encode" or "cell"
    label: str
    value: dict[str, Any] | None = None
    error: str | None = None


class LocalExecutor:
    """Runs each task when it is submitted, in this process; a task whose input failed fails too."""

    def __init__(self) -> None:
        self.done: list[Outcome] = []

    def submit(self, fn: Callable[..., dict], args: tuple, kind: str, label: str, resources: dict) -> Outcome:
        failed = next((a for a in args if isinstance(a, Outcome) and a.error is not None), None)
        outcome = Outcome(kind, label)
        if failed is not None:
            outcome.error = f"{failed.label} failed: {failed.error}"
        else:
            try:
                outcome.value = fn(*(a.value if isinstance(a, Outcome) else a for a in args))
            except Exception as error:  # noqa: BLE001 - a failed cell is reported; the others go on
                outcome.error = f"{type(error).__name__}: {error}"
        self.done.append(outcome)
        return outcome

    def results(self, handles: list[Outcome]) -> Iterator[Outcome]:
        yield from handles


class RayExecutor:
    """Submits tasks to Ray; ``results`` yields them as they finish."""

    def __init__(self, retries: int = 1) -> None:
        import ray

        self.ray, self.retries, self.labels = ray, retries, {}
        self.env = {k: os.environ[k] for k in TASK_ENV if k in os.environ}
        self.remote = ray.remote(_with_env)

    def submit(self, fn: Callable[..., dict], args: tuple, kind: str, label: str, resources: dict):
        ref = self.remote.options(max_retries=self.retries, retry_exceptions=False, name=f"{kind}:{label}",
                                  **resources).remote(self.env, fn, *args)
        self.labels[ref] = (kind, label)
        return ref

    def results(self, handles: list) -> Iterator[Outcome]:
        pending = list(handles)
        while pending:
            ready, pending = self.ray.wait(pending, num_returns=1)
            kind, label = self.labels[ready[0]]
            try:
                yield Outcome(kind, label, value=self.ray.get(ready[0]))
            except Exception as error:  # noqa: BLE001 - RayTaskError, WorkerCrashedError, OutOfMemoryError, ...
                yield Outcome(kind, label, error=_ray_error(error))


def _with_env(env: dict[str, str], fn: Callable[..., dict], *args: Any) -> dict:
    """Run ``fn`` in a Ray worker with the driver's fault-injection variables."""
    saved = {k: os.environ.get(k) for k in TASK_ENV}
    for k in TASK_ENV:
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        return fn(*args)
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _ray_error(error: Exception) -> str:
    """One line: the task's own exception when Ray wraps one, else Ray's error (worker crash, OOM)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, Exception) and not type(cause).__name__.startswith("Ray"):
        return f"{type(cause).__name__}: {cause}"
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else ''}"


# ---------------------------------------------------------------- the driver

@dataclass
class GridReport:
    """Outcome of a grid run: one ``Outcome`` per cell, and the totals printed in the summary."""

    cells: list[Outcome]
    wall_s: float
    images: int  # images streamed by this run (finished cells that were skipped count 0)

    @property
    def failed(self) -> list[Outcome]:
        return [c for c in self.cells if c.error is not None]

    def summary(self, total: int) -> str:
        done = len(self.cells) - len(self.failed)
        skipped = sum(1 for c in self.cells if c.value and c.value.get("skipped"))
        rate = self.images / self.wall_s if self.wall_s > 0 else 0.0
        return (f"grid: {done} done ({skipped} already finished), {len(self.failed)} failed, "
                f"{total - len(self.cells)} remaining of {total} cells; {self.images} images in {self.wall_s:.1f} s "
                f"({rate:.2f} images/s)")


def run_grid(specs: list[BenchSpec], engine: str = "local", images_per_task: int | None = None,
             address: str | None = None, cpus_per_cell: float = 1.0, gpus_per_cell: float = 0.0,
             retries: int = 1, echo: Callable[[str], None] | None = print) -> GridReport:
    """Run every cell of ``specs`` (see the module docstring); progress lines go to ``echo``."""
    if engine not in ENGINES:
        raise ValueError(f"Unknown engine {engine!r}; accepted: {', '.join(ENGINES)}.")
    if cpus_per_cell <= 0 or gpus_per_cell < 0 or retries < 0:
        raise ValueError("cpus_per_cell must be > 0, gpus_per_cell >= 0 and retries >= 0.")
    echo = echo or (lambda line: None)
    for spec in specs:
        ensure_writable_dir(spec.results_dir, "Results folder")
        if spec.features is None:
            ensure_writable_dir(spec.cache_dir or default_cache_dir(), "Cache folder (--cache-dir)")
    tasks = plan(specs, images_per_task)
    started = time.perf_counter()
    if engine == "local":
        executor = LocalExecutor()
    else:
        executor, own = _ray_executor(address, retries)
    try:
        report = _drive(tasks, executor, {"num_cpus": cpus_per_cell, "num_gpus": gpus_per_cell}, echo, started)
    finally:
        if engine == "ray" and own:
            executor.ray.shutdown()
    echo(report.summary(len(tasks.cells) + len(tasks.missing)))
    return report


def _ray_executor(address: str | None, retries: int) -> tuple[RayExecutor, bool]:
    """A Ray executor on the running Ray (tests, notebooks), the cluster at ``address``, or a new local one."""
    try:
        import ray
    except ImportError:
        raise RuntimeError('--engine ray needs Ray: pip install -e ".[distributed]" (or pip install ray).') from None
    own = not ray.is_initialized()
    if own:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    return RayExecutor(retries), own


def _drive(tasks: Plan, executor, resources: dict, echo: Callable[[str], None], started: float) -> GridReport:
    """Submit the encode tasks, then the cells after them; report each cell as it finishes."""
    light = {"num_cpus": min(1.0, resources["num_cpus"])}  # merging reads and writes files only
    encodes = [executor.submit(encode_task, (spec,), "encode", f"{spec.dataset}/seed{spec.seed} (views)",
                                 resources)
               for spec in tasks.encodes]
    handles = list(encodes)
    for cell in tasks.cells:
        after = () if cell.encode is None else (encodes[cell.encode],)
        if not cell.parts:
            handles.append(executor.submit(cell_task, (cell.spec, cell.label, *after), "cell", cell.label, resources))
            continue
        parts = [executor.submit(part_task, (cell.spec, f"{cell.label}[{a}:{b}]", a, b, *after), "part",
                                 f"{cell.label}[{a}:{b}]", resources) for a, b in cell.parts]
        handles.append(executor.submit(merge_task, (cell.label, *parts), "cell", cell.label, light))
    cells: list[Outcome] = []
    images = 0
    total = len(tasks.cells) + len(tasks.missing)
    for label, error in tasks.missing:
        cells.append(Outcome("cell", label, error=error))
        echo(_line(cells[-1], len(cells), total))
    for outcome in executor.results(handles):
        if outcome.task == "encode":
            if outcome.error is not None:
                echo(f"encode {outcome.label} FAILED: {outcome.error}")
            continue
        cells.append(outcome)
        images += outcome.value["n"] if outcome.value else 0
        echo(_line(outcome, len(cells), total))
    return GridReport(cells, time.perf_counter() - started, images)


def _line(outcome: Outcome, k: int, total: int) -> str:
    """The progress line of one finished (or failed) cell."""
    head = f"[{k}/{total}] {outcome.label}"
    if outcome.error is not None:
        return f"{head} FAILED: {outcome.error}"
    value = outcome.value
    scores = ", ".join(f"{r['dataset']} {r['accuracy']:.2f} % ({r['correct']}/{r['n']})" for r in value["results"])
    state = "already finished" if value["skipped"] else f"{value['n']} images in {value['seconds']:.1f} s"
    return f"{head}: {scores}; {state}"
