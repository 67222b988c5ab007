"""View features on disk, and precomputed feature files.

``ViewFeatureCache``: the L2-normalised features of every test view of one dataset, as a
memory-mapped fp16 array ``features.npy`` [N, V, D] next to a per-row index ``written.npy`` [N]
(uint64: 0 for a row not written yet, else ``2**32 + CRC-32`` of the row's bytes) and ``meta.json``.
It lives in ``<cache_dir>/views/<key>/`` where the key hashes the model identity, pretrained tag,
dataset, list of images, view configuration (policy, number of views, size, normalisation) and seed.
Rows are flushed before their index entry, so a killed encoding resumes with the rows it had finished.

Damage is detected, never used: opening checks ``meta.json`` and both arrays' headers and sizes (a
cache whose headers or settings are wrong is rebuilt; a lost ``meta.json`` is rewritten and an array
of the wrong size resized, then every row is checked), and every row is checked against its checksum
(and for finiteness) as it is read.  Damaged rows are re-encoded, with a warning.  Processes share a
cache through a file lock (``<key>.lock`` next to the folder): opening, encoding and repairing hold
it; reading written rows does not need it.

``load_features_file``: the ``--features FILE.pt`` source (see ``FeatureFile``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock, Timeout

from .cache import CorruptFileError, atomic_write, cache_key, load_torch_file
from .images import load_image
from .views import ViewConfig, make_views, view_seed

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: written.npy holds per-row CRC-32 checksums
_WRITTEN = 1 << 32  # marks a written row in ``written.npy``; the low 32 bits hold the row's CRC-32


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (see ``vlmtta.cache.atomic_write``)."""
    text = json.dumps(obj, indent=2, default=str) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def read_json(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or ``None`` when the file is absent or unreadable."""
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _npy_problem(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str | None, int]:
    """What is wrong with the ``.npy`` file's header (``None`` if nothing) and its expected size in bytes."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            found_shape, fortran, found_dtype = read_header(handle)
            offset = handle.tell()
    except (OSError, ValueError, SyntaxError, TypeError) as error:
        return f"{path.name}: unreadable header ({error})", 0
    if found_shape != shape or found_dtype != dtype or fortran:
        return f"{path.name}: holds {found_dtype} {found_shape}, expected {np.dtype(dtype)} {shape}", 0
    return None, offset + int(np.prod(shape)) * np.dtype(dtype).itemsize


def row_checksum(row: np.ndarray) -> int:
    """The ``written.npy`` entry of a row: ``2**32 + CRC-32`` of its bytes."""
    return _WRITTEN | zlib.crc32(np.ascontiguousarray(row))


class ViewFeatureCache:
    """Memory-mapped [N, V, D] fp16 view features with per-row checksums (see the module docstring).

    ``encoder(cache)`` encodes the rows ``missing()`` says are not written; the cache calls it to rebuild rows
    it finds damaged while they are read (without one, a damaged row is an error).
    """

    def __init__(self, folder: Path, meta: dict, lock: FileLock,
                 encoder: Callable[["ViewFeatureCache"], Any] | None = None):
        self.folder, self.meta, self.lock, self.encoder = folder, meta, lock, encoder
        self.features = np.load(folder / "features.npy", mmap_mode="r+")
        self.written = np.load(folder / "written.npy", mmap_mode="r+")

    @classmethod
    def open(cls, cache_dir: str | Path, parts: dict[str, Any], n: int, n_views: int, dim: int,
             encoder: Callable[["ViewFeatureCache"], Any] | None = None) -> "ViewFeatureCache":
        """Open (or create) the cache for ``parts``: a damaged one is repaired or rebuilt, with a warning."""
        folder = Path(cache_dir).expanduser() / "views" / cache_key(parts)[:32]
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder.with_suffix(".lock"))
        expected = {"format": CACHE_FORMAT, "parts": json.loads(json.dumps(parts, default=str)),
                    "n": n, "n_views": n_views, "dim": dim}
        with _locked(lock, folder):
            if folder.exists():
                meta = read_json(folder / "meta.json")
                problem, repaired = _structure_problem(folder, meta, expected)
                if problem is None:
                    return cls._reopen(folder, meta or _new_meta(folder, expected), lock, encoder, repaired)
                warnings.warn(f"View-feature cache {folder} cannot be used ({problem}); rebuilding it.", stacklevel=2)
                shutil.rmtree(folder)
            folder.mkdir()
            np.lib.format.open_memmap(folder / "features.npy", "w+", np.float16, (n, n_views, dim)).flush()
            np.lib.format.open_memmap(folder / "written.npy", "w+", np.uint64, (n,)).flush()
            return cls(folder, _new_meta(folder, expected), lock, encoder)

    @classmethod
    def _reopen(cls, folder: Path, meta: dict, lock: FileLock, encoder: Callable[["ViewFeatureCache"], Any] | None,
                repaired: list[str]) -> "ViewFeatureCache":
        """An existing cache; after a repair of its files, every row is checked against its checksum."""
        cache = cls(folder, meta, lock, encoder)
        if repaired:
            bad = cache.verify()
            cache.finish(0.0)  # records whether it is still complete
            warnings.warn(f"View-feature cache {folder}: repaired {', '.join(repaired)}; {bad.size} row(s) failed "
                          f"their checksum, {cache.missing().size} will be (re-)encoded.", stacklevel=3)
        elif cache.complete and cache.missing().size:
            warnings.warn(f"View-feature cache {folder} says complete but {cache.missing().size} row(s) are not "
                          "marked written; re-encoding them.", stacklevel=3)
        return cache

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def missing(self) -> np.ndarray:
        """Indices of the rows not written yet (or whose index entry is not a written mark)."""
        return np.flatnonzero((self.written >> 32) != 1)

    def write(self, rows: Sequence[int], features: torch.Tensor) -> None:
        """Store features [B, V, D] of ``rows``; the data is flushed before the rows are marked written."""
        values = features.detach().cpu().to(torch.float16).numpy()
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not finite.all():
            bad = [rows[i] for i in np.flatnonzero(~finite)]
            raise RuntimeError(f"The model produced non-finite features for image(s) {bad[:5]}; nothing was cached "
                               "for them.")
        with _locked(self.lock, self.folder):
            self.features[list(rows)] = values
            self.features.flush()
            self.written[list(rows)] = [row_checksum(row) for row in values]
            self.written.flush()

    def finish(self, encode_s: float) -> None:
        """Record the encoding time and mark the cache complete once every row is written."""
        self.meta["encode_s"] = float(self.meta.get("encode_s", 0.0)) + encode_s
        self.meta["complete"] = not self.missing().size
        write_json(self.folder / "meta.json", self.meta)

    def verify(self, chunk: int = 256) -> np.ndarray:
        """Check every written row against its checksum; unmark (so re-encode) and return the damaged ones."""
        bad = []
        with _locked(self.lock, self.folder):
            for start in range(0, len(self.written), chunk):
                flags = np.array(self.written[start:start + chunk])
                data = np.array(self.features[start:start + chunk])
                bad += [start + i for i, flag in enumerate(flags.tolist())
                        if flag != 0 and flag != row_checksum(data[i])]
            if bad:
                self.written[bad] = 0
                self.written.flush()
        return np.asarray(bad, dtype=np.int64)

    def row(self, index: int, n_views: int | None = None) -> torch.Tensor:
        """L2-normalised float32 features [V, D] of one image (the first ``n_views`` views).

        The row is checked against its checksum and for finiteness; a damaged or missing row is re-encoded
        with ``encoder`` (every damaged row at once, with a warning).
        """
        data = np.array(self.features[index])
        if int(self.written[index]) != row_checksum(data):
            data = self._rebuild(index)
        values = data[:n_views].astype(np.float32)
        if not np.isfinite(values.sum()):  # a sum of fp16 values is finite iff they all are; implied by the checksum
            raise CorruptFileError(f"{self.folder}: row {index} holds non-finite features.")
        return F.normalize(torch.from_numpy(values), dim=-1)

    def _rebuild(self, index: int) -> np.ndarray:
        with _locked(self.lock, self.folder):
            data = np.array(self.features[index])
            if int(self.written[index]) == row_checksum(data):
                return data  # another process repaired it meanwhile
            bad = self.verify()
            if bad.size:
                warnings.warn(f"View-feature cache {self.folder}: {bad.size} damaged row(s) (first: "
                              f"{bad[:5].tolist()}) failed their checksum; re-encoding them.", stacklevel=3)
            if self.encoder is None:
                raise CorruptFileError(f"{self.folder}: row {index} is damaged or missing and this cache has no "
                                       "encoder to rebuild it; delete the folder or re-run the encoding.")
            self.encoder(self)
            data = np.array(self.features[index])
            if int(self.written[index]) != row_checksum(data):
                raise CorruptFileError(f"{self.folder}: row {index} still fails its checksum after re-encoding "
                                       "(is another program writing to the cache?).")
            return data


