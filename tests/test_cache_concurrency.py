"""Several real processes opening, encoding and reading the same view-feature caches at once."""
from __future__ import annotations

import json
import multiprocessing
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmtta.cache import cache_key
from vlmtta.features import ViewFeatureCache

N, V, D = 24, 2, 8
PROCESSES, ROUNDS = 5, 12


def _context():
    """``fork`` where there is one (children start at once, with the modules loaded); else ``spawn``."""
    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def expected_rows(rows) -> torch.Tensor:
    """The features a deterministic fake encoder gives each row (L2-normalised, exact in fp16)."""
    values = torch.stack([torch.randn(V, D, generator=torch.Generator().manual_seed(int(i))) for i in rows])
    return torch.nn.functional.normalize(values, dim=-1).half().float()


def fake_encoder(counter: list[int]):
    def encode(cache: ViewFeatureCache) -> None:
        with cache.lock:
            todo = cache.missing().tolist()
            for start in range(0, len(todo), 5):  # a few batches, with time for the others to interfere
                rows = todo[start:start + 5]
                cache.write(rows, expected_rows(rows))
                counter[0] += len(rows)
                time.sleep(0.002)
            cache.finish(0.0)
    return encode


def parts(round_: int) -> dict:
    return {"stress": round_}


def worker(cache_dir: str, barrier, queue) -> None:
    """Every round: wait for the others, open the round's cache, encode what is missing, read every row."""
    torch.set_num_threads(1)
    encoded, errors = [], []
    for round_ in range(ROUNDS):
        counter = [0]
        barrier.wait()
        try:
            encode = fake_encoder(counter)
            cache = ViewFeatureCache.open(cache_dir, parts(round_), N, V, D, encoder=encode)
            encode(cache)
            got = torch.stack([cache.row(i) for i in range(N)])
            if not torch.allclose(got, expected_rows(range(N)), atol=1e-3):
                errors.append(f"round {round_}: rows differ from the encoder's")
        except BaseException:  # noqa: BLE001 - reported to the parent
            errors.append(f"round {round_}: {traceback.format_exc()}")
        encoded.append(counter[0])
    queue.put((encoded, errors))


def interrupted_creation(cache_dir: Path, round_: int) -> None:
    """What a process killed while creating the cache leaves: a folder with arrays but no meta.json."""
    folder = cache_dir / "views" / cache_key(parts(round_))[:32]
    folder.mkdir(parents=True)
    np.lib.format.open_memmap(folder / "features.npy", "w+", np.float16, (N, V, D)).flush()


def test_processes_share_caches_without_crashes_or_lost_rows(tmp_path):
    for round_ in range(0, ROUNDS, 3):
        interrupted_creation(tmp_path, round_)
    ctx = _context()
    barrier, queue = ctx.Barrier(PROCESSES), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(str(tmp_path), barrier, queue)) for _ in range(PROCESSES)]
    for proc in procs:
        proc.start()
    reports = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    errors = [error for _, errs in reports for error in errs]
    assert not errors, errors[0]
    assert all(proc.exitcode == 0 for proc in procs)
    per_round = np.array([encoded for encoded, _ in reports]).sum(axis=0)
    assert per_round.tolist() == [N] * ROUNDS  # every row encoded exactly once per cache: none lost, none redone
    for round_ in range(ROUNDS):
        folder = tmp_path / "views" / cache_key(parts(round_))[:32]
        meta = json.loads((folder / "meta.json").read_text())
        cache = ViewFeatureCache.open(tmp_path, parts(round_), N, V, D)
        assert meta["complete"] and cache.missing().size == 0 and cache.verify().size == 0


@pytest.mark.parametrize("damage", ["truncate", "nan"])
def test_reader_waits_for_a_repair_in_another_process(tmp_path, damage):
    """A process repairing a damaged cache holds the lock; one that opens it meanwhile waits, then reads good rows."""
    counter = [0]
    cache = ViewFeatureCache.open(tmp_path, parts(0), N, V, D, encoder=fake_encoder(counter))
    fake_encoder(counter)(cache)
    folder = cache.folder
    del cache
    path = folder / "features.npy"
    if damage == "truncate":
        offset, row_bytes = np.load(path, mmap_mode="r").offset, V * D * 2
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
        damaged = N - (path.stat().st_size - offset) // row_bytes
    else:
        array = np.load(folder / "features.npy", mmap_mode="r+")
        array[::3] = np.nan
        array.flush()
        del array
        damaged = len(range(0, N, 3))
    ctx = _context()
    barrier, queue = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_repair_worker, args=(str(tmp_path), barrier, queue)) for _ in range(3)]
    for proc in procs:
        proc.start()
    reports = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [errors for _, errors in reports] == [[]] * 3, reports
    assert sum(encoded for encoded, _ in reports) == damaged  # each damaged row re-encoded once, by one process


def _repair_worker(cache_dir: str, barrier, queue) -> None:
    import warnings

    torch.set_num_threads(1)
    counter, errors = [0], []
    barrier.wait()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            encode = fake_encoder(counter)
            cache = ViewFeatureCache.open(cache_dir, parts(0), N, V, D, encoder=encode)
            got = torch.stack([cache.row(i) for i in range(N)])
        if not torch.allclose(got, expected_rows(range(N)), atol=1e-3):
            errors.append("rows differ from the encoder's")
    except BaseException:  # noqa: BLE001 - reported to the parent
        errors.append(traceback.format_exc())
    queue.put((counter[0], errors))


def _bench_worker(tree: str, model: str, index: int, barrier, queue) -> None:
    from vlmtta import load_backbone
    from vlmtta.bench import BenchSpec, run_bench

    torch.set_num_threads(1)
    try:
        backbone = load_backbone(model, None, "cpu")
        before = backbone.counters["images_encoded"]
        barrier.wait()
        spec = BenchSpec(methods=["zeroshot"], results_dir=Path(tree) / f"results{index}", dataset="eurosat",
                         root=Path(tree) / "data", model=model, pretrained=None, device="cpu",
                         cache_dir=Path(tree) / "cache", progress=False, options={"n_views": 4},
                         augmentation="rrc_flip", batch_views=8)
        result = run_bench(spec)[0]
        queue.put((result["correct"], backbone.counters["images_encoded"] - before, None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((None, None, traceback.format_exc()))


def test_bench_processes_share_one_encoding(tmp_path, tiny_model_dir, tiny_backbone):
    """Four `run_bench` processes on one dataset and cache: the views are encoded once, all scores agree."""
    from test_data_trees import coop_tree

    coop_tree(tmp_path / "data", "eurosat", per_class=3, n_classes=4)
    ctx = _context()
    barrier, queue = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_bench_worker, args=(str(tmp_path), tiny_model_dir, i, barrier, queue))
             for i in range(4)]
    for proc in procs:
        proc.start()
    reports = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert [error for *_, error in reports] == [None] * 4, reports
    assert len({correct for correct, *_ in reports}) == 1
    assert sum(encoded for _, encoded, _ in reports) == 12 * 4  # 12 images x 4 views, encoded by one process
