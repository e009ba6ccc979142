"""Weight averaging: weights, plans, and averaged folders that hold exactly the weighted mean."""

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qtraj.averaging import average_checkpoints, averaging_plan, ema_weights, lawa_weights
from qtraj.checkpoints import read_checkpoint_info
from qtraj.config import ConfigError, checkpoints_of, validate_config
from tests.conftest import REPO_ROOT


def test_lawa_is_uniform_and_ema_favours_the_newest():
    assert lawa_weights(4) == [0.25] * 4
    assert ema_weights(3, 0.5) == pytest.approx([1 / 7, 2 / 7, 4 / 7])


def test_plans_name_each_average_after_its_newest_checkpoint():
    steps = ["step000200", "step000400", "step000600", "step000800"]
    plan = averaging_plan({"kind": "lawa", "of": "wsd", "window": 3}, steps)
    assert list(plan) == ["step000600", "step000800"]
    assert plan["step000800"] == ([("wsd", "step000400"), ("wsd", "step000600"), ("wsd", "step000800")],
                                  [pytest.approx(1 / 3)] * 3)
    only_last = averaging_plan({"kind": "lawa", "of": "wsd", "window": 2, "at": ["step000800"]}, steps)
    assert only_last == {"step000800": ([("wsd", "step000600"), ("wsd", "step000800")], [0.5, 0.5])}
    soup = averaging_plan({"kind": "soup", "of": ["a/x", "b/y"]}, [])
    assert soup == {"soup": ([("a", "x"), ("b", "y")], [0.5, 0.5])}


def test_an_averaged_folder_holds_the_weighted_mean(tmp_path, trained_checkpoint):
    import shutil

    from huggingface_hub import save_torch_state_dict

    second = tmp_path / "second"
    shutil.copytree(trained_checkpoint, second)
    original = load_file(str(trained_checkpoint / "model.safetensors"))
    shifted = {key: value + 1.0 for key, value in original.items()}
    (second / "model.safetensors").unlink()
    save_torch_state_dict(shifted, str(second))
    out = tmp_path / "avg"
    info = average_checkpoints([trained_checkpoint, second], [0.25, 0.75], out, "lawa", "step000060")
    averaged = load_file(str(out / "model.safetensors"))
    for key, value in original.items():
        assert torch.allclose(averaged[key], value + 0.75, atol=1e-6), key
    assert (info.run, info.checkpoint, info.source) == ("lawa", "step000060", "averaged")
    assert read_checkpoint_info(out).step == read_checkpoint_info(trained_checkpoint).step


@pytest.fixture
def default_config():
    """The default config, its sharpness on every run: the tests replace its averages, which it names."""
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    config["sharpness"]["runs"] = True
    return config


def test_averages_are_trajectories_checked_against_their_sources(default_config):
    config = copy.deepcopy(default_config)
    config["averages"] = {"wsd-lawa2": {"kind": "lawa", "of": "wsd", "window": 2},
                          "soup": {"kind": "soup", "of": ["wsd/step000800", "wsd-seed1/step000800"]}}
    config = validate_config(config)
    assert checkpoints_of(config, "wsd-lawa2") == [f"step{step:06d}" for step in range(200, 900, 100)]
    assert checkpoints_of(config, "soup") == ["soup"]
    for bad, message in [({"kind": "lawa", "of": "nope"}, "'nope' is not a run or family"),
                         ({"kind": "lawa", "of": "wsd", "window": 9}, "more than the 8 checkpoints"),
                         ({"kind": "lawa", "of": "wsd", "window": 2, "at": ["step000100"]},
                          "'step000100' is not a checkpoint of 'wsd' that a window of 2 can end at"),
                         ({"kind": "soup", "of": ["wsd/step000123", "wsd-seed1/step000800"]}, "is not a checkpoint")]:
        config = copy.deepcopy(default_config)
        config["averages"] = {"avg": bad}
        with pytest.raises(ConfigError, match=message):
            validate_config(config)
