"""Every released official configuration: the preset's keys, shapes and parameter count equal the release."""

import json

import pytest
import torch

from difflab.convert import check_state_dict, official_to_difflab_key
from difflab.nn.presets import (
    NO_KEY_LISTING,
    PRESETS,
    RELEASED_FLAGS,
    build_network,
    config_from_official_flags,
    family_of,
    get_preset,
)

pytestmark = pytest.mark.usefixtures("single_thread")

NOT_YET = ("karlo/",)  # Karlo's prior / decoder / CLIP: the unCLIP issue


def released(fixtures_dir):
    data = json.loads((fixtures_dir / "released.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith(NOT_YET)}


def test_every_release_has_a_preset(fixtures_dir):
    rel = released(fixtures_dir)
    assert set(rel) == set(RELEASED_FLAGS) - NO_KEY_LISTING
    for name, entry in rel.items():
        assert RELEASED_FLAGS[name] == entry["flags"], name
        assert PRESETS[name] == config_from_official_flags(entry["flags"], family_of(name))


@pytest.mark.parametrize("name", sorted(set(RELEASED_FLAGS) - NO_KEY_LISTING))
def test_release_keys_map_exactly(fixtures_dir, name):
    entry = released(fixtures_dir)[name]
    with torch.device("meta"):
        model = build_network(get_preset(name))
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = {official_to_difflab_key(k): tuple(s) for k, s in entry["keys"]}
    assert len(official) == len(entry["keys"])  # the map is one-to-one
    assert set(official) == set(model_shapes), (sorted(set(official) - set(model_shapes))[:5],
                                                sorted(set(model_shapes) - set(official))[:5])
    assert official == model_shapes
    # and the converter's own check accepts a (meta) state dict with exactly these keys and shapes
    fake = {k: torch.empty(s, device="meta") for k, s in entry["keys"]}
    assert set(check_state_dict(model, fake)) == set(model_shapes)


def test_ddpm_cifar10_matches_paper_size():
    with torch.device("meta"):
        n = sum(p.numel() for p in build_network(get_preset("ddpm-cifar10")).parameters())
    assert n == 35_746_307  # Ho et al. report 35.7M


def test_mnist_presets_sizes_and_run():
    sizes = {}
    for name in ("mnist-tiny", "mnist-small"):
        torch.manual_seed(0)
        net = build_network(get_preset(name))
        sizes[name] = sum(p.numel() for p in net.parameters())
        for hw in ((8, 32) if name == "mnist-tiny" else (32,)):
            with torch.no_grad():
                out = net(torch.randn(2, 1, hw, hw), torch.tensor([3, 900]))
            assert out.shape == (2, 1, hw, hw)
    assert sizes["mnist-tiny"] < 300_000
    assert 1_000_000 <= sizes["mnist-small"] <= 3_000_000


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="unknown preset 'adm-9'.*mnist-tiny"):
        get_preset("adm-9")
