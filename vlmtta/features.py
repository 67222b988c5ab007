"""View features on disk, and precomputed feature files.

``ViewFeatureCache``: the L2-normalised features of every test view of one dataset, as a
memory-mapped fp16 array ``features.npy`` [N, V, D] next to a per-row written mask ``written.npy``
[N] (uint8) and ``meta.json``.  It lives in ``<cache_dir>/views/<key>/`` where the key hashes the
model identity, pretrained tag, dataset, list of images, view configuration (policy, number of
views, size, normalisation) and seed.  Rows are flushed before their mask, so a killed encoding
resumes with the rows it had finished; ``meta.json`` says ``complete`` once every row is written.

``load_features_file``: the ``--features FILE.pt`` source (see ``FeatureFile``).
"""
from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cache import atomic_write, cache_key
from .images import load_image
from .views import ViewConfig, make_views, view_seed

CACHE_FORMAT = 1


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


class ViewFeatureCache:
    """Memory-mapped [N, V, D] fp16 view features with a per-row written mask (see the module docstring)."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = folder, meta
        self.features = np.load(folder / "features.npy", mmap_mode="r+")
        self.written = np.load(folder / "written.npy", mmap_mode="r+")
        shape = (meta["n"], meta["n_views"], meta["dim"])
        if self.features.shape != shape or self.written.shape != (meta["n"],):
            raise ValueError(f"{folder}: arrays have shapes {self.features.shape}/{self.written.shape}, expected {shape}.")

    @classmethod
    def open(cls, cache_dir: str | Path, parts: dict[str, Any], n: int, n_views: int, dim: int) -> "ViewFeatureCache":
        """Open (or create) the cache for ``parts``; a damaged one is deleted and recreated."""
        folder = Path(cache_dir).expanduser() / "views" / cache_key(parts)[:32]
        meta = read_json(folder / "meta.json")
        expected = {"format": CACHE_FORMAT, "parts": json.loads(json.dumps(parts, default=str)),
                    "n": n, "n_views": n_views, "dim": dim}
        if meta is not None and all(meta.get(k) == v for k, v in expected.items()):
            try:
                return cls(folder, meta)
            except (OSError, ValueError):
                pass
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        np.lib.format.open_memmap(folder / "features.npy", "w+", np.float16, (n, n_views, dim)).flush()
        np.lib.format.open_memmap(folder / "written.npy", "w+", np.uint8, (n,)).flush()
        meta = {**expected, "complete": False, "encode_s": 0.0}
        write_json(folder / "meta.json", meta)
        return cls(folder, meta)

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def missing(self) -> np.ndarray:
        """Indices of the rows not written yet."""
        return np.flatnonzero(self.written == 0)

    def write(self, rows: Sequence[int], features: torch.Tensor) -> None:
        """Store features [B, V, D] of ``rows``; the data is flushed before the rows are marked written."""
        self.features[list(rows)] = features.detach().cpu().to(torch.float16).numpy()
        self.features.flush()
        self.written[list(rows)] = 1
        self.written.flush()

    def finish(self, encode_s: float) -> None:
        """Record the encoding time and mark the cache complete once every row is written."""
        self.meta["encode_s"] = float(self.meta.get("encode_s", 0.0)) + encode_s
        self.meta["complete"] = not self.missing().size
        write_json(self.folder / "meta.json", self.meta)

    def row(self, index: int, n_views: int | None = None) -> torch.Tensor:
        """L2-normalised float32 features [V, D] of one image (the first ``n_views`` views)."""
        if not self.written[index]:
            raise RuntimeError(f"{self.folder}: row {index} has not been encoded yet.")
        return F.normalize(torch.from_numpy(np.array(self.features[index, :n_views], dtype=np.float32)), dim=-1)


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

    todo = cache.missing().tolist()
    if not todo:
        return 0
    per_batch = max(1, batch_views // config.n_views)
    start, done = time.perf_counter(), 0
    bar = tqdm(total=len(todo), desc=f"encode {dataset} ({config.n_views} views)", unit="img", disable=not progress)

    def views_of(i: int) -> torch.Tensor:
        try:
            pixels = load_image(paths[i])
        except ValueError as error:
            raise RuntimeError(f"{dataset}: cannot read {paths[i]} ({error}); run `vlmtta data check`.") from error
        return make_views(pixels.to(backbone.device), config, seed=view_seed(seed, dataset, i))

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
    data = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("image_features", "labels", "text_features") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; expected a dict with image_features [N, D] "
                         "or [N, V, D], labels [N], text_features [C, D], optional classnames and logit_scale.")
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


def _unique(names: list[str]) -> list[str]:
    """Make repeated class names distinct (``name (2)``) so they pass class-list validation; labels are indices."""
    seen: dict[str, int] = {}
    out = []
    for name in map(str, names):
        folded = " ".join(name.split()).casefold()
        seen[folded] = seen.get(folded, 0) + 1
        out.append(name if seen[folded] == 1 else f"{name} ({seen[folded]})")
    return out
