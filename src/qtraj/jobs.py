"""The job kinds of the workflow, each declared once: the per-job files it writes, its log, and the step that sizes
it, whose numbers (`SIZING`) qtraj.resources scales with the model. The rules read their `output:`, `log:` and
`resources:` from here (rules/common.smk), `qtraj plan` counts and sizes the same jobs (qtraj.plan), and `qtraj
status` looks for the same files and logs (qtraj.status).

A job kind is a rule of the workflow; the per-run training rules (`train_<run>`) are the one kind `train`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qtraj.results import per_job_file


@dataclass(frozen=True)
class Sizing:
    """How one step's jobs are sized: the numbers qtraj.resources.job_resources scales with the model's parameter
    count (a bf16 copy is 2 bytes per parameter), before what a job holds beyond its weights (working_memory_gb)."""

    model_copies: float  # model copies the step holds on its GPUs at once (bf16)
    headroom: float  # factor on them for activations, GPTQ's Hessians and the engines' buffers
    runtime_floor_min: int  # the runtime limit in minutes: this floor ...
    runtime_min_per_billion: float  # ... plus this many minutes per billion parameters
    host_copies: float | None = None  # in host memory; None: half a copy (shards stream from disk to the GPUs)
    scores_accuracy: bool = False  # also scores registered lm-eval tasks, which add ACCURACY_RUNTIME


# step -> its sizing. GPTQ of a 32B model: ~4 h; evaluating it: ~1 h.
SIZING: dict[str, Sizing] = {
    "evaluate_fp": Sizing(model_copies=1.0, headroom=1.25, runtime_floor_min=15, runtime_min_per_billion=1.5,
                          scores_accuracy=True),
    # on one GPU, one model at a time (the fp model moves to host memory once its layer inputs are captured,
    # llm-compressor onloads its working copy layer by layer, the quantized model is built in host memory); spread
    # over several GPUs, the fp and the quantized model both stay dispatched, so 2 is the bound. Host memory holds
    # the fp model, the engine's copy and the quantized one. It evaluates the quantized model, accuracy included.
    "quantize": Sizing(model_copies=2.0, headroom=1.6, runtime_floor_min=40, runtime_min_per_billion=8.5,
                       host_copies=3.0, scores_accuracy=True),
    # fp32 weights and their gradients (4 bf16 copies) plus the Hessian-vector product's second backward pass
    "sharpness": Sizing(model_copies=6.0, headroom=1.25, runtime_floor_min=20, runtime_min_per_billion=2.5),
    # fp32 weights, gradients and two AdamW moments are 16 bytes per parameter, i.e. 8 bf16 copies. The paper's
    # 160M runs take a few GPU hours; the slope is a rough guess, set runtime per run if it matters.
    "train": Sizing(model_copies=8.0, headroom=2.0, runtime_floor_min=120, runtime_min_per_billion=1500.0),
}
# Minutes lm-eval adds to a job that scores accuracy with registered tasks (the paper's 12 at 5-shot: ~100k
# requests, mmlu and hellaswag the bulk): a floor plus a slope per billion parameters; local tasks are a few hundred
# items and fit in the step's floor.
ACCURACY_RUNTIME = (30, 20.0)


@dataclass(frozen=True)
class JobKind:
    """What one kind of job writes and asks for.

    `outputs`: output name in the rule -> (table of qtraj.results.TABLES, index of its per-job pattern).
    `wildcards`: what names one job of the kind, in the order its log path nests them.
    `step`: the step that sizes it (a key of SIZING); None for jobs that ask for no GPU (downloads, links,
    averages), which `qtraj plan` does not count."""

    rule: str
    wildcards: tuple[str, ...]
    outputs: dict[str, tuple[str, int]] = field(default_factory=dict)
    step: str | None = None

    def output_patterns(self) -> dict[str, str]:
        """Output name -> per-job file pattern, relative to the results directory."""
        return {name: per_job_file(table, index) for name, (table, index) in self.outputs.items()}

    def log_pattern(self) -> str:
        """`logs/<rule>/{run}[/{checkpoint}][/{quantization}].log`, relative to the results directory."""
        return "/".join(["logs", self.rule, *(f"{{{name}}}" for name in self.wildcards)]) + ".log"


JOB_KINDS: dict[str, JobKind] = {kind.rule: kind for kind in (
    JobKind("train", ("run",), {"training_log": ("training_log", 0)}, "train"),
    # a cooldown branch resumes training: sized as training
    JobKind("cooldown", ("run", "checkpoint"), {"training_log": ("training_log", 1)}, "train"),
    JobKind("evaluate_fp", ("run", "checkpoint"), {"result": ("fp_evals", 0), "accuracy": ("accuracy", 0)},
            "evaluate_fp"),
    JobKind("sharpness", ("run", "checkpoint"), {"result": ("sharpness", 0)}, "sharpness"),
    JobKind("quantize", ("run", "checkpoint", "quantization"),
            {"result": ("results", 0), "layer_errors": ("layer_errors", 0), "accuracy": ("accuracy", 1)}, "quantize"),
    # the jobs that make a checkpoint folder of a source that is not trained here (qtraj.sources: `makes`)
    JobKind("average_checkpoints", ("run", "checkpoint")),
    JobKind("download_checkpoint", ("run", "checkpoint")),
    JobKind("link_local_checkpoint", ("run", "checkpoint")),
)}
# the kinds `qtraj plan` sizes, and the step that sizes each
SIZED_KINDS = {rule: kind.step for rule, kind in JOB_KINDS.items() if kind.step is not None}
# what the rule of a sized kind asks a cluster for (qtraj.resources.job_resources): portable Snakemake resources
RESOURCE_KEYS = ("gpu", "cpus_per_gpu", "tasks_per_gpu", "mem_mb", "runtime")


def register_job_kind(kind: JobKind) -> JobKind:
    """Declare the job kind of a plugin source's own rule (its `makes`), so that `qtraj status` reads its log."""
    if JOB_KINDS.get(kind.rule, kind) != kind:
        raise ValueError(f"job kind {kind.rule!r} is declared already, differently: {JOB_KINDS[kind.rule]}")
    JOB_KINDS[kind.rule] = kind
    if kind.step is not None:
        SIZED_KINDS[kind.rule] = kind.step
    return kind


@dataclass(frozen=True)
class Job:
    """One job of the workflow. `checkpoint` None: a training job, which saves all its run's checkpoints."""

    rule: str
    run: str
    checkpoint: str | None = None
    quantization: str | None = None

    @property
    def kind(self) -> JobKind:
        return JOB_KINDS[self.rule]

    def fields(self) -> dict[str, str | None]:
        return {"run": self.run, "checkpoint": self.checkpoint, "quantization": self.quantization}

    def outputs(self) -> list[str]:
        """Its per-job Parquet files, relative to the results directory."""
        return [pattern.format(**self.fields()) for pattern in self.kind.output_patterns().values()]

    def log(self) -> str:
        """Its log, relative to the results directory (the rules' `logs/<rule>/<wildcards>.log`)."""
        return self.kind.log_pattern().format(**self.fields())
