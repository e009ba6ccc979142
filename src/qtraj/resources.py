"""What each job asks a cluster for, scaled from the model's parameter count.

Only portable Snakemake resources (`gpu`, `mem_mb`, `runtime` in minutes, `cpus_per_gpu`); partition, account
and GPU model belong to the cluster profile. The sizing is deliberately simple and documented in the README:
a bf16 model needs 2 bytes per parameter, and each step holds a known number of model copies plus headroom (its
numbers are declared with the job kinds: qtraj.jobs.SIZING).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from qtraj.jobs import ACCURACY_RUNTIME, SIZING

FIXED_GB = 4.0  # CUDA context, kernels, batches


def llama_parameters(model: dict, vocab_size: int) -> int:
    """Parameter count of a LlamaConfig (`model` settings): what sizes a trained run's jobs."""
    hidden, heads, layers = model["hidden_size"], model["num_attention_heads"], model["num_hidden_layers"]
    kv_width = hidden // heads * model["num_key_value_heads"]
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * model["intermediate_size"] + 2 * hidden
    embeddings = vocab_size * hidden * (1 if model["tie_word_embeddings"] else 2)
    return layers * per_layer + embeddings + hidden


@dataclass(frozen=True)
class ModelShape:
    """What sizes the memory a job holds beyond the weights."""

    parameters: float
    hidden_size: int
    intermediate_size: int  # the widest input of a decoder Linear: GPTQ's largest Hessian (down_proj's)
    num_hidden_layers: int
    vocab_size: int | None = None  # None: unknown, and the logits chunk is its own bound


def shape_of_hf_config(settings: Mapping, parameters: float) -> ModelShape:
    """A model's shape from its config.json (Llama-style keys, GPT-2's n_embd / n_inner / n_layer)."""
    settings = settings.get("text_config") or settings
    hidden = settings.get("hidden_size") or settings.get("n_embd")
    widest = settings.get("intermediate_size") or settings.get("n_inner") or 4 * hidden
    layers = settings.get("num_hidden_layers") or settings.get("n_layer")
    return ModelShape(parameters, int(hidden), int(widest), int(layers), settings.get("vocab_size"))


