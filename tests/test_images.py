"""Image inputs: every accepted type and PIL mode converts; bad input fails with a clear message."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmtta.images import ImageLoadError, load_image


def test_types_agree(rgb_image, tmp_path):
    expected = torch.from_numpy(np.asarray(rgb_image).copy()).permute(2, 0, 1)
    path = tmp_path / "x.png"
    rgb_image.save(path)
    array = np.asarray(rgb_image)
    for image in (path, str(path), rgb_image, array, array.astype(np.float32) / 255,
                  expected, expected.float() / 255, expected[None]):
        out = load_image(image)
        assert out.dtype == torch.uint8 and out.shape == (3, 40, 52)
        assert torch.equal(out, expected), type(image)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_every_mode_converts(rgb_image, mode):
    out = load_image(rgb_image.convert(mode))
    assert out.shape == (3, 40, 52) and out.dtype == torch.uint8


def test_alpha_is_composited_on_white():
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(transparent).eq(255).all()
    half = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    assert load_image(half).unique().tolist() == [127]


def _sixteen_bit(array: np.ndarray) -> Image.Image:
    image = Image.frombytes("I;16", (array.shape[1], array.shape[0]), array.astype("<u2").tobytes())
    assert image.mode == "I;16"
    return image


def test_sixteen_bit_is_rescaled():
    array = np.full((3, 3), 65535, dtype=np.uint16)
    array[0, 0] = 0
    out = load_image(_sixteen_bit(array))
    assert out[:, 0, 0].tolist() == [0, 0, 0] and out[:, 1, 1].tolist() == [255, 255, 255]
    dark = _sixteen_bit(np.full((2, 2), 257, dtype=np.uint16))
    assert load_image(dark).unique().tolist() == [1]  # 257 / 65535 * 255 = 1, not 257 / 255


def test_grayscale_array_and_one_pixel():
    assert load_image(np.zeros((1, 1), dtype=np.uint8)).shape == (3, 1, 1)
    assert load_image(Image.new("RGB", (1, 1), (10, 20, 30)))[:, 0, 0].tolist() == [10, 20, 30]


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.jpg")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, I am text")
    with pytest.raises(ImageLoadError, match="not an image file"):
        load_image(path)


def test_truncated_image(rgb_image, tmp_path):
    path = tmp_path / "broken.jpg"
    rgb_image.resize((200, 200)).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(ImageLoadError, match="corrupt or truncated"):
        load_image(path)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageLoadError, match="Not a file"):
        load_image(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 2), dtype=np.uint8), "1, 3 or 4 channels"),
    (np.zeros((2, 2, 2, 2, 2)), "2 or 3 dimensions"),
    (np.zeros((0, 5, 3), dtype=np.uint8), "empty"),
    (np.full((2, 2), -3.0), "float images must lie in \\[0, 1\\]"),
    (np.full((2, 2), 255.0), "divide 0..255 values by 255"),
    (np.full((2, 2), 300, dtype=np.int64), "must lie in 0..255.*uint16"),
    (torch.full((3, 2, 2), -1, dtype=torch.int32), "must lie in 0..255"),
    (np.array([[object(), 1]], dtype=object), "dtype object"),
    (np.array([["a", "b"]]), "dtype <U1"),
    (np.zeros((2, 2), dtype=np.complex64), "dtype complex64"),
    (torch.zeros(3, 2, 2, dtype=torch.complex64), "complex64"),
    (np.full((2, 2), np.nan), "NaN"),
    (torch.zeros(3, 0, 4, dtype=torch.uint8), "empty"),
    (42, "Cannot use an object of type int"),
])
def test_bad_arrays(bad, message):
    with pytest.raises(ImageLoadError, match=message):
        load_image(bad)


def test_float_range_comes_from_the_dtype_not_the_values():
    """1.0015 is white clipped (the old rule took any max above 1 as 0..255: almost black)."""
    array = np.full((2, 2, 3), 0.5, dtype=np.float32)
    array[0, 0] = 1.0015
    with pytest.warns(UserWarning, match="slightly outside"):
        out = load_image(array)
    assert out[:, 0, 0].tolist() == [255] * 3 and out[:, 1, 1].tolist() == [128] * 3
    with pytest.raises(ImageLoadError, match="float images must lie in"):
        load_image(np.full((2, 2), 1.2))


def test_integer_dtypes_have_fixed_scales():
    dark16 = np.full((2, 2), 200, dtype=np.uint16)  # 16-bit even when every value is below 256
    assert load_image(dark16).unique().tolist() == [1]  # round(200 / 65535 * 255)
    assert load_image(torch.full((2, 2), 200, dtype=torch.int64)).unique().tolist() == [200]
    assert load_image(np.full((2, 2), 7, dtype=np.uint32)).unique().tolist() == [7]
    assert load_image(np.array([[True, False]])).tolist() == [[[255, 0]]] * 3
    big_endian = np.full((2, 2), 65535, dtype=">u2")
    assert load_image(big_endian).unique().tolist() == [255]


def test_pil_float_and_int_modes_are_on_the_l_scale(rgb_image):
    grey = np.asarray(rgb_image.convert("L"))
    for mode in ("I", "F"):
        assert torch.equal(load_image(rgb_image.convert(mode))[0], torch.from_numpy(grey.copy()))
    with pytest.raises(ImageLoadError, match="0..255"):
        load_image(Image.fromarray(np.full((2, 2), 70000, dtype=np.int32), "I"))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    stored = Image.fromarray(np.arange(20 * 40 * 3, dtype=np.uint8).reshape(20, 40, 3) * 7, "RGB")  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / f"photo{suffix}"
    stored.save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    out = load_image(path)
    assert out.shape == (3, 40, 20)  # upright: 20 wide, 40 high
    if suffix == ".png":  # lossless: exactly the rotated pixels
        upright = np.asarray(stored.transpose(Image.Transpose.ROTATE_270))
        assert torch.equal(out, torch.from_numpy(upright.copy()).permute(2, 0, 1))
    opened = Image.open(path)  # a PIL image handed over directly is turned too
    assert load_image(opened).shape == (3, 40, 20)


def test_large_images_are_downscaled_before_views(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "big.png")
    Image.fromarray(array).save(tmp_path / "big.jpg", quality=95)
    for image in (tmp_path / "big.png", tmp_path / "big.jpg", Image.fromarray(array), array,
                  torch.from_numpy(array).permute(2, 0, 1)):
        out = load_image(image, max_pixels=1500)
        assert out.shape == (3, 30, 50), type(image)  # 100x60 scaled by sqrt(1500 / 6000) = 0.5
    assert load_image(array, max_pixels=None).shape == (3, 60, 100)
    assert load_image(array, max_pixels=6000).shape == (3, 60, 100)  # at the cap: untouched
    smooth = np.full((60, 100, 3), 90, dtype=np.uint8)  # a flat image stays flat
    assert load_image(smooth, max_pixels=1500).unique().tolist() == [90]
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(array, max_pixels=0)


def test_decompression_bomb_is_an_unreadable_image(tmp_path, monkeypatch):
    Image.new("RGB", (50, 50)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # bombs: over 2 x 1000 pixels
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")
