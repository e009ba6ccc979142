"""Cooldowns branched from stable-phase checkpoints: resumed training, config checks, the planned DAG."""

import copy

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qtraj.checkpoints import TRAINING_STATE_FILE, read_checkpoint_info
from qtraj.config import ConfigError, checkpoints_of, data_source, trajectories, validate_config
from qtraj.schedules import Schedule
from qtraj.sources.averages import averaging_plan_of
from qtraj.training import TrainingSpec, cool_down, train
from tests.conftest import REPO_ROOT, TINY_MODEL


def _spec(run="wsd"):
    # 40 steps, warmup 2, decay over the last 10 (from step 30)
    return TrainingSpec(run=run, model=TINY_MODEL, schedule=Schedule("wsd", 3e-3, 40, 2, decay_fraction=0.25),
                        seq_len=32, batch_size=4, weight_decay=0.1, grad_clip=1.0, seed=3)


@pytest.fixture(scope="module")
def wsd_run(tmp_path_factory, tokenizer_dir, token_stream):
    out = tmp_path_factory.mktemp("wsd")
    dirs = {20: out / "step000020", 30: out / "step000030", 40: out / "step000040"}
    rows = train(_spec(), token_stream, tokenizer_dir, dirs, resume_steps=[20, 30])
    return dirs, rows


def test_branch_points_carry_training_state_and_other_checkpoints_do_not(wsd_run):
    dirs, _ = wsd_run
    assert (dirs[20] / TRAINING_STATE_FILE).is_file() and (dirs[30] / TRAINING_STATE_FILE).is_file()
    assert not (dirs[40] / TRAINING_STATE_FILE).exists()


def test_cooldown_from_the_decay_start_repeats_the_runs_own_decay(wsd_run, token_stream, tmp_path):
    """Branching where WSD starts decaying, with the same length and shape, must give the run's last checkpoint:
    weights, AdamW moments and data order all resumed exactly."""
    dirs, rows = wsd_run
    out = tmp_path / "step000040"
    log = cool_down(_spec("wsd-cooldown"), dirs[30], token_stream, length=10, shape="linear", final_lr=0.0,
                    out_dir=out)
    resumed, original = load_file(str(out / "model.safetensors")), load_file(str(dirs[40] / "model.safetensors"))
    assert resumed.keys() == original.keys()
    for key in original:
        torch.testing.assert_close(resumed[key], original[key], rtol=0, atol=1e-6)
    info = read_checkpoint_info(out)
    assert (info.run, info.step, info.phase, info.source) == ("wsd-cooldown", 40, "decay", "cooldown")
    assert (info.parent_run, info.parent_checkpoint) == ("wsd", "step000030") and info.lr == 0.0
    assert not (out / TRAINING_STATE_FILE).exists()
    assert [row["step"] for row in log][0] == 31 and log[-1]["lr"] == 0.0
    assert log[-1]["train_loss"] == pytest.approx(next(row for row in rows if row["step"] == 40)["train_loss"])


def test_a_constant_branch_from_the_decay_start_is_the_constant_lr_run_of_the_same_seed(wsd_run, token_stream,
                                                                                      tokenizer_dir, tmp_path):
    """The default's control: WSD continued at its peak LR from the decay start must be the constant-LR run trained
    from scratch with the same seed (same init, data order and LR up to the branch), without its first steps."""
    dirs, _ = wsd_run
    branch = tmp_path / "branch" / "step000040"
    log = cool_down(_spec("constant"), dirs[30], token_stream, length=10, shape="constant", final_lr=0.0,
                    out_dir=branch)
    scratch = tmp_path / "scratch" / "step000040"
    constant = TrainingSpec(run="constant", model=TINY_MODEL, schedule=Schedule("constant", 3e-3, 40, 2),
                            seq_len=32, batch_size=4, weight_decay=0.1, grad_clip=1.0, seed=3)
    rows = train(constant, token_stream, tokenizer_dir, {40: scratch})
    branched, trained = load_file(str(branch / "model.safetensors")), load_file(str(scratch / "model.safetensors"))
    for key in trained:
        torch.testing.assert_close(branched[key], trained[key], rtol=0, atol=1e-6)
    assert {row["lr"] for row in log} == {3e-3}
    assert [row["train_loss"] for row in log] == pytest.approx([row["train_loss"] for row in rows[-10:]])
    info = read_checkpoint_info(branch)
    assert (info.step, info.phase, info.source, info.lr) == (40, "stable", "cooldown", 3e-3)


def test_an_earlier_branch_is_a_different_model_that_ends_at_zero_lr(wsd_run, token_stream, tmp_path):
    dirs, _ = wsd_run
    out = tmp_path / "step000030"
    log = cool_down(_spec("wsd-cooldown"), dirs[20], token_stream, length=10, shape="cosine", final_lr=0.0,
                    out_dir=out)
    assert [row["lr"] for row in log][0] < 3e-3 and log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)
    branched, parent = load_file(str(out / "model.safetensors")), load_file(str(dirs[30] / "model.safetensors"))
    assert any(not torch.equal(branched[key], parent[key]) for key in parent)


def test_a_checkpoint_without_training_state_is_refused_with_the_fix(wsd_run, token_stream, tmp_path):
    dirs, _ = wsd_run
    with pytest.raises(FileNotFoundError, match="rerun its training job"):
        cool_down(_spec("x"), dirs[40], token_stream, 5, "linear", 0.0, tmp_path / "out")


def _config(**cooldowns):
    config = yaml.safe_load((REPO_ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config["cooldowns"] = cooldowns
    return config


def test_cooldowns_are_trajectories_and_their_branch_points_are_saved():
    config = validate_config(_config(**{"wsd-cd": {"from": "wsd", "at": [20, 10], "length": 8}}))
    assert "wsd-cd" in trajectories(config) and data_source(config, "wsd-cd") == "wsd"
    assert checkpoints_of(config, "wsd-cd") == ["step000018", "step000028"]
    assert checkpoints_of(config, "wsd") == ["step000010", "step000020", "step000040"]
    assert config["cooldowns"]["wsd-cd"]["shape"] == "linear"


@pytest.mark.parametrize(("cooldown", "message"), [
    ({"from": "nope", "at": [10], "length": 5}, "'cooldowns.cd.from': 'nope' is not a trained run"),
    ({"from": "wsd", "at": [35], "length": 5}, "'cooldowns.cd.at': step 35 is past the stable phase"),
    ({"from": "wsd", "at": [10], "length": 0}, "cooldowns.cd.length"),
])
def test_bad_cooldowns_name_the_key(cooldown, message):
    with pytest.raises(ConfigError, match=message.replace("(", "\\(")):
        validate_config(_config(cd=copy.deepcopy(cooldown)))


def test_a_cooldown_named_like_a_run_is_refused():
    with pytest.raises(ConfigError, match="'cosine' is both a trained run and a cooldown"):
        validate_config(_config(cosine={"from": "wsd", "at": [10], "length": 5}))


def test_a_branch_point_does_not_change_what_lawa_averages():
    config = _config(**{"wsd-cd": {"from": "wsd", "at": [30], "length": 4}})
    config["training"]["decay_fraction"] = 0.2  # decay from step 32, so step 30 is stable
    config = validate_config(config)
    assert "step000030" in checkpoints_of(config, "wsd")
    assert averaging_plan_of(config, "wsd-lawa2")["step000040"][0] == [("wsd", "step000020"), ("wsd", "step000040")]
