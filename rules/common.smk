# Config validation, look-ups and target builders. Every rule file after this one holds only rules.
import os

from qtraj.config import (
    checkpoint_steps,
    checkpoints_of,
    quant_spec,
    run_settings,
    stores_quantized_model,
    validate_config,
)
from qtraj.checkpoints import checkpoint_name

validate_config(config)

RESULTS = config["results_dir"]
LOGS = f"{RESULTS}/logs"
RUNS = list(config["runs"])
QUANTIZATIONS = list(config["quantizations"])
SPLITS = ["train", "validation", "calibration"]


wildcard_constraints:
    run="|".join(RUNS),
    checkpoint=r"step\d{6}",
    quantization="|".join(QUANTIZATIONS),
    split="|".join(SPLITS),


def training_settings(run):
    """A run's merged training settings plus the model architecture: the params of its training job."""
    return {**run_settings(config, run), "model": config["model"]}


def checkpoint_dirs(run):
    """step -> checkpoint folder for every checkpoint the run saves."""
    return {
        step: f"{RESULTS}/checkpoints/{run}/{checkpoint_name(step)}"
        for step in checkpoint_steps(run_settings(config, run))
    }


def fp_evals():
    return [
        f"{RESULTS}/evals/fp/{run}/{checkpoint}.parquet"
        for run in RUNS
        for checkpoint in checkpoints_of(config, run)
    ]


def per_quantized_model(template):
    """`template` filled in for every (run, checkpoint, quantization) of the config."""
    return [
        template.format(run=run, checkpoint=checkpoint, quantization=quantization)
        for run in RUNS
        for checkpoint in checkpoints_of(config, run)
        for quantization in QUANTIZATIONS
    ]


def quantized_model(wildcards):
    """What evaluate_quantized loads: the stored quantized folder, or for a method that quantizes at load
    time (bitsandbytes) the checkpoint itself, so no quantize job and no quantized copy exist for it."""
    if stores_quantized_model(config, wildcards.quantization):
        return f"{RESULTS}/quantized/{wildcards.run}/{wildcards.checkpoint}/{wildcards.quantization}"
    return f"{RESULTS}/checkpoints/{wildcards.run}/{wildcards.checkpoint}"


def quantized_evals():
    return per_quantized_model(
        f"{RESULTS}/evals/quantized/{{run}}/{{checkpoint}}/{{quantization}}.parquet"
    )


def layer_error_tables():
    return per_quantized_model(
        f"{RESULTS}/evals/layers/{{run}}/{{checkpoint}}/{{quantization}}.parquet"
    )


def training_logs():
    return [f"{RESULTS}/training/{run}.parquet" for run in RUNS]


def dataset_tables():
    return [
        f"{RESULTS}/dataset/{table}.parquet"
        for table in ("results", "fp_evals", "training_log")
    ]


def all_targets():
    return dataset_tables() + [f"{RESULTS}/figures/{run}.png" for run in RUNS]
