"""The testbed's data side: IDX reader, shipped test split, and corruptions (stream orders: test_streams.py)."""
from __future__ import annotations

import gzip
import struct

import pytest
import torch

from vlmtta.testbed import corruptions as C
from vlmtta.testbed.fashion_mnist import CLASSNAMES, load_split, read_idx, to_rgb


def test_shipped_test_split():
    images, labels = load_split("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [1000] * 10 and len(CLASSNAMES) == 10
    assert labels[:3].tolist() == [9, 2, 1]  # ankle boot, pullover, trouser: the standard file


def test_train_split_is_not_shipped():
    with pytest.raises(ValueError, match="Only the test split"):
        load_split("train")
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_split("train", "/nonexistent")


def test_read_idx_round_trip_and_errors(tmp_path):
    data = bytes(range(24))
    good = tmp_path / "x.gz"
    good.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + data))
    assert read_idx(good).tolist() == torch.arange(24).view(2, 3, 4).tolist()
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x01")
    with pytest.raises(ValueError, match="header says"):
        read_idx(short)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01")
        read_idx(tmp_path / "bad")


def test_to_rgb():
    grey = torch.randint(0, 256, (2, 28, 28), dtype=torch.uint8)
    rgb = to_rgb(grey)
    assert rgb.shape == (2, 3, 28, 28) and torch.equal(rgb[:, 2], grey)
    assert to_rgb(grey[0]).shape == (3, 28, 28)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return load_split("test")[0][:16, None].float() / 255


@pytest.mark.parametrize("name", C.corruption_names())
def test_corruptions_deterministic_in_range_and_monotone(batch, name):
    outs = [C.corrupt(batch, name, severity, seed=3) for severity in range(1, 6)]
    for out in outs:
        assert out.shape == batch.shape and out.dtype == torch.float32
        assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert torch.equal(outs[2], C.corrupt(batch, name, 3, seed=3))
    change = [float((out - batch).abs().mean()) for out in outs]
    assert change[0] > 0.01 and change[4] > change[0]  # corrupts, and severity 5 more than severity 1


def test_random_corruptions_depend_on_seed(batch):
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "motion_blur"):
        assert not torch.equal(C.corrupt(batch, name, 3, seed=0), C.corrupt(batch, name, 3, seed=1))


def test_corrupt_validates(batch):
    assert C.corrupt(batch[0], "contrast", 2).shape == batch[0].shape
    with pytest.raises(ValueError, match="Unknown corruption"):
        C.corrupt(batch, "fog")
    with pytest.raises(ValueError, match="severity"):
        C.corrupt(batch, "contrast", 6)
    with pytest.raises(ValueError, match="float"):
        C.corrupt((batch * 255).to(torch.uint8), "contrast")


def test_testbed_loads_as_an_ordinary_backbone():
    import vlmtta

    backbone = vlmtta.load_backbone("vlmtta-testbed", None, "cpu")
    assert backbone.describe()["model"] == "vlmtta-testbed" and backbone.pretrained == "testbed"
    assert backbone.image_size == 32
