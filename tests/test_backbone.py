"""FrozenCLIP: loading paths, QuickGELU, devices, text truncation and the class-embedding cache."""
from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIG
from vlmtta.backbone import FrozenCLIP, QuickGELUWarning, is_openai_layout_state_dict, resolve_device, wants_quick_gelu
from vlmtta.text import TextTower, encode_tokens

PROMPTS = ["a photo of a cat.", "dog", "a photo of the small tabby cat sitting on a red chair in the sun.",
           "itap of a {}.", "x " * 40]


def test_class_embeddings_formula(tiny_backbone):
    """Per-template normalised, averaged over templates, renormalised: checked against open_clip directly."""
    classes, templates = ["cat", "dog", "bird"], ["a photo of a {}.", "art of the {}.", "{}"]
    got = tiny_backbone.class_embeddings(classes, templates)
    tokens = tiny_backbone.tokenizer([t.format(c) for c in classes for t in templates])
    with torch.no_grad():
        ref = F.normalize(tiny_backbone.model.encode_text(tokens), dim=-1).view(3, 3, -1).mean(1)
    assert torch.allclose(got, F.normalize(ref, dim=-1), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3))


def test_second_call_does_no_text_work(tiny_backbone):
    classes = ["red", "green", "blue"]
    first = tiny_backbone.class_embeddings(classes, "ensemble7")
    encoded = tiny_backbone.counters["texts_encoded"]
    second = tiny_backbone.class_embeddings(classes, "ensemble7")
    assert tiny_backbone.counters["texts_encoded"] == encoded
    assert second is first
    tiny_backbone.class_embeddings(classes, "photo")  # other templates: new work
    assert tiny_backbone.counters["texts_encoded"] == encoded + 3


def test_disk_cache_reused_and_corruption_rebuilt(tiny_model_dir, tmp_path):
    classes = ["apple", "pear"]
    first = FrozenCLIP(tiny_model_dir, None, "cpu", cache_dir=tmp_path)
    expected = first.class_embeddings(classes)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))

    second = FrozenCLIP(tiny_model_dir, None, "cpu", cache_dir=tmp_path)
    assert torch.equal(second.class_embeddings(classes), expected)
    assert second.counters["texts_encoded"] == 0  # loaded from disk

    files[0].write_bytes(b"not a torch file")
    third = FrozenCLIP(tiny_model_dir, None, "cpu", cache_dir=tmp_path)
    with pytest.warns(UserWarning, match="corrupt embedding cache"):
        rebuilt = third.class_embeddings(classes)
    assert torch.allclose(rebuilt, expected) and third.counters["texts_encoded"] == 2
    assert torch.load(files[0], weights_only=True)["tensor"].shape == expected.shape  # valid again


def test_cache_key_depends_on_weights(tiny_model_dir, tmp_path):
    a = FrozenCLIP(tiny_model_dir, None, "cpu")
    with torch.no_grad():
        a.model.token_embedding.weight.mul_(2)
    b = FrozenCLIP(tiny_model_dir, None, "cpu")
    assert a.identity == b.identity  # identity is fixed at load time ...
    c = FrozenCLIP("local-dir:" + tiny_model_dir.split(":", 1)[1], None, "cpu")
    assert c.identity == b.identity  # ... and equal for equal weights
    torch.manual_seed(1)
    other_dir = tmp_path / "other"
    from conftest import write_model_dir
    d = FrozenCLIP(write_model_dir(other_dir, state_dict=open_clip.CLIP(**TINY_CONFIG).state_dict()), None, "cpu")
    assert d.identity != b.identity


@pytest.mark.parametrize("truncate", [True, False])
def test_truncated_text_equals_open_clip(tiny_backbone, truncate):
    tokens = tiny_backbone.tokenizer(PROMPTS)
    with torch.no_grad():
        ref = tiny_backbone.model.encode_text(tokens)
        got = encode_tokens(tiny_backbone.model, tokens, truncate=truncate)
    assert (got - ref).abs().max() <= 1e-5
    tower = TextTower.of(tiny_backbone.model)
    assert tower.causal and tower.needed_length(tokens) == int(tokens.argmax(-1).max()) + 1 < 77


