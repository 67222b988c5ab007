"""Method protocol, registry, shared entropy helpers and the zero-shot baseline."""
from __future__ import annotations

import math

import pytest
import torch

import vlmtta
from vlmtta.entropy import confident_count, marginal_entropy, marginal_log_probs, select_confident, shannon_entropy
from vlmtta.methods import Context, Method, Need, create_method, get_method_class, register


def test_shannon_entropy_hand_values():
    assert shannon_entropy(torch.zeros(4)).item() == pytest.approx(math.log(4))
    probs = torch.tensor([0.5, 0.25, 0.25])
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert shannon_entropy(probs.log()).item() == pytest.approx(expected)
    assert shannon_entropy(torch.tensor([1000.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)  # no NaN


def test_marginal_entropy_is_entropy_of_mean_probability():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5], [1.0, 1.0, 1.0]])
    mean = logits.softmax(-1).mean(0)
    assert torch.allclose(marginal_log_probs(logits).exp(), mean)
    assert marginal_entropy(logits).item() == pytest.approx(-(mean * mean.log()).sum().item(), rel=1e-6)
    big = torch.tensor([[500.0, -500.0], [-500.0, 500.0]])
    assert marginal_entropy(big).item() == pytest.approx(math.log(2), rel=1e-6)  # stable for huge logits


def test_select_confident():
    logits = torch.tensor([[0.0, 0.0], [5.0, 0.0], [1.0, 0.0], [0.0, 9.0]])
    assert select_confident(logits, 0.5).tolist() == [3, 1]
    assert select_confident(logits, 0.1).tolist() == [3]  # at least one view
    assert select_confident(logits, 0.5, scores=torch.tensor([3.0, 2.0, 1.0, 0.0])).tolist() == [3, 2]
    assert confident_count(64, 0.1) == 6 and confident_count(64, 0.3) == 19
    with pytest.raises(ValueError, match="confidence ratio"):
        confident_count(64, 0.0)


def test_registry_metadata():
    methods = {m["name"]: m for m in vlmtta.list_methods()}
    assert {"zeroshot", "ensemble"} <= set(methods)
    zs = methods["zeroshot"]
    assert zs["protocol"] == "episodic" and zs["needs"] == ["view_features"]
    assert zs["defaults"] == {"n_views": 1, "augmentation": "rrc_flip"} and zs["summary"] and zs["paper"]


def test_registry_errors():
    with pytest.raises(ValueError, match="Unknown method 'zeroshoot'. Did you mean 'zeroshot'"):
        get_method_class("zeroshoot")
    with pytest.raises(ValueError, match="Unknown option\\(s\\) n_veiws for method 'zeroshot'; accepted: n_views=1"):
        create_method("zeroshot", n_veiws=3)
    with pytest.raises(ValueError, match="unknown augmentation 'mixup'"):
        create_method("zeroshot", augmentation="mixup")

    class Clash(Method):
        name = "zeroshot"

    with pytest.raises(ValueError, match="already registered"):
        register(Clash)


def test_custom_method_registers_and_runs(tiny_backbone, rgb_image):
    @register
    class FirstClass(Method):
        name = "test-first-class"
        summary = "always the first class"
        episodic = False

        def predict_features(self, features):
            return torch.eye(len(self.context.classnames))[0]

    adapter = vlmtta.Adapter(["a", "b"], "test-first-class", backbone=tiny_backbone)
    assert adapter.step(rgb_image).label == "a" and adapter.method.protocol == "online"


def test_zeroshot_is_softmax_of_scaled_cosines(tiny_backbone):
    text = torch.nn.functional.normalize(torch.randn(3, tiny_backbone.embed_dim), dim=-1)
    method = create_method("zeroshot")
    method.bind(Context(["a", "b", "c"], ["{}"], text, tiny_backbone.logit_scale, tiny_backbone))
    features = torch.nn.functional.normalize(torch.randn(4, tiny_backbone.embed_dim), dim=-1)
    expected = (tiny_backbone.logit_scale * features @ text.t()).softmax(-1).mean(0)
    assert torch.allclose(method.predict_features(features), expected)
    assert Need.VIEW_FEATURES in method.needs


def test_view_config_follows_hyperparameters(tiny_backbone):
    single = create_method("zeroshot").view_config(tiny_backbone)
    assert (single.n_views, single.policy, single.image_size) == (1, "none", 32)
    many = create_method("zeroshot", n_views=8, augmentation="augmix").view_config(tiny_backbone)
    assert (many.n_views, many.policy) == (8, "augmix")


def test_dataset_defaults_are_overridable():
    class PerDataset(Method):
        name = "test-per-dataset"
        dataset_defaults = {"eurosat": {"n_views": 64, "augmentation": "augmix"}}

    assert PerDataset.options_for("eurosat") == {"n_views": 64, "augmentation": "augmix"}
    assert PerDataset.options_for("eurosat", n_views=8) == {"n_views": 8, "augmentation": "augmix"}
    assert PerDataset.options_for("dtd") == {} and PerDataset.options_for(None, n_views=2) == {"n_views": 2}
