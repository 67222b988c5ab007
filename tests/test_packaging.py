"""A wheel built from the repo works on its own: the prompt data ship inside it."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_prompt_data(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next(wheels.glob("vlmtta-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlmtta/prompt_files/templates.json" in names
    assert "vlmtta/prompt_files/classnames/imagenet.txt" in names
    assert "vlmtta/testbed/model/open_clip_pytorch_model.bin" in names
    assert "vlmtta/testbed/data/t10k-images-idx3-ubyte.gz" in names
    assert "vlmtta/examples/house.png" in names

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    code = ("import vlmtta, vlmtta.prompts as p; print(vlmtta.__file__); "
            "print(len(p.resolve_templates('imagenet80')), len(p.dataset_classnames('sun397')))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True)
    location, counts = result.stdout.strip().splitlines()
    assert location.startswith(str(target)), location  # the wheel's copy, not the repo's
    assert counts == "80 397"
