"""The ResNet presets: the tutorial's parameter count, and our compact one's budget."""
import pytest

pytest.importorskip("keras", reason="training layer: needs the [train] extra")
pytestmark = pytest.mark.train

from malaria_edge.train.model import PRESETS, build_resnet, count_macs


def test_seed_preset_is_the_tutorials_resnet():
    model = build_resnet(PRESETS["seed"])
    assert model.count_params() == 2_163_918
    assert model.input_shape == (None, 64, 64, 3) and model.output_shape == (None, 2)


def test_edge_preset_is_small_enough_for_the_field():
    model = build_resnet(PRESETS["edge"])
    seed = build_resnet(PRESETS["seed"])
    assert model.count_params() < 300_000  # int8 well under 1 MB
    assert count_macs(model) * 20 < count_macs(seed)
    assert model.output_shape == (None, 1)
