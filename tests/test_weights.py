"""Which weights a backbone runs on: never silently other ones than asked for, and offline fails at once."""
from __future__ import annotations

import socket

import open_clip
import pytest
import torch
from conftest import TINY_CONFIG, write_model_dir

from vlmtta.backbone import FrozenCLIP, WeightsUnavailable, resolve_weights
from vlmtta.cli import main


@pytest.fixture
def image_paths(rgb_image, tmp_path):
    rgb_image.save(tmp_path / "img.png")
    return [str(tmp_path / "img.png")]


def test_architecture_names_take_the_tag():
    assert resolve_weights("ViT-B-16") == ("ViT-B-16", "openai", "openai")  # auto: the default tag
    assert resolve_weights("ViT-B-16", "laion2b_s34b_b88k")[1:] == ("laion2b_s34b_b88k",) * 2
    assert resolve_weights("ViT-B-16", "none") == resolve_weights("ViT-B-16", None) == ("ViT-B-16", None, None)


@pytest.mark.parametrize("model", ["vlmtta-testbed", "hf-hub:org/repo", "LOCAL"])
@pytest.mark.parametrize("pretrained", ["openai", "laion2b_s34b_b88k", "/some/checkpoint.bin"])
def test_a_tag_for_a_model_with_its_own_weights_is_an_error(tiny_model_dir, model, pretrained):
    model = tiny_model_dir if model == "LOCAL" else model
    with pytest.raises(ValueError, match="does not apply to .*carries its own weights"):
        FrozenCLIP(model, pretrained, "cpu")


def test_local_dir_loads_its_weights_file(tiny_model_dir):
    saved = torch.load(tiny_model_dir.split(":", 1)[1] + "/open_clip_pytorch_model.bin", weights_only=True)
    for pretrained in ("auto", None, "none"):  # none: no tag; the folder's file is still the weights
        backbone = FrozenCLIP(tiny_model_dir, pretrained, "cpu")
        assert backbone.pretrained == "open_clip_pytorch_model.bin"
        assert torch.equal(backbone.model.token_embedding.weight, saved["token_embedding.weight"])


def test_local_dir_without_weights_needs_an_explicit_none(tmp_path):
    model = write_model_dir(tmp_path / "no-weights")  # config only
    with pytest.raises(FileNotFoundError, match="holds no weights file.*pretrained='none'"):
        FrozenCLIP(model, device="cpu")
    random = FrozenCLIP(model, "none", "cpu", init_seed=3)
    assert random.pretrained is None and random.describe()["pretrained"] is None  # reported as random weights
    torch.manual_seed(3)
    assert torch.equal(random.model.token_embedding.weight, open_clip.CLIP(**TINY_CONFIG).token_embedding.weight)


def test_testbed_keeps_its_label():
    assert resolve_weights("vlmtta-testbed")[1:] == (None, "testbed")
    assert resolve_weights("vlmtta-testbed", "none")[2] == "testbed"


def test_cli_default_runs_local_dir_and_refuses_a_tag(tiny_model_dir, image_paths, capsys):
    assert main(["predict", image_paths[0], "--classes", "cat,dog", "--model", tiny_model_dir, "--device", "cpu",
                 "--method", "zeroshot"]) == 0
    assert main(["predict", image_paths[0], "--classes", "cat,dog", "--model", tiny_model_dir, "--device", "cpu",
                 "--pretrained", "openai"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not apply" in err[0]


@pytest.fixture
def no_network(monkeypatch):
    """Every name lookup fails at once (as on a machine without network); returns the list of hosts asked for."""
    asked = []

    def fail(host, *args, **kwargs):
        asked.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    return asked


def test_offline_tag_fails_at_once_with_what_to_do(no_network, tmp_path):
    with pytest.raises(WeightsUnavailable, match="no network.*local checkpoint.*vlmtta-testbed"):
        FrozenCLIP("ViT-B-16", "openai", "cpu", weights_dir=str(tmp_path))
    assert no_network == ["huggingface.co"]  # one reachability probe, no download retries


def test_hf_hub_offline_is_honoured_without_any_lookup(no_network, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailable, match="HF_HUB_OFFLINE"):
        FrozenCLIP("ViT-B-16", "openai", "cpu", weights_dir=str(tmp_path))
    assert no_network == []


def test_cli_offline_is_one_line_and_exit_2(no_network, image_paths, capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # an empty weights cache
    assert main(["predict", image_paths[0], "--classes", "cat,dog", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vlmtta-testbed" in err[0]
