"""Sweeps (`sweeps:`): a grid expands into named runs, each with its constant-LR branch from the decay start and
its LAWA; the runs' own model sizes reach training, sizing and the checks; the pre-registered decay map plans what
its header says. Snakemake's DAG of a sweep, against `qtraj plan`'s jobs and sizes: tests/test_cli.py
(test_plan_matches_the_workflows_dag)."""

from __future__ import annotations

import copy

import pytest

from qtraj.config import ConfigError, load_config, run_model, training_params, validate_config
from qtraj.plan import model_shape, planned_jobs
from qtraj.sweeps import run_name, steps_for
from tests.conftest import REPO_ROOT

DECAY_MAP = REPO_ROOT / "config" / "experiments" / "decay-map.yaml"
M32 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
       "intermediate_size": 96}


def _config(**sweep) -> dict:
    """A small valid config whose only trajectories come from one sweep `s`."""
    config = {"tokenizer": {"vocab_size": 1024}, "training": {"batch_size": 16, "seq_len": 128, "checkpoints": 4},
              "quantizations": {"rtn-w4g32": {"method": "rtn", "bits": 4, "group_size": 32}},
              "sweeps": {"s": {"tokens_per_parameter": [2], "seeds": [0], **sweep}}}
    return validate_config(config)


def test_the_decay_map_expands_to_the_grid_its_header_declares():
    config = load_config(DECAY_MAP)
    runs, cooldowns, averages = config["runs"], config["cooldowns"], config["averages"]
    assert len(runs) == len(cooldowns) == len(averages) == 2 * 3 * 5
    steps = {name: entry["steps"] for name, entry in runs.items() if name.endswith("-s0")}
    # the header's step counts: tokens per parameter x parameters / 2,048 tokens, up to a multiple of 4 checkpoints
    assert steps == {"map-m32-tpp2-lr0.003-s0": 92, "map-m32-tpp10-lr0.003-s0": 452,
                     "map-m32-tpp40-lr0.003-s0": 1804, "map-m64-tpp2-lr0.003-s0": 236,
                     "map-m64-tpp10-lr0.003-s0": 1164, "map-m64-tpp40-lr0.003-s0": 4648}
    run = "map-m64-tpp40-lr0.003-s3"
    assert runs[run]["seed"] == 3 and run_model(config, run)["hidden_size"] == 64
    # the control: the same run from its decay start (75% of 4,648 steps) to its end, at a constant LR
    assert cooldowns[f"{run}-constant"] == {"from": run, "at": [3486], "length": 1162, "shape": "constant",
                                            "final_lr_fraction": 0.0}
    assert averages[f"{run}-lawa"] == {"kind": "lawa", "of": run, "window": 2, "at": ["step004648"], "decay": 0.5}
    # every run's checkpoints: 25 / 50 / 75 (the branch point) / 100%; each control's ends at the run's last step
    jobs = planned_jobs(config)
    counts = {rule: sum(job.rule == rule for job in jobs) for rule in {job.rule for job in jobs}}
    assert counts == {"train": 30, "cooldown": 30, "evaluate_fp": 30 * 6, "quantize": 30 * 6 * 4}
    assert {job.checkpoint for job in jobs if job.run == f"{run}-constant"} == {"step004648"}


def test_each_run_is_sized_and_trained_as_its_own_model():
    config = load_config(DECAY_MAP)
    small, large = "map-m32-tpp2-lr0.003-s0", "map-m64-tpp2-lr0.003-s0"
    shapes = {name: model_shape(config, name) for name in (small, large, f"{large}-constant", f"{large}-lawa")}
    assert (shapes[small].hidden_size, shapes[large].hidden_size) == (32, 64)
    assert (shapes[small].parameters, shapes[large].parameters) == (92_320, 237_888)
    assert shapes[f"{large}-constant"] == shapes[f"{large}-lawa"] == shapes[large]  # a branch, an average: its run's
    # what the training job gets: the run's model, the other keys of the config's `model` kept
    params = training_params(config, large)
    assert params["model"] == {**config["model"], "hidden_size": 64, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 192}
    assert (params["steps"], params["seed"], params["peak_lr"]) == (236, 0, 0.003)


def test_names_steps_and_the_default_model_label():
    assert run_name("map", "m32", 2.5, 0.003, 4) == "map-m32-tpp2.5-lr0.003-s4"
    assert steps_for(2, 92_320, 2048, 4) == 92 and steps_for(1, 2048, 2048, 4) == 4
    config = _config(peak_lr=None)  # the config's model and peak LR
    assert list(config["runs"]) == ["s-model-tpp2-lr0.003-s0"]
    assert "model" not in config["runs"]["s-model-tpp2-lr0.003-s0"]


def test_validating_an_expanded_config_again_changes_nothing():
    config = _config(models={"m32": M32}, lawa=2)
    assert validate_config(copy.deepcopy(config)) == config


@pytest.mark.parametrize(("change", "message"), [
    ({"runs": {"s-model-tpp2-lr0.003-s0": {"seed": 7}}}, "sweep 's' makes an entry of that name"),
    ({"training": {"schedule": "cosine"}}, "sweeps.s.control"),
    ({"sweeps": {"s": {"tokens_per_parameter": [2], "seeds": [0], "training": {"steps": 10}}}}, "steps come from"),
    ({"sweeps": {"s": {"tokens_per_parameter": [2], "seeds": [0], "models": {"w": {"hidden_size": 48}}}}},
     "runs.s-w-tpp2-lr0.003-s0.model.hidden_size 48"),
    ({"sweeps": {"s": {"tokens_per_parameter": [2], "seeds": [0], "models": {"w": {"hidden_sise": 48}}}}},
     "runs.s-w-tpp2-lr0.003-s0.model"),
])
def test_a_sweep_that_cannot_be_expanded_is_refused_by_key(change, message):
    config = {"tokenizer": {"vocab_size": 1024}, "training": {"batch_size": 16, "seq_len": 128, "checkpoints": 4},
              "quantizations": {"rtn-w4g32": {"method": "rtn", "bits": 4, "group_size": 32}},
              "sweeps": {"s": {"tokens_per_parameter": [2], "seeds": [0]}}}
    for key, value in change.items():
        config[key] = {**config.get(key, {}), **value}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate_config(config)
