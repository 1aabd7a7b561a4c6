"""The mask model shipped beside the demo model (`scripts/train_demo_mask_model.py`, mask-tiny on phantoms): it
follows size requests, and its maps have one piece per organ with paired organs on their side. The default suite
checks one paired request; `-m slow` checks the issue's evidence, Spearman ρ ≥ 0.8 over 20 requests for the liver
and the hepatic tumour (benchmarks/mask_size_control.py measures the same; the tumour is a known failure)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from maisi.maskgen import generate_mask, load_mask_model, postprocess_mask
from maisi.maskgen.checks import organ_components, sides
from maisi.maskgen.context import complete_context, load_condition_table, target_tumor
from maisi.maskgen.sizes import STRUCTURE_IDS
from maisi.networks.weights import demo_model_dir, resolve


@pytest.fixture(scope="module")
def model(one_thread):
    m = load_mask_model(resolve(str(demo_model_dir())))
    assert m is not None and m.conditions is not None, "the demo model ships a mask model and its conditions file"
    return m


def generate(model, name: str, size: float, seed: int) -> np.ndarray:
    table, _ = load_condition_table(model.conditions)
    request = {name: size}
    context = complete_context(request, table)
    raw = generate_mask(model.autoencoder, model.unet, context, model.config, seed=seed,
                        scale_factor=model.scale_factor)[0, 0].numpy().astype(np.uint8)
    return postprocess_mask(raw, target_tumor(context, request))


def volume(label: np.ndarray, name: str) -> int:
    return int((label == STRUCTURE_IDS[name]).sum())


def test_a_larger_liver_request_gives_a_larger_liver_whole_and_on_its_side(model):
    affine = np.diag([model.config.spacing_mm] * 3 + [1.0])
    for seed in (0, 1):
        small, large = generate(model, "liver", 0.1, seed), generate(model, "liver", 0.9, seed)
        assert volume(large, "liver") > 1.05 * volume(small, "liver") > 0
        for m in (small, large):
            assert set(organ_components(m).values()) == {1}
            assert all(sides(m, affine).values())


@pytest.mark.slow  # 40 maps, ~2.5 s each
@pytest.mark.parametrize("name", ["liver", pytest.param("hepatic tumor", marks=pytest.mark.xfail(
    strict=True, reason="issue 17: the phantom mask model draws hepatic tumours of a size that ignores the tumour "
                        "slot (benchmarks/results/mask_size_control.json: rho -0.15)"))])
def test_twenty_requests_and_the_measured_volumes_agree_in_rank(model, name):
    requested = np.linspace(0.025, 0.975, 20)
    volumes = [volume(generate(model, name, float(r), seed), name) for seed, r in enumerate(requested)]
    assert min(volumes) > 0
    assert stats.spearmanr(requested, volumes)[0] >= 0.8
