"""Cluster resources scale with the model; micro models ask for no GPU."""

from pathlib import Path

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


def test_every_sized_job_kind_has_its_sizing():
    """A kind whose step qtraj.jobs.SIZING lacks would silently ask for no GPU (job_resources' answer for micro
    models), and an entry no kind uses is a number nobody reads."""
    from qtraj.jobs import SIZED_KINDS, SIZING

    assert set(SIZED_KINDS.values()) == set(SIZING)


# (GPUs, mem_mb, runtime) on H100s with registered lm-eval tasks, for 1.7B and 32B parameters, and the GB a 32B
# model's job needs on its GPUs (the GPU count on 1 GB GPUs): the resource model's figures before its numbers moved
# into qtraj.jobs.SIZING, pinned so that a changed number is a decision
PINNED_FIGURES = {"evaluate_fp": ([(1, 18124, 81), (2, 49152, 733)], 84),
                  "quantize": ([(1, 26828, 118), (3, 212992, 982)], 209),
                  "sharpness": ([(1, 26828, 24), (7, 212992, 100)], 484),
                  "train": ([(1, 30310, 2670), (13, 278528, 48120)], 1028)}


@pytest.mark.parametrize("step", sorted(PINNED_FIGURES))
def test_each_steps_sizing_gives_its_pinned_figures(step):
    from qtraj.resources import gpus_needed

    jobs = [job_resources(step, parameters, H100, lm_eval_tasks=True) for parameters in (1.7e9, 32e9)]
    figures = [(job["gpu"], job["mem_mb"], job["runtime"]) for job in jobs]
    assert (figures, gpus_needed(step, 32e9, gpu_memory_gb=1.0)) == PINNED_FIGURES[step]


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


def _measured_max_rss_mb() -> dict[str, float]:
    """Rule -> the largest max RSS (MB) a job of it reached in the committed default run (bench/workflow_jobs.py)."""
    table = Path(__file__).parents[1] / "docs/measured/default/workflow_jobs.txt"
    rows = [line.split() for line in table.read_text().splitlines()[1:] if line.split() and line.split()[0] != "all"]
    return {row[0]: float(row[6]) for row in rows if len(row) > 6 and row[1].isdigit()}


def test_the_default_jobs_ask_for_at_least_what_they_were_measured_to_hold():
    """The memory model against the job server's max RSS of every sized job of the default run: enough (a Slurm
    job over its request is killed), and not wildly more (the request would waste a node)."""
    from qtraj.config import load_config
    from qtraj.plan import RULE_STEP, step_resources

    config = load_config(Path(__file__).parents[1] / "config" / "config.yaml")
    measured = _measured_max_rss_mb()
    runs = {"train": "wsd", "cooldown": "constant", "evaluate_fp": "wsd", "sharpness": "wsd", "quantize": "wsd"}
    for rule, run in runs.items():
        asked = step_resources(config, RULE_STEP[rule], run)["mem_mb"]
        assert measured[rule] <= asked <= 2.5 * measured[rule], (rule, measured[rule], asked)


def test_evaluation_memory_does_not_grow_with_the_vocabulary():
    """The loss holds one chunk of logits (qtraj.evaluation.LOGITS_CHUNK_BYTES) whatever the vocabulary: Gemma 3's
    262k costs what a 10M vocabulary would, and a small vocabulary's whole batch is less than a chunk."""
    from qtraj.evaluation import LOGITS_CHUNK_BYTES
    from qtraj.resources import ModelShape, evaluation_gb

    evaluation = {"batch_size": 4, "seq_len": 2048}
    gemma, huge, tiny = (ModelShape(3e8, 640, 2048, 18, vocab) for vocab in (262_144, 10_000_000, 64))
    assert evaluation_gb(gemma, evaluation, True) == evaluation_gb(huge, evaluation, True)
    activations = 4 * 2048 * (4 * 640 + 3 * 2048) * 2
    assert evaluation_gb(gemma, evaluation, True) == pytest.approx((activations + 2 * LOGITS_CHUNK_BYTES) / 1e9)
    assert evaluation_gb(tiny, evaluation, True) == pytest.approx((activations + 2 * 4 * 4 * 2048 * 64) / 1e9)


def test_calibration_holds_one_layers_hessians_and_its_inputs():
    from qtraj.resources import ModelShape, calibration_gb, job_resources, working_memory_gb

    olmo2_32b = ModelShape(32.2e9, 5120, 27648, 64)
    calibration = {"num_samples": 128, "seq_len": 2048}
    hessians = 4 * (6 * 5120**2 + 27648**2)  # float32 in x in, q k v o gate up on 5,120 inputs, down on 27,648
    assert calibration_gb(olmo2_32b, calibration) == pytest.approx((2 * 128 * 2048 * 5120 * 4 + hessians) / 1e9)
    data = {"calibration": calibration, "evaluation": {"batch_size": 4, "seq_len": 2048}}
    working = working_memory_gb("quantize", olmo2_32b, data, on_gpu=True)
    assert working == pytest.approx(calibration_gb(olmo2_32b, calibration))
    squeezed = {**H100, "gpu_memory_gb": 2 * 32.2 * 2 * 1.6 / 2 + 4 + 0.1}  # two GPUs fit the weights, not more
    assert job_resources("quantize", 32.2e9, squeezed)["gpu"] == 2
    assert job_resources("quantize", 32.2e9, squeezed, working_gb=working)["gpu"] == 3


def test_plan_shows_what_jobs_hold_beyond_their_weights():
    from qtraj.config import load_config
    from qtraj.plan import plan, render_plan

    rows = plan(load_config(Path(__file__).parents[1] / "config" / "config.yaml"))
    assert all(row.working_mb > 0 for row in rows)
    assert "beyond weights" in render_plan(rows).splitlines()[0]


def test_a_local_folders_shape_comes_from_its_config(tmp_path):
    from qtraj.resources import shape_of_hf_config

    gpt2 = shape_of_hf_config({"n_embd": 768, "n_inner": None, "n_layer": 12, "vocab_size": 50257}, 124e6)
    assert (gpt2.hidden_size, gpt2.intermediate_size, gpt2.num_hidden_layers, gpt2.vocab_size) == (768, 3072, 12, 50257)
    gemma = shape_of_hf_config({"text_config": {"hidden_size": 640, "intermediate_size": 2048,
                                                "num_hidden_layers": 18, "vocab_size": 262144}}, 2.7e8)
    assert (gemma.hidden_size, gemma.vocab_size) == (640, 262144)