def test_truncated_text_equals_open_clip_vit_b16():
    """The real ViT-B-16 text tower (random weights): truncated context matches open_clip within 1e-5."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    tokens = open_clip.get_tokenizer("ViT-B-16")([f"a photo of a {c}." for c in ("goldfish", "great white shark", "tench")])
    with torch.no_grad():
        diff = (encode_tokens(model, tokens) - model.encode_text(tokens)).abs().max()
    assert diff <= 1e-5


def test_backbone_encode_text_sorted_batches_match(tiny_backbone):
    """Length-sorted, per-batch truncated encoding gives the same rows in the caller's order."""
    ref = tiny_backbone.encode_text(PROMPTS, truncate=False)
    got = tiny_backbone.encode_text(PROMPTS, batch_size=2)
    assert (got - ref).abs().max() <= 1e-5


def test_non_causal_tower_is_not_truncated(tiny_backbone):
    tower = TextTower.of(tiny_backbone.model)
    tower.attn_mask = None
    tokens = tiny_backbone.tokenizer(["a cat"])
    assert not tower.causal and tower.needed_length(tokens) == 77


def test_long_prompt_warns(tiny_backbone):
    with pytest.warns(UserWarning, match="exceed the 77-token text context"):
        tiny_backbone.encode_text(["a photo of a " + "very " * 90 + "long thing."])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_backbone.encode_text(["a photo of a cat."])


def test_local_checkpoint_file_loads_weights(tmp_path):
    config_path = tmp_path / "vlmtta-tiny-ckpt.json"
    config_path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config_path)
    torch.manual_seed(3)
    source = open_clip.CLIP(**TINY_CONFIG)
    checkpoint = tmp_path / "weights.pt"
    torch.save(source.state_dict(), checkpoint)
    backbone = FrozenCLIP("vlmtta-tiny-ckpt", str(checkpoint), "cpu")
    for name, tensor in source.state_dict().items():
        assert torch.equal(backbone.model.state_dict()[name], tensor), name
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert not backbone.model.training


def test_quick_gelu_inference(tmp_path):
    assert wants_quick_gelu("ViT-B-16", "openai")
    assert not wants_quick_gelu("ViT-B-16-quickgelu", "openai")
    assert not wants_quick_gelu("ViT-B-16", "laion2b_s34b_b88k")
    assert not wants_quick_gelu("ViT-B-16", None)
    scripted = tmp_path / "openai_style.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), scripted)
    plain = tmp_path / "state_dict.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    assert wants_quick_gelu("ViT-B-16", str(scripted))
    assert not wants_quick_gelu("ViT-B-16", str(plain))


def test_forced_quick_gelu_builds_quick_gelu(tmp_path):
    config = {**TINY_CONFIG, "quick_gelu": False}
    path = tmp_path / "vlmtta-tiny-gelu.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    assert not FrozenCLIP("vlmtta-tiny-gelu", None, "cpu").quick_gelu
    assert FrozenCLIP("vlmtta-tiny-gelu", None, "cpu", quick_gelu=True).quick_gelu


