"""What a config asks for: its sized jobs (qtraj.jobs.SIZED_KINDS: train, cooldown, evaluate_fp, sharpness, quantize),
the per-job files and logs each one writes, and the GPU-hours they request from a cluster (`qtraj plan`,
`qtraj status`).

Jobs are sized by `step_resources` (qtraj.resources.job_resources on the trajectory's model, as its source gives it:
qtraj.sources), which the rules' `resources:` (rules/common.smk) call too. The runtimes are the requested limits, so
GPU-hours here are an upper bound, not a forecast. Downloads, data preparation, averaging, aggregation and figures
ask for no GPU and are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtraj.config import data_settings, data_source, measures_sharpness
from qtraj.jobs import JOB_KINDS, SIZED_KINDS, Job
from qtraj.resources import ModelShape, cpu_job_resources, job_resources, working_memory_gb
from qtraj.sources import source_of, sources
from qtraj.texttable import text_table

__all__ = ["JOB_KINDS", "RULE_STEP", "Job", "checkpoint_jobs", "per_job_paths", "plan", "planned_jobs",
           "render_plan", "step_resources", "totals_by_rule"]

# Rule -> the step of qtraj.resources that sizes it (a cooldown is training): qtraj.jobs declares it.
RULE_STEP = SIZED_KINDS


def checkpoint_jobs(config: dict, run: str, checkpoint: str) -> list[Job]:
    """The jobs that measure one checkpoint: its full-precision evaluation, its sharpness (where the config measures
    it) and one quantize job per quantization."""
    jobs = [Job("evaluate_fp", run, checkpoint)]
    if measures_sharpness(config, run):
        jobs.append(Job("sharpness", run, checkpoint))
    jobs += [Job("quantize", run, checkpoint, quantization) for quantization in config["quantizations"]]
    return jobs


def planned_jobs(config: dict) -> list[Job]:
    """Every sized job of a (validated) config, trajectory by trajectory: the jobs that make its checkpoints
    (training, cooldown branches), then the measurements of each checkpoint."""
    jobs = []
    for source in sources(config):
        for run in source.names():
            jobs += source.making_jobs(run)
            for checkpoint in source.checkpoints(run):
                jobs += checkpoint_jobs(config, run, checkpoint)
    return jobs


def per_job_paths(jobs: list[Job], table: str) -> list[str]:
    """The per-job files of result table `table` that `jobs` write (relative to the results directory), pattern by
    pattern of the table (qtraj.results.TABLES), each in the jobs' order."""
    found = [(index, pattern.format(**job.fields())) for job in jobs
             for (name, index), pattern in zip(JOB_KINDS[job.rule].outputs.values(),
                                               JOB_KINDS[job.rule].output_patterns().values(), strict=True)
             if name == table]
    return [path for _, path in sorted(found, key=lambda item: item[0])]


def model_parameters(config: dict, run: str) -> float | None:
    """The parameter count that sizes a trajectory's jobs (that of the model it comes from, as its source says): a
    family file's, a local folder's, a trained model's when `resources.trained_on_gpu`; None for micro models
    trained on the CPU."""
    base = data_source(config, run)
    return source_of(config, base).parameters(base)


def model_shape(config: dict, run: str) -> ModelShape | None:
    """What sizes a trajectory's jobs beyond the parameter count (qtraj.resources.working_memory_gb): a trained
    model's config, a local folder's config.json, a family's estimate from its parameter count; None for a folder
    a rule has yet to make."""
    base = data_source(config, run)
    return source_of(config, base).shape(base)


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
    # the training batch sizes only training jobs (trained runs and their cooldowns)
    working = working_memory_gb(step, shape, data, on_gpu, config["training"])
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
        resources = step_resources(config, SIZED_KINDS[rule], run)
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
