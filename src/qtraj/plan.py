"""What a config asks for: its sized jobs (train, cooldown, evaluate_fp, sharpness, quantize), the per-job files and
logs each one writes, and the GPU-hours they request from a cluster (`qtraj plan`, `qtraj status`).

Jobs are sized by `step_resources` (qtraj.resources.job_resources on the trajectory's model), which the rules'
`resource` (rules/common.smk) calls too. The runtimes are the requested limits, so GPU-hours here are an upper
bound, not a forecast. Downloads, data preparation, averaging, aggregation and figures ask for no GPU and are not
counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtraj.config import (
    checkpoints_of,
    cooldown_branches,
    data_settings,
    data_source,
    is_family,
    is_local,
    measures_sharpness,
    trajectories,
)
from qtraj.resources import (
    ModelShape,
    cpu_job_resources,
    estimated_shape,
    job_resources,
    llama_parameters,
    shape_of_hf_config,
    working_memory_gb,
)
from qtraj.results import per_job_file
from qtraj.texttable import text_table

# Rule -> the per-job files it writes: (table of qtraj.results.TABLES, index of its per-job pattern).
RULE_OUTPUTS: dict[str, tuple[tuple[str, int], ...]] = {
    "train": (("training_log", 0),),
    "cooldown": (("training_log", 1),),
    "evaluate_fp": (("fp_evals", 0), ("accuracy", 0)),
    "sharpness": (("sharpness", 0),),
    "quantize": (("results", 0), ("layer_errors", 0), ("accuracy", 1)),
}
# Rule -> the step of qtraj.resources that sizes it (a cooldown is training).
RULE_STEP = {"train": "train", "cooldown": "train", "evaluate_fp": "evaluate_fp", "sharpness": "sharpness",
             "quantize": "quantize"}


@dataclass(frozen=True)
class Job:
    """One sized job of the workflow. `checkpoint` None: a training job, which saves all its run's checkpoints."""

    rule: str
    run: str
    checkpoint: str | None = None
    quantization: str | None = None

    def outputs(self) -> list[str]:
        """Its per-job Parquet files, relative to the results directory."""
        fields = {"run": self.run, "checkpoint": self.checkpoint, "quantization": self.quantization}
        return [per_job_file(table, index).format(**fields) for table, index in RULE_OUTPUTS[self.rule]]

    def log(self) -> str:
        """Its log, relative to the results directory (the rules' `logs/<rule>/<wildcards>.log`)."""
        return job_log(self.rule, self.run, self.checkpoint, self.quantization)


def job_log(rule: str, run: str, checkpoint: str | None = None, quantization: str | None = None) -> str:
    """The log of a job of `rule`, relative to the results directory, in the layout every rule's `log:` follows:
    `logs/<rule>/<run>[/<checkpoint>][/<quantization>].log`."""
    return "/".join(["logs", rule, *(part for part in (run, checkpoint, quantization) if part is not None)]) + ".log"


def checkpoint_jobs(config: dict, run: str, checkpoint: str) -> list[Job]:
    """The jobs that measure one checkpoint: its full-precision evaluation, its sharpness (where the config measures
    it) and one quantize job per quantization."""
    jobs = [Job("evaluate_fp", run, checkpoint)]
    if measures_sharpness(config, run):
        jobs.append(Job("sharpness", run, checkpoint))
    jobs += [Job("quantize", run, checkpoint, quantization) for quantization in config["quantizations"]]
    return jobs


def planned_jobs(config: dict) -> list[Job]:
    """Every sized job of a (validated) config, trajectory by trajectory: training, cooldown branches, then the
    measurements of each checkpoint."""
    jobs = []
    for run in trajectories(config):
        if run in config["runs"]:
            jobs.append(Job("train", run))
        if run in config["cooldowns"]:
            jobs += [Job("cooldown", run, checkpoint) for checkpoint in cooldown_branches(config, run)]
        for checkpoint in checkpoints_of(config, run):
            jobs += checkpoint_jobs(config, run, checkpoint)
    return jobs


def model_parameters(config: dict, run: str) -> float | None:
    """The parameter count that sizes a trajectory's jobs (that of the model it comes from): a family file's, a local
    folder's, a trained model's when `resources.trained_on_gpu`; None for micro models trained on the CPU."""
    source = data_source(config, run)
    if is_family(config, source):
        from qtraj.families import configured_family

        return configured_family(config, source)["parameters"]
    if is_local(config, source):
        from qtraj.local import parameter_count

        return parameter_count(config, source)
    if config["resources"]["trained_on_gpu"]:
        return llama_parameters(config["model"], config["tokenizer"]["vocab_size"])
    return None


