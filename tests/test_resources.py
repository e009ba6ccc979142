"""Cluster resources scale with the model; micro models ask for no GPU."""

import pytest

from qtraj.resources import job_resources

H100 = {"gpu_memory_gb": 80, "cpus_per_gpu": 8}


def test_micro_models_trained_here_ask_for_no_gpu():
    assert job_resources("quantize", None, H100)["gpu"] == 0


@pytest.mark.parametrize("step", ["evaluate_fp", "quantize", "evaluate_quantized"])
def test_bigger_models_get_more_gpus_memory_and_time(step):
    small, large = job_resources(step, 1.5e9, H100), job_resources(step, 32.2e9, H100)
    assert small["gpu"] == 1 and large["gpu"] >= 2
    assert large["runtime"] > small["runtime"] and large["mem_mb"] > small["mem_mb"]
    assert job_resources(step, 32.2e9, {**H100, "gpu_memory_gb": 141})["gpu"] < large["gpu"]


def test_a_70b_model_is_spread_over_several_gpus():
    assert job_resources("evaluate_quantized", 70.6e9, H100)["gpu"] >= 4
