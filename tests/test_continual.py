"""The continual-corruption stream: without reset the adapted state carries across domains; the reset policies
restore it (per domain) or never keep it (per batch, which makes Tent's pre-step output exactly zero-shot)."""
from __future__ import annotations

import pytest

import vlmtta
from vlmtta.testbed.continual import format_continual, run_continual
from vlmtta.testbed.corruptions import corruption_names


@pytest.fixture(scope="module")
def testbed():
    return vlmtta.load_backbone("vlmtta-testbed", device="cpu")


def test_reset_policies_on_the_continual_stream(testbed):
    result = run_continual(["zeroshot", "tent"], severity=5, n_per_corruption=12, batch_size=4,
                           options={"tent": {"lr": 0.5}}, backbone=testbed)
    assert list(result.accuracy) == ["zeroshot", "tent/batch", "tent/domain", "tent/continual"]
    zeroshot, batch = result.accuracy["zeroshot"], result.accuracy["tent/batch"]
    continual, domain = result.accuracy["tent/continual"], result.accuracy["tent/domain"]
    assert list(continual) == corruption_names()
    assert batch == zeroshot  # reset before every batch: Tent returns the pre-step (zero-shot) prediction
    first = corruption_names()[0]
    assert continual[first] == domain[first]  # same start
    assert continual != domain  # the unreset state carries over and changes later domains
    assert result.protocol["methods"]["tent/continual"]["hyperparameters"]["reset"] == "continual"
    assert result.protocol["batch_size"] == 4 and result.protocol["images_per_corruption"] == 12
    table = format_continual(result)
    assert table.splitlines()[0].startswith("| method/reset | gaussian_noise") and "tent/domain" in table
    with pytest.raises(ValueError, match="reset policies"):
        run_continual(["tent"], policies=["sometimes"], backbone=testbed)