def estimated_shape(parameters: float) -> ModelShape:
    """The shape of a model known only by its parameter count (a hub family): the decoder-only rule of thumb,
    ~12 x hidden^2 per layer with hidden / layers ~128 (Llama-7B: 4,096 / 32), so hidden ~ (128 P / 12)^(1/3);
    MLP 4 x hidden. It errs large for narrow-and-deep models (SmolLM3-3B: 3,200 for 2,048), which only adds
    headroom."""
    hidden = 128 * math.ceil((128 * parameters / 12) ** (1 / 3) / 128)
    return ModelShape(parameters, hidden, 4 * hidden, max(1, hidden // 128))


# Bytes per activation value: bf16 on a GPU, fp32 on the CPU (qtraj.evaluation.load_causal_lm).
ACTIVATION_BYTES = {True: 2, False: 4}


def evaluation_gb(shape: ModelShape, evaluation: Mapping, on_gpu: bool) -> float:
    """What scoring one batch holds beyond the weights: a decoder layer's activations at a time (the residual,
    its norm, attention output and hidden states; the MLP's gate, up and product), plus one float32 chunk of
    logits and its log-softmax (qtraj.evaluation.LOGITS_CHUNK_BYTES; the whole batch's when smaller)."""
    from qtraj.evaluation import LOGITS_CHUNK_BYTES

    positions = evaluation["batch_size"] * evaluation["seq_len"]
    activations = positions * (4 * shape.hidden_size + 3 * shape.intermediate_size) * ACTIVATION_BYTES[on_gpu]
    logits = LOGITS_CHUNK_BYTES if shape.vocab_size is None else min(LOGITS_CHUNK_BYTES,
                                                                      4 * positions * shape.vocab_size)
    return (activations + 2 * logits) / 1e9


def calibration_gb(shape: ModelShape, calibration: Mapping) -> float:
    """What GPTQ-style calibration holds beyond the weights: every calibration sample's inputs and outputs of the
    layer being quantized (llm-compressor's sequential pipeline caches them, float32), and one float32 Hessian
    (inputs x inputs) per Linear of that layer: q, k, v, o, gate, up read the hidden width, down the MLP's."""
    positions = calibration["num_samples"] * calibration["seq_len"]
    layer_inputs = 2 * positions * shape.hidden_size * 4
    hessians = 4 * (6 * shape.hidden_size**2 + shape.intermediate_size**2)
    return (layer_inputs + hessians) / 1e9


def working_memory_gb(step: str, shape: ModelShape, data: Mapping, on_gpu: bool,
                      training: Mapping | None = None) -> float:
    """GB a `step` job holds beyond its model copies (`data`: qtraj.config.data_settings). quantize calibrates,
    frees the Hessians, then evaluates: the larger of the two. sharpness and train keep every layer's activations
    for the backward pass (sharpness twice, for the second backward); train's batch is `training`'s."""
    evaluation = evaluation_gb(shape, data["evaluation"], on_gpu)
    if step == "quantize":
        return max(calibration_gb(shape, data["calibration"]), evaluation)
    if step == "sharpness":
        return 2 * shape.num_hidden_layers * evaluation
    if step == "train" and training is not None:
        return shape.num_hidden_layers * evaluation_gb(shape, training, on_gpu)
    return evaluation


# Host memory of a job process before any model: Python with torch, transformers, llm-compressor and lm-eval
# imported. The default's CPU jobs peak at 0.5-0.66 GB in all (docs/measured/default/workflow_jobs.txt). A job
# over its request is killed where the cluster enforces it, and library versions move the base: 1.5x headroom.
PROCESS_BASE_MB = 600
CPU_HEADROOM = 1.5


def cpu_job_resources(step: str, parameters: float, working_gb: float) -> dict:
    """A job that runs on the CPU (a micro model trained here): the process, its fp32 model copies, and what it
    holds beyond them (working_memory_gb)."""
    weights_mb = 4 * parameters * (SIZING[step].model_copies if step in SIZING else 1.0) / 2**20
    need_mb = PROCESS_BASE_MB + weights_mb + working_gb * 1e9 / 2**20
    return {"gpu": 0, "mem_mb": math.ceil(CPU_HEADROOM * need_mb), "runtime": 30}


def gpus_needed(step: str, parameters: float, gpu_memory_gb: float, working_gb: float = 0.0) -> int:
    sizing = SIZING[step]
    need_gb = 2 * parameters / 1e9 * sizing.model_copies * sizing.headroom + FIXED_GB + working_gb
    return max(1, math.ceil(need_gb / gpu_memory_gb))


def job_resources(step: str, parameters: float | None, settings: dict, lm_eval_tasks: bool = False,
                  working_gb: float = 0.0) -> dict:
    """Resources of one job of `step` on a model of `parameters` (None: a micro model trained here, CPU only).

    `settings` is the config's `resources` block: gpu_memory_gb (per GPU) and cpus_per_gpu. `lm_eval_tasks`:
    evaluation jobs also score registered lm-eval tasks, which takes longer than the loss. `working_gb`: what the
    job holds on its GPUs beyond the weights (working_memory_gb).
    """
    if parameters is None or step not in SIZING:
        return {"gpu": 0, "mem_mb": 4000, "runtime": 30}
    sizing = SIZING[step]
    gpus = gpus_needed(step, parameters, settings["gpu_memory_gb"], working_gb)
    # host memory: shards stream from disk to the GPUs (device_map), so half a model copy plus buffers
    host_copies = sizing.model_copies * 0.5 if sizing.host_copies is None else sizing.host_copies
    host_gb = max(16.0, 2 * parameters / 1e9 * host_copies + 16)
    # tasks_per_gpu 0: one process drives all the job's GPUs (device_map="auto"); the Slurm plugin would otherwise
    # start one task per GPU, i.e. run the same job several times side by side
    return {"gpu": gpus, "cpus_per_gpu": settings["cpus_per_gpu"], "tasks_per_gpu": 0,
            "mem_mb": int(host_gb * 1024),
            "runtime": int(sizing.runtime_floor_min + sizing.runtime_min_per_billion * parameters / 1e9)
            + (_accuracy_minutes(parameters) if lm_eval_tasks and sizing.scores_accuracy else 0)}


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