def _new_meta(folder: Path, expected: dict) -> dict:
    """Write a fresh ``meta.json`` (last when creating: a folder without one is an unfinished creation)."""
    meta = {**expected, "complete": False, "encode_s": 0.0}
    write_json(folder / "meta.json", meta)
    return meta


def _structure_problem(folder: Path, meta: dict | None, expected: dict) -> tuple[str | None, list[str]]:
    """Why the cache in ``folder`` must be rebuilt (``None`` if it need not), and what was repaired in place.

    A missing or unreadable ``meta.json`` is rewritten (the folder name is the hash of its contents) and an
    array of the wrong size is truncated or zero-extended to fit; the row checksums then tell which rows survive.
    """
    repaired = [] if isinstance(meta, dict) else ["meta.json (missing or unreadable)"]
    if isinstance(meta, dict) and meta.get("format") != CACHE_FORMAT:
        return f"written in cache format {meta.get('format')}; this version reads format {CACHE_FORMAT}", []
    wrong = [key for key, value in expected.items() if isinstance(meta, dict) and meta.get(key) != value]
    if wrong:
        return f"meta.json: {', '.join(wrong)} differ from this run's (cache format {meta.get('format')})", []
    arrays = {"features.npy": (np.float16, (expected["n"], expected["n_views"], expected["dim"])),
              "written.npy": (np.uint64, (expected["n"],))}
    for name, (dtype, shape) in arrays.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing", []
        problem, size = _npy_problem(path, np.dtype(dtype), shape)
        if problem is not None:
            return problem, []
        found = path.stat().st_size
        if found != size:  # truncated (zero-extended here: those rows fail their checksum) or extended
            with open(path, "r+b") as handle:
                handle.truncate(size)
            repaired.append(f"{name} ({found} bytes, expected {size})")
    return None, repaired


