"""Fashion-MNIST (Xiao et al. 2017, MIT licence): an IDX reader, the class names and the shipped test split."""
from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import numpy as np
import torch

CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
TEMPLATES = [
    "a photo of a {}.", "a picture of a {}.", "a {}.", "an image of a {}.", "a photo of the {}.",
    "a black and white photo of a {}.", "a low resolution photo of a {}.", "a product photo of a {}.",
]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_DTYPE = {0x08: np.uint8}


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (``.gz`` or raw) as a numpy array; only unsigned-byte payloads are accepted."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _DTYPE:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()}).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(data, dtype=_DTYPE[data[2]], offset=4 + 4 * ndim)
    if payload.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} ({int(np.prod(shape))} values), file holds {payload.size}.")
    return payload.reshape(shape)


def load_split(split: str = "test", data: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 [N, 28, 28] and labels int64 [N] of ``split`` from folder ``data``.

    ``data=None`` reads the test split shipped with vlmtta (the train split is not shipped:
    pass the folder of the four IDX ``.gz`` files, e.g. ``/usr/share/datasets/fashion-mnist``).
    """
    if split not in _FILES:
        raise ValueError(f"Unknown split {split!r}; accepted: {', '.join(_FILES)}.")
    if data is None:
        if split != "test":
            raise ValueError("Only the test split ships with vlmtta; pass `data=` (a folder of the IDX .gz files).")
        folder = resources.files("vlmtta.testbed").joinpath("data")
    else:
        folder = Path(data).expanduser()
    paths = [folder.joinpath(name) for name in _FILES[split]]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST {split} split not found: {', '.join(missing)}. "
                                "Install it with `apt-get install -y dataset-fashion-mnist` or torchvision.")
    images, labels = (read_idx(Path(str(p))) for p in paths)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise ValueError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not match.")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """Grey uint8 [N, H, W] (or [H, W]) -> uint8 [N, 3, H, W] (or [3, H, W])."""
    return images.unsqueeze(-3).expand(*images.shape[:-2], 3, *images.shape[-2:]).contiguous()


IMAGE_SIZE = 32
MEAN = (0.286, 0.286, 0.286)  # of the 32x32 bicubic-upsampled training images, per channel
STD = (0.353, 0.353, 0.353)


def preprocess(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> normalised float [N, 3, S, S]: the testbed's CLIP preprocess.

    Bicubic (antialiased) resize of the shorter side to S and a center crop, as the original view of
    ``vlmtta.views.make_views``, then per-channel normalisation with ``MEAN``/``STD``.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    resized = TF.center_crop(TF.resize(images, [size], interpolation=InterpolationMode.BICUBIC, antialias=True),
                             [size, size])
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (resized.float().div_(255.0) - mean) / std