def model_shape(config: dict, run: str) -> ModelShape | None:
    """What sizes a trajectory's jobs beyond the parameter count (qtraj.resources.working_memory_gb): a trained
    model's config, a local folder's config.json, a family's estimate from its parameter count; None for a folder
    a rule has yet to make."""
    source = data_source(config, run)
    if is_family(config, source) or is_local(config, source):
        parameters = model_parameters(config, run)
        if parameters is None:
            return None
        if is_local(config, source):
            from qtraj.local import hf_config

            settings = hf_config(config, source)
            if settings:
                return shape_of_hf_config(settings, parameters)
        return estimated_shape(parameters)
    model = config["model"]
    return ModelShape(llama_parameters(model, config["tokenizer"]["vocab_size"]), model["hidden_size"],
                      model["intermediate_size"], model["num_hidden_layers"], config["tokenizer"]["vocab_size"])


def step_resources(config: dict, step: str, run: str) -> dict:
    """What a `step` job on trajectory `run` asks a cluster for (qtraj.resources.job_resources), with what it holds
    beyond its weights under `working_mb` (not a Snakemake resource: `qtraj plan` shows it)."""
    data = data_settings(config, run)
    lm_eval_tasks = bool(data["accuracy"]["lm_eval_tasks"])
    shape = model_shape(config, run)
    parameters = model_parameters(config, run)
    if shape is None:
        return job_resources(step, parameters, config["resources"], lm_eval_tasks)
    on_gpu = parameters is not None
    working = working_memory_gb(step, shape, data, on_gpu, config["training"] if run in config["runs"] or
                                run in config["cooldowns"] else None)
    if not on_gpu:
        return {**cpu_job_resources(step, shape.parameters, working), "working_mb": round(working * 1e9 / 2**20)}
    return {**job_resources(step, parameters, config["resources"], lm_eval_tasks, working),
            "working_mb": round(working * 1e9 / 2**20)}


@dataclass(frozen=True)
class PlanRow:
    """The jobs of one rule on one trajectory, all sized alike."""

    run: str
    rule: str
    jobs: int
    gpus: int  # per job
    runtime_min: int  # requested per job
    mem_mb: int  # per job
    working_mb: int = 0  # of it, what the job holds beyond its model copies (activations, logits, Hessians)

    @property
    def hours(self) -> float:
        return self.jobs * self.runtime_min / 60

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.gpus


def plan(config: dict) -> list[PlanRow]:
    """The config's sized jobs counted per (trajectory, rule), in the order `planned_jobs` lists them."""
    counts: dict[tuple[str, str], int] = {}
    for job in planned_jobs(config):
        counts[(job.run, job.rule)] = counts.get((job.run, job.rule), 0) + 1
    rows = []
    for (run, rule), jobs in counts.items():
        resources = step_resources(config, RULE_STEP[rule], run)
        rows.append(PlanRow(run, rule, jobs, resources.get("gpu", 0), resources.get("runtime", 0),
                            resources.get("mem_mb", 0), resources.get("working_mb", 0)))
    return rows


def totals_by_rule(rows: list[PlanRow]) -> dict[str, dict[str, float]]:
    """Rule -> jobs, hours and GPU-hours over all trajectories, plus `total`."""
    totals: dict[str, dict[str, float]] = {}
    for row in rows:
        for key in (row.rule, "total"):
            entry = totals.setdefault(key, {"jobs": 0, "hours": 0.0, "gpu_hours": 0.0})
            entry["jobs"] += row.jobs
            entry["hours"] += row.hours
            entry["gpu_hours"] += row.gpu_hours
    if "total" in totals:  # last
        totals["total"] = totals.pop("total")
    return totals


def _gigabytes(mebibytes: int) -> str:
    return f"{mebibytes / 1024:.1f} GB" if mebibytes < 10 * 1024 else f"{mebibytes / 1024:.0f} GB"


def render_plan(rows: list[PlanRow]) -> str:
    """The plan as text: one line per (trajectory, rule), then the totals per rule."""
    jobs = text_table(["trajectory", "rule", "jobs", "GPUs/job", "runtime/job", "memory/job", "beyond weights",
                       "GPU-hours"],
                      [[row.run, row.rule, row.jobs, row.gpus, f"{row.runtime_min} min", _gigabytes(row.mem_mb),
                        _gigabytes(row.working_mb), f"{row.gpu_hours:,.1f}"] for row in rows], right={2, 3, 4, 5, 6, 7})
    totals = text_table(["rule", "jobs", "job-hours", "GPU-hours"],
                        [[rule, total["jobs"], f"{total['hours']:,.1f}", f"{total['gpu_hours']:,.1f}"]
                         for rule, total in totals_by_rule(rows).items()], right={1, 2, 3})
    return (f"{jobs}\n\n{totals}\n(runtimes are the requested limits, so the hours are upper bounds; memory/job is "
            "host memory; beyond weights is what a job holds\n on its device beside its model copies: activations, a "
            "chunk of logits, one layer's GPTQ Hessians;\n downloads, data preparation, averaging, the aggregate, the "
            "science check and figures need no GPU\n and are not counted: `snakemake --dry-run` lists every job)")
