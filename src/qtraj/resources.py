"""What each job asks a cluster for, scaled from the model's parameter count.

Only portable Snakemake resources (`gpu`, `mem_mb`, `runtime` in minutes, `cpus_per_gpu`); partition, account
and GPU model belong to the cluster profile. The sizing is deliberately simple and documented in the README:
a bf16 model needs 2 bytes per parameter, and each step holds a known number of model copies plus headroom.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

# Model copies a step holds on the GPUs at once (bf16), and a headroom factor for activations, GPTQ's Hessians
# and the engines' buffers. quantize: on one GPU, one model at a time (the fp model moves to host memory once its
# layer inputs are captured, llm-compressor onloads its working copy layer by layer, the quantized model is built
# in host memory); spread over several GPUs, the fp and the quantized model both stay dispatched, so 2 is the
# bound. Host memory holds the fp model, the engine's copy and the quantized one (HOST_COPIES). sharpness: fp32
# weights and their gradients (4 bf16 copies) plus the Hessian-vector product's second backward pass.
# train: fp32 weights, gradients and two AdamW moments are 16 bytes per parameter, i.e. 8 bf16 copies.
MODEL_COPIES = {"evaluate_fp": 1.0, "quantize": 2.0, "sharpness": 6.0, "train": 8.0}
HOST_COPIES = {"quantize": 3.0}  # others: half a copy (shards stream from disk to the GPUs)
HEADROOM = {"evaluate_fp": 1.25, "quantize": 1.6, "sharpness": 1.25, "train": 2.0}
FIXED_GB = 4.0  # CUDA context, kernels, batches
# Minutes: a floor plus a slope per billion parameters (GPTQ of a 32B model: ~4 h; evaluating it: ~1 h).
# train: the paper's 160M runs take a few GPU hours; the slope is a rough guess, set runtime per run if it matters.
RUNTIME = {"evaluate_fp": (15, 1.5), "quantize": (40, 8.5), "sharpness": (20, 2.5), "train": (120, 1500.0)}


# Minutes lm-eval adds to an evaluation job with registered tasks (the paper's 12 at 5-shot: ~100k requests,
# mmlu and hellaswag the bulk); local tasks are a few hundred items and fit in the floor.
ACCURACY_RUNTIME = (30, 20.0)
SCORES_ACCURACY = ("evaluate_fp", "quantize")


def llama_parameters(model: dict, vocab_size: int) -> int:
    """Parameter count of a LlamaConfig (`model` settings): what sizes a trained run's jobs."""
    hidden, heads, layers = model["hidden_size"], model["num_attention_heads"], model["num_hidden_layers"]
    kv_width = hidden // heads * model["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * model["intermediate_size"] + 2 * hidden
    embeddings = vocab_size * hidden * (1 if model["tie_word_embeddings"] else 2)
    return layers * per_layer + embeddings + hidden


def gpus_needed(step: str, parameters: float, gpu_memory_gb: float) -> int:
    need_gb = 2 * parameters / 1e9 * MODEL_COPIES[step] * HEADROOM[step] + FIXED_GB
    return max(1, math.ceil(need_gb / gpu_memory_gb))


def job_resources(step: str, parameters: float | None, settings: dict, lm_eval_tasks: bool = False) -> dict:
    """Resources of one job of `step` on a model of `parameters` (None: a micro model trained here, CPU only).

    `settings` is the config's `resources` block: gpu_memory_gb (per GPU) and cpus_per_gpu. `lm_eval_tasks`:
    evaluation jobs also score registered lm-eval tasks, which takes longer than the loss.
    """
    if parameters is None or step not in MODEL_COPIES:
        return {"gpu": 0, "mem_mb": 4000, "runtime": 30}
    gpus = gpus_needed(step, parameters, settings["gpu_memory_gb"])
    floor, per_billion = RUNTIME[step]
    # host memory: shards stream from disk to the GPUs (device_map), so half a model copy plus buffers
    host_gb = max(16.0, 2 * parameters / 1e9 * HOST_COPIES.get(step, MODEL_COPIES[step] * 0.5) + 16)
    # tasks_per_gpu 0: one process drives all the job's GPUs (device_map="auto"); the Slurm plugin would otherwise
    # start one task per GPU, i.e. run the same job several times side by side
    return {"gpu": gpus, "cpus_per_gpu": settings["cpus_per_gpu"], "tasks_per_gpu": 0,
            "mem_mb": int(host_gb * 1024), "runtime": int(floor + per_billion * parameters / 1e9)
            + (_accuracy_minutes(parameters) if lm_eval_tasks and step in SCORES_ACCURACY else 0)}


def _accuracy_minutes(parameters: float) -> int:
    floor, per_billion = ACCURACY_RUNTIME
    return int(floor + per_billion * parameters / 1e9)


UNEXPANDED = re.compile(r"\$\{?(QTRAJ_SLURM_\w+)")


def unexpanded_profile_variables(default_resources: object, environment: Mapping[str, str]) -> list[str]:
    """Environment variables that profiles/slurm's default resources name (`$QTRAJ_SLURM_PARTITION`) but
    `environment` lacks: Snakemake expands them when it evaluates a resource and leaves an unset one as it is, so
    the cluster would be asked for a partition literally called "$QTRAJ_SLURM_PARTITION".
    `default_resources`: Snakemake's parsed default resources (name -> Resource, whose `raw` is the profile's
    expression), or any mapping of names to expressions."""
    values = default_resources.values() if hasattr(default_resources, "values") else ()
    named = set()
    for value in values:
        named.update(UNEXPANDED.findall(str(getattr(value, "raw", value))))
    return sorted(name for name in named if not environment.get(name))
