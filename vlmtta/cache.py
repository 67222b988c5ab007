"""Embedding caches: in memory on the model's device, and optionally on disk.

Disk entries are written atomically (temporary file + ``os.replace``) with a SHA-256 of the tensor's
bytes, loaded with ``weights_only=True``, and checked on load: a file that is unreadable, holds another
key, fails its checksum (``torch.load`` does not check the bytes it reads) or holds non-finite values is
reported, deleted and rebuilt instead of crashing the run or being used.

``load_torch_file`` is the one place other ``.pt`` files (features files, learned contexts) are read:
``weights_only=True``, and any failure (truncated, garbage, a pickle that is not plain tensors) becomes
one ``CorruptFileError`` line.
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

CACHE_FORMAT = 2  # 2: entries carry the SHA-256 of their tensor


class CorruptFileError(ValueError):
    """A file that cannot be used: damaged, truncated, not what it should hold, or unsafe to unpickle."""


def one_line(error: BaseException, limit: int = 240) -> str:
    """``Type: first sentence of the message`` on one line (at most ``limit`` characters), for error reports."""
    text = str(error)
    if text.startswith("Weights only load failed"):  # torch's refusal: keep its reason, not its advice
        lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in text.splitlines()[1:]]
        text = "refused by the weights-only unpickler: " + " ".join(
            line for line in lines if line and not line.startswith(("Please file", "Check the documentation")))
    text = " ".join(text.split())
    text = text[:text.index(". ") + 1] if ". " in text else text
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_torch_file(path: str | Path, what: str = "torch file") -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU; any failure but a missing file is a CorruptFileError."""
    try:
        with warnings.catch_warnings():  # a hostile pickle's protocol is no news once it is refused
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # noqa: BLE001 - unpickling damaged bytes raises errors of many types
        hint = "" if isinstance(error, OSError) else " (damaged, truncated, or not plain tensors saved by torch.save)"
        raise CorruptFileError(f"Cannot load {what} {path}: {one_line(error)}{hint}.") from error


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode() + flat.tobytes()).hexdigest()


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
            entry = load_torch_file(path, "embedding cache file")
            if isinstance(entry, dict) and entry.get("format") in range(1, CACHE_FORMAT):
                log.info("rebuilding embedding cache file %s of cache format %s", path, entry["format"])
                return None  # an older version's entry: replaced on store
            if not isinstance(entry, dict) or entry.get("format") != CACHE_FORMAT or entry.get("key") != key:
                raise ValueError("entry holds another key or format")
            tensor = entry.get("tensor")
            if not isinstance(tensor, torch.Tensor) or entry.get("sha256") != tensor_digest(tensor):
                raise ValueError("tensor fails its checksum")
            if not torch.isfinite(tensor).all():
                raise ValueError("entry holds non-finite values")
        except ValueError as error:  # CorruptFileError included: any unusable entry is rebuilt
            warnings.warn(f"Ignoring corrupt embedding cache file {path} ({error}); rebuilding it.", stacklevel=3)
            path.unlink(missing_ok=True)
            return None
        log.debug("embedding cache hit on disk: %s", path)
        return tensor

    def _store(self, key: str, tensor: torch.Tensor) -> None:
        if self.directory is not None:
            tensor = tensor.cpu()
            atomic_save({"format": CACHE_FORMAT, "key": key, "tensor": tensor, "sha256": tensor_digest(tensor)},
                        self._path(key))
