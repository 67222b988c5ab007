"""Embedding caches: in memory on the model's device, and optionally on disk.

Disk entries are written atomically (temporary file + ``os.replace``), loaded with
``weights_only=True``, and checked on load: a file that is unreadable, holds another key or
non-finite values is reported, deleted and rebuilt instead of crashing the run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def cache_key(*parts: Any) -> str:
    """Stable hex digest of JSON-serialisable ``parts`` (order matters, dict keys do not)."""
    payload = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(handle)`` on a temporary file in ``path``'s folder, fsync, then rename it over ``path``.

    Readers see the old file or the complete new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; caches and results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


class EmbeddingCache:
    """Key -> tensor cache kept in memory and, when ``directory`` is set, mirrored on disk."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory else None
        self._memory: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._memory)

    def __contains__(self, key: str) -> bool:
        return key in self._memory or (self.directory is not None and self._path(key).is_file())

    def clear(self) -> None:
        """Forget the in-memory entries (disk entries stay)."""
        self._memory.clear()

    def get_or_compute(self, key: str, compute: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
        """Return the tensor for ``key`` on ``device``, computing and storing it on a miss."""
        tensor = self._memory.get(key)
        if tensor is None:
            tensor = self._load(key)
            if tensor is None:
                tensor = compute().detach()
                self._store(key, tensor)
            tensor = tensor.to(device)
            self._memory[key] = tensor
        return tensor

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def _load(self, key: str) -> torch.Tensor | None:
        if self.directory is None:
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            tensor = entry["tensor"]
            if entry.get("format") != CACHE_FORMAT or entry.get("key") != key:
                raise ValueError("entry holds another key or format")
            if not isinstance(tensor, torch.Tensor) or not torch.isfinite(tensor).all():
                raise ValueError("entry holds no finite tensor")
        except Exception as error:  # noqa: BLE001 - any unreadable entry is rebuilt
            warnings.warn(f"Ignoring corrupt embedding cache file {path} ({error}); rebuilding it.", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        log.debug("embedding cache hit on disk: %s", path)
        return tensor

    def _store(self, key: str, tensor: torch.Tensor) -> None:
        if self.directory is not None:
            atomic_save({"format": CACHE_FORMAT, "key": key, "tensor": tensor.cpu()}, self._path(key))
