"""Check that output folders and files can be written before any work is done (not after an hour of it)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


class NotWritable(ValueError):
    """An output folder or file cannot be created or written."""


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Create the folder ``path`` if needed and prove it writable with a temporary file; ``what`` names it in errors."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotWritable(f"{what} {path} is a file, not a folder; pass another path.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".vlmtta-write-test-"):
            pass
    except OSError as error:
        raise NotWritable(f"{what} {path} cannot be written ({error.strerror or error}); pass another path.") from None
    return path


def ensure_writable_file(path: str | Path, what: str) -> Path:
    """Check that the file ``path`` can be (over)written: its folder is writable and it is not a folder itself."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise NotWritable(f"{what} {path} is a folder, not a file; pass a file path.")
    if path.exists() and not os.access(path, os.W_OK):
        raise NotWritable(f"{what} {path} exists and is read-only; pass another path.")
    ensure_writable_dir(path.parent, f"The folder of {what[:1].lower()}{what[1:]}")
    return path