def test_plain_openai_layout_state_dict_into_gelu_warns_with_the_fix(tmp_path):
    config = {**TINY_CONFIG, "quick_gelu": False}
    (tmp_path / "vlmtta-tiny-gelu-sd.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "vlmtta-tiny-gelu-sd.json")
    (tmp_path / "vlmtta-tiny-qgelu-sd.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(tmp_path / "vlmtta-tiny-qgelu-sd.json")
    state = open_clip.CLIP(**config).state_dict()  # OpenAI's layout: token_embedding, transformer.*, visual.*
    plain, wrapped, other = tmp_path / "openai_sd.pt", tmp_path / "training.pt", tmp_path / "linear.pt"
    torch.save(state, plain)
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    torch.save(torch.nn.Linear(2, 2).state_dict(), other)
    with pytest.warns(QuickGELUWarning, match=r"OpenAI's CLIP layout.*GELU.*quick_gelu=True.*quick_gelu=False") as caught:
        backbone = FrozenCLIP("vlmtta-tiny-gelu-sd", str(plain), "cpu")
    assert len(caught) == 1 and not backbone.quick_gelu
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuickGELUWarning)
        assert FrozenCLIP("vlmtta-tiny-gelu-sd", str(plain), "cpu", quick_gelu=True).quick_gelu  # the fix
        assert not FrozenCLIP("vlmtta-tiny-gelu-sd", str(plain), "cpu", quick_gelu=False).quick_gelu  # a choice
        FrozenCLIP("vlmtta-tiny-gelu-sd", str(wrapped), "cpu")  # an open_clip training checkpoint: its own arch
        FrozenCLIP("vlmtta-tiny-qgelu-sd", str(plain), "cpu")  # the architecture already runs QuickGELU
    assert is_openai_layout_state_dict(str(plain)) and not is_openai_layout_state_dict(str(wrapped))
    assert not is_openai_layout_state_dict(str(other))


def test_random_init_is_seeded():
    a = FrozenCLIP("ViT-B-32", None, "cpu", init_seed=5)
    b = FrozenCLIP("ViT-B-32", None, "cpu", init_seed=5)
    c = FrozenCLIP("ViT-B-32", None, "cpu", init_seed=6)
    assert torch.equal(a.model.text_projection, b.model.text_projection) and a.identity == b.identity
    assert not torch.equal(a.model.text_projection, c.model.text_projection) and a.identity != c.identity


def test_devices():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(ValueError, match="accepted: auto, cpu, cuda, cuda:N, mps"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_unknown_model_and_weights():
    with pytest.raises(ValueError, match="Unknown model architecture 'ViT-B-61'.*ViT-B-16"):
        FrozenCLIP("ViT-B-61", None, "cpu")
    with pytest.raises(ValueError, match="Unknown pretrained weights 'opena1'.*openai"):
        FrozenCLIP("ViT-B-16", "opena1", "cpu")
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        FrozenCLIP("local-dir:/nonexistent/folder", None, "cpu")


def test_precast_weights_are_bit_identical_under_autocast():
    """Weights stored in the autocast dtype give exactly the outputs (and input gradients) of casting them at
    every call; checked with CPU bf16 autocast, the same mechanism FrozenCLIP uses with fp16 on CUDA.  The
    MultiheadAttention fast path (which CUDA autocast disables, CPU autocast does not) is off, as on CUDA."""
    from vlmtta.backbone import precast_autocast_weights

    def build():
        torch.manual_seed(0)
        return _tiny_clip()

    plain, precast = build(), build()
    assert precast_autocast_weights(precast, torch.bfloat16) > 0
    assert precast.visual.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert precast.transformer.get_cast_dtype() == torch.float32  # the residual stream keeps its precision
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.tokenize(["a photo of a cat.", "a dog"])
    outputs, fastpath = [], torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for model in (plain, precast):
            tower = TextTower.of(model)
            embedded = tower.embed(tokens).detach().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                image = model.encode_image(images)
                text = tower.forward_embeddings(embedded, tower.pool_positions(tokens))
            (grad,) = torch.autograd.grad(text.float().square().sum(), embedded)
            outputs.append((image, text, grad))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    for a, b in zip(*outputs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _tiny_clip() -> torch.nn.Module:
    model = open_clip.CLIP(embed_dim=TINY_CONFIG["embed_dim"], vision_cfg=TINY_CONFIG["vision_cfg"],
                           text_cfg=TINY_CONFIG["text_cfg"])
    return model.eval().requires_grad_(False)
