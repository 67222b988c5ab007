"""Regenerate the demo's example images: ``python -m vlmtta.examples.make [FASHION_MNIST_FOLDER]``.

Three simple scenes are drawn here with PIL (no external source); three Fashion-MNIST test
images (MIT, Zalando SE) are copied unchanged (28x28 grey) from the IDX test split, read
from the folder given (default: Debian's ``dataset-fashion-mnist`` package).
"""
from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_PICKS = {"ankle_boot": 9, "trouser": 1, "bag": 8}  # file stem -> Fashion-MNIST label
SIZE = (320, 240)
SKY, GRASS, SEA, SUN = (135, 196, 235), (88, 160, 70), (40, 100, 170), (250, 210, 60)


def _canvas(ground: tuple[int, int, int], horizon: int = 170) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", SIZE, SKY)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, horizon, SIZE[0], SIZE[1]], fill=ground)
    draw.ellipse([255, 18, 300, 63], fill=SUN)
    return image, draw


def house() -> Image.Image:
    image, draw = _canvas(GRASS)
    draw.rectangle([90, 100, 230, 190], fill=(225, 205, 170), outline=(90, 60, 40), width=2)
    draw.polygon([(75, 102), (160, 40), (245, 102)], fill=(180, 50, 40))
    draw.rectangle([145, 140, 175, 190], fill=(110, 70, 40))
    for x in (105, 192):
        draw.rectangle([x, 118, x + 25, 143], fill=(200, 230, 255), outline=(255, 255, 255), width=3)
    return image


def sailboat() -> Image.Image:
    image, draw = _canvas(SEA, horizon=150)
    for y in range(165, 240, 18):
        draw.arc([20, y, 300, y + 30], 200, 340, fill=(180, 210, 240), width=2)
    draw.polygon([(90, 170), (240, 170), (215, 200), (115, 200)], fill=(120, 70, 35))
    draw.line([(165, 170), (165, 45)], fill=(70, 50, 30), width=4)
    draw.polygon([(170, 50), (170, 162), (240, 162)], fill=(250, 250, 245))
    draw.polygon([(160, 70), (160, 162), (105, 162)], fill=(235, 235, 230))
    return image


def car() -> Image.Image:
    image, draw = _canvas((95, 95, 100), horizon=175)
    draw.rectangle([0, 200, SIZE[0], 206], fill=(240, 240, 240))
    draw.rounded_rectangle([55, 125, 265, 180], radius=14, fill=(200, 30, 40))
    draw.polygon([(100, 127), (125, 88), (205, 88), (232, 127)], fill=(200, 30, 40))
    draw.polygon([(112, 124), (131, 95), (163, 95), (163, 124)], fill=(200, 230, 255))
    draw.polygon([(170, 124), (170, 95), (200, 95), (222, 124)], fill=(200, 230, 255))
    for x in (95, 225):
        draw.ellipse([x - 24, 158, x + 24, 206], fill=(25, 25, 25))
        draw.ellipse([x - 10, 172, x + 10, 192], fill=(170, 170, 170))
    return image


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.open(path, "rb").read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(folder: Path) -> dict[str, Image.Image]:
    """The first test image of each picked class, unchanged."""
    images = _read_idx(folder / "t10k-images-idx3-ubyte.gz")
    labels = _read_idx(folder / "t10k-labels-idx1-ubyte.gz")
    return {stem: Image.fromarray(images[int(np.flatnonzero(labels == label)[0])], "L")
            for stem, label in FASHION_PICKS.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else FASHION_MNIST
    images = {"house": house(), "sailboat": sailboat(), "car": car()}
    if (folder / "t10k-images-idx3-ubyte.gz").is_file():
        images.update({f"fashion_{stem}": image for stem, image in fashion_mnist(folder).items()})
    else:
        print(f"Fashion-MNIST not found in {folder}; drawing the scenes only.", file=sys.stderr)
    for stem, image in images.items():
        image.save(HERE / f"{stem}.png", optimize=True)
        print(HERE / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
