"""Cluster resources scale with the model; micro models ask for no GPU."""

import pytest

from qtraj.resources import job_resources, llama_parameters

H100 = {"gpu_memory_gb": 80, "cpus_per_gpu": 8}


def test_micro_models_trained_here_ask_for_no_gpu():
    assert job_resources("quantize", None, H100)["gpu"] == 0


@pytest.mark.parametrize("step", ["evaluate_fp", "quantize", "sharpness"])
def test_bigger_models_get_more_gpus_memory_and_time(step):
    small, large = job_resources(step, 1.5e9, H100), job_resources(step, 32.2e9, H100)
    assert small["gpu"] == 1 and large["gpu"] >= 2
    assert large["runtime"] > small["runtime"] and large["mem_mb"] > small["mem_mb"]
    assert job_resources(step, 32.2e9, {**H100, "gpu_memory_gb": 141})["gpu"] < large["gpu"]


def test_a_70b_model_is_spread_over_several_gpus():
    assert job_resources("quantize", 70.6e9, H100)["gpu"] >= 4


def test_registered_lm_eval_tasks_lengthen_only_the_jobs_that_score_accuracy():
    settings = {"gpu_memory_gb": 80, "cpus_per_gpu": 8}
    for step in ("evaluate_fp", "quantize"):  # quantize evaluates the quantized model it made, accuracy included
        plain, scored = job_resources(step, 7e9, settings), job_resources(step, 7e9, settings, lm_eval_tasks=True)
        assert scored["runtime"] == plain["runtime"] + 30 + 140 and scored["gpu"] == plain["gpu"]
    assert job_resources("sharpness", 7e9, settings, True) == job_resources("sharpness", 7e9, settings)


def test_trained_models_are_sized_from_their_llama_config():
    micro = {"hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
             "intermediate_size": 384, "tie_word_embeddings": False}
    # 3 x (4 x 128^2 + 3 x 128 x 384 + 2 x 128) + 2 x 1024 x 128 + 128: the micro model's ~0.9 M parameters
    assert llama_parameters(micro, 1024) == 3 * (4 * 128 * 128 + 3 * 128 * 384 + 256) + 2 * 1024 * 128 + 128
    big = {**micro, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
           "intermediate_size": 3072}
    assert 150e6 < llama_parameters(big, 50304) < 200e6
    assert job_resources("train", llama_parameters(big, 50304), {"gpu_memory_gb": 80, "cpus_per_gpu": 8})["gpu"] == 1


def test_unset_slurm_profile_variables_are_named_before_anything_is_submitted():
    """The profile's default resources as Snakemake parses them (the expression `'$QTRAJ_SLURM_PARTITION'`, expanded
    only when evaluated): the Snakefile's onstart refuses to submit while a variable they name is unset."""
    import yaml

    from qtraj.resources import unexpanded_profile_variables
    from tests.conftest import REPO_ROOT

    profile = yaml.safe_load((REPO_ROOT / "profiles" / "slurm" / "config.v8+.yaml").read_text())
    resources = profile["default-resources"]
    assert unexpanded_profile_variables(resources, {}) == ["QTRAJ_SLURM_ACCOUNT", "QTRAJ_SLURM_PARTITION"]
    assert unexpanded_profile_variables(resources, {"QTRAJ_SLURM_PARTITION": "gpu"}) == ["QTRAJ_SLURM_ACCOUNT"]
    both = {"QTRAJ_SLURM_PARTITION": "gpu", "QTRAJ_SLURM_ACCOUNT": "project"}
    assert unexpanded_profile_variables(resources, both) == []
