"""``vlmtta data check``: is each dataset where the readers expect it, complete and readable?"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .catalog import get_spec
from .readers import DatasetNotFound, find_folder, read_split


@dataclass
class CheckReport:
    """What ``check_dataset`` found for one dataset."""

    key: str
    expected: int  # images in the published test split
    folder: str | None = None
    layout: str | None = None
    found: int = 0  # readable images listed by the split
    missing_folders: list[str] = field(default_factory=list)  # dataset folders or index files not found
    missing_files: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def status(self) -> str:
        if self.missing_folders or self.error:
            return "missing"
        if self.missing_files or self.unreadable:
            return "broken"
        return "ok" if self.found == self.expected else "partial"

    def ok(self, allow_partial: bool = False) -> bool:
        return self.status == "ok" or (allow_partial and self.status == "partial")

    def line(self) -> str:
        """One line for the terminal."""
        head = f"{self.key:<{16 if ':' not in self.key else 30}} {self.status:<8} {self.found:>6} / {self.expected:<6}"
        if self.missing_folders or self.error:
            return f"{head} {self.error or 'missing: ' + ', '.join(self.missing_folders)}"
        details = [f"{self.layout} layout at {self.folder}"]
        for label, items in (("missing files", self.missing_files), ("unreadable", self.unreadable)):
            if items:
                details.append(f"{len(items)} {label} (e.g. {items[0]})")
        return f"{head} {'; '.join(details)}"


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except Exception:  # noqa: BLE001 - any decoding failure means unreadable
        return False


def check_dataset(key: str, root: str | Path, splits_dir: str | Path | None = None, decode: bool = True,
                  workers: int = 4) -> CheckReport:
    """Find ``key`` under ``root``, list its test split, and check that every image exists (and decodes)."""
    spec = get_spec(key)
    report = CheckReport(key, spec.test_count)
    try:
        folder, report.layout = find_folder(spec, root)
        report.folder = str(folder)
        split = read_split(key, root, splits_dir)
    except DatasetNotFound as error:
        report.missing_folders.append(str(error))
        return report
    except ValueError as error:
        report.error = str(error)
        return report
    if split.rows is not None:  # .npy rows: the reader checked the arrays' dtype, shape and labels
        report.found = len(split)
        return report
    present = [path for path in split.paths if path.is_file()]
    report.missing_files = [str(path) for path in split.paths if not path.is_file()]
    if decode:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            flags = list(pool.map(_readable, present))
        report.unreadable = [str(path) for path, ok in zip(present, flags) if not ok]
    report.found = len(present) - len(report.unreadable)
    return report