@contextlib.contextmanager
def _locked(lock: FileLock, folder: Path) -> Iterator[None]:
    """Hold ``lock``, saying so when another process holds it first."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("Waiting for another process using the view-feature cache %s ...", folder)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def view_cache_parts(backbone, dataset: str, paths: Sequence[str], config: ViewConfig, seed: int) -> dict[str, Any]:
    """What the cached features depend on."""
    return {"model": backbone.model_name, "pretrained": backbone.pretrained, "identity": backbone.identity,
            "dataset": dataset, "images": cache_key(list(paths))[:16], "n_images": len(paths),
            "views": asdict(config), "seed": int(seed)}


def encode_missing(cache: ViewFeatureCache, paths: Sequence[Path], backbone, config: ViewConfig, dataset: str,
                   seed: int, batch_views: int = 256, workers: int = 2, progress: bool = True,
                   on_rows: Callable[[int], None] | None = None) -> int:
    """Encode the views of every image whose row is missing; returns how many images were encoded.

    Views of image ``i`` come from ``make_views(image, config, view_seed(seed, dataset, i))``, so they are the
    same for every method and every run.  ``on_rows(n_done)`` is called after each written batch (tests use it
    to inject a failure).
    """
    from tqdm.auto import tqdm

    per_batch = max(1, batch_views // config.n_views)

    def views_of(i: int) -> torch.Tensor:
        try:
            pixels = load_image(paths[i])
        except ValueError as error:
            raise RuntimeError(f"{dataset}: cannot read {paths[i]} ({error}); run `vlmtta data check`.") from error
        return make_views(pixels.to(backbone.device), config, seed=view_seed(seed, dataset, i))

    with _locked(cache.lock, cache.folder):  # another process waits here, then finds the rows written
        todo = cache.missing().tolist()
        if not todo:
            return 0
        start, done = time.perf_counter(), 0
        bar = tqdm(total=len(todo), desc=f"encode {dataset} ({config.n_views} views)", unit="img",
                   disable=not progress)
        try:
            with ThreadPoolExecutor(max(1, workers)) as pool:
                for first in range(0, len(todo), per_batch):
                    rows = todo[first:first + per_batch]
                    views = torch.cat(list(pool.map(views_of, rows)))
                    cache.write(rows, backbone.encode_images(views).view(len(rows), config.n_views, -1))
                    done += len(rows)
                    bar.update(len(rows))
                    if on_rows is not None:
                        on_rows(done)
        finally:
            bar.close()
            cache.finish(time.perf_counter() - start)
    return done


@dataclass
class FeatureFile:
    """A precomputed-features source: ``torch.load(path)`` gives a dict with

    ``image_features`` [N, D] (or [N, V, D], view 0 = original), ``labels`` [N] (int), ``text_features``
    [C, D]; optional ``classnames`` (C names; default ``class_0``..) and ``logit_scale`` (default 100).
    fp16 or fp32, L2-normalised or not (features are normalised here).  Samples are used in file order.
    """

    path: Path
    image_features: torch.Tensor  # [N, V, D] as stored
    labels: torch.Tensor  # [N] int64
    text_features: torch.Tensor  # [C, D] float32, L2-normalised
    classnames: list[str]
    logit_scale: float
    dtype: torch.dtype = torch.float32  # precision the embeddings were stored in

    def __len__(self) -> int:
        return self.image_features.shape[0]

    @property
    def n_views(self) -> int:
        return self.image_features.shape[1]

    def row(self, index: int, n_views: int | None = None) -> torch.Tensor:
        return F.normalize(self.image_features[index, :n_views].float(), dim=-1)


def load_features_file(path: str | Path) -> FeatureFile:
    """Load and validate a ``--features`` file (see ``FeatureFile``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Features file {path} does not exist.")
    data = load_torch_file(path, "features file")
    missing = [k for k in ("image_features", "labels", "text_features") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; expected a dict with image_features [N, D] "
                         "or [N, V, D], labels [N], text_features [C, D], optional classnames and logit_scale.")
    for key in ("image_features", "text_features", "labels"):
        _check_values(path, key, data[key])
    image, labels, text = data["image_features"], torch.as_tensor(data["labels"]).long(), data["text_features"]
    if image.ndim == 2:
        image = image[:, None]
    if image.ndim != 3 or labels.shape != (image.shape[0],) or text.ndim != 2 or text.shape[1] != image.shape[-1]:
        raise ValueError(f"{path}: shapes image_features {tuple(data['image_features'].shape)}, labels "
                         f"{tuple(labels.shape)}, text_features {tuple(text.shape)} do not fit [N, (V,) D], [N], [C, D].")
    n_classes = text.shape[0]
    if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < n_classes:
        raise ValueError(f"{path}: labels must lie in 0..{n_classes - 1}.")
    names = list(data.get("classnames") or [f"class_{k}" for k in range(n_classes)])
    if len(names) != n_classes:
        raise ValueError(f"{path}: {len(names)} classnames for {n_classes} text features.")
    dtype = torch.float16 if image.dtype == torch.float16 and text.dtype == torch.float16 else torch.float32
    return FeatureFile(path, image, labels, F.normalize(text.float(), dim=-1), _unique(names),
                       float(data.get("logit_scale", 100.0)), dtype)


def _check_values(path: Path, key: str, values: Any) -> None:
    """Refuse non-tensors, non-finite values and all-zero feature rows (a zero-filled or damaged file)."""
    if not isinstance(values, torch.Tensor):
        if key == "labels" and isinstance(values, (list, tuple)):
            return
        raise CorruptFileError(f"{path}: {key} is a {type(values).__name__}, expected a tensor.")
    if values.numel() == 0:
        return  # nothing to damage; an empty source is refused where it is streamed
    if values.is_floating_point():
        bad = ~torch.isfinite(values.reshape(values.shape[0] if values.ndim else 1, -1)).all(dim=-1)
        if bad.any():
            raise CorruptFileError(f"{path}: {key} holds non-finite values in {int(bad.sum())} row(s) (first: "
                                   f"{bad.nonzero().flatten()[:5].tolist()}).")
    if key != "labels" and values.ndim >= 2:
        zero = (values.reshape(-1, values.shape[-1]) == 0).all(dim=-1)
        if zero.any():
            raise CorruptFileError(f"{path}: {key} holds {int(zero.sum())} all-zero feature vector(s), which no "
                                   "encoder produces (zero-filled or damaged file).")


def _unique(names: list[str]) -> list[str]:
    """Make repeated class names distinct (``name (2)``) so they pass class-list validation; labels are indices."""
    seen: dict[str, int] = {}
    out = []
    for name in map(str, names):
        folded = " ".join(name.split()).casefold()
        seen[folded] = seen.get(folded, 0) + 1
        out.append(name if seen[folded] == 1 else f"{name} ({seen[folded]})")
    return out
