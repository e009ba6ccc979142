"""Where the wall time of a finished workflow run goes: per rule, jobs, seconds, CPU, memory, and the share that is
process start-up rather than work; then the results directory's disk use.

    .venv/bin/python bench/workflow_jobs.py [results_dir] [--compare other_results_dir]

Job figures come from Snakemake's `benchmark:` files and the job logs beside them. Start-up is measured, not guessed:
for a job run on the job server (qtraj.jobserver), its wall time minus its step's own time (the log's "done in"
line: the adapter's Python, Snakemake's script preamble, the connection, the fork), and its CPU adds the worker's
(the log's "job server worker" line, which Snakemake's benchmark cannot see); for a job run in its own process, what
a fresh process of its kind spends importing and loading a tiny model (bench/startup.py, with qtraj's start-up hook
as jobs run it), median CPU seconds of 3. `--compare` prints the CPU per (checkpoint, quantization) of two runs'
quantize and evaluation jobs side by side (e.g. a run of an older qtraj that quantized and evaluated in separate
jobs).
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import JOB_KINDS, run_once, tiny_model  # noqa: E402 - the sibling bench, measured the same way

PLAIN = ""  # `from qtraj import steps` only: corpus, tokenizer, aggregate jobs
PLOT = "\nimport matplotlib.pyplot\nimport duckdb\nimport qtraj.plotting\n"
# rule (prefix) -> what its job imports, as bench/startup.py's job kinds
RULE_KINDS = {
    "train": JOB_KINDS["train, sharpness: torch + transformers, Llama load"],
    "cooldown": JOB_KINDS["train, sharpness: torch + transformers, Llama load"],
    "sharpness": JOB_KINDS["train, sharpness: torch + transformers, Llama load"],
    "average_checkpoints": JOB_KINDS["train, sharpness: torch + transformers, Llama load"],
    "evaluate_fp": JOB_KINDS["evaluate_fp/quantized: + AutoTokenizer + lm-eval"],
    "evaluate_quantized": JOB_KINDS["evaluate_fp/quantized: + AutoTokenizer + lm-eval"],
    "quantize": JOB_KINDS["quantize rtn/gptq/awq: + llm-compressor"] + """
from lm_eval import evaluator
from lm_eval.models.huggingface import HFLM
""",
    "plot": PLOT,
}


def kind_of(rule: str) -> str:
    """The imports of a rule's job (benchmark folders are named by rule: `train`, `quantize`, `plot_loss`...)."""
    if rule.startswith("plot"):
        return RULE_KINDS["plot"]
    return RULE_KINDS.get(rule, PLAIN)


def startup_seconds(kinds: set[str]) -> dict[str, float]:
    """Median start-up CPU seconds (3 fresh processes) of each job kind's imports."""
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model(Path(folder, "tiny-llama"))
        return {kind: statistics.median(run_once(kind, model, hook=True)[0] for _ in range(3)) for kind in kinds}


STEP_LINE = re.compile(r"INFO qtraj: step \S+ (in a worker forked from the job server|in its own process)")
DONE_LINE = re.compile(r"INFO qtraj: step \S+ done in ([0-9.]+) s")
WORKER_LINE = re.compile(r"job server worker \d+: exit -?\d+, cpu_s ([0-9.]+), max_rss_mb ([0-9.]+)")


@dataclass
class JobFigures:
    seconds: float  # wall, Snakemake's benchmark
    ended: float  # the benchmark file's modification time: when the job ended
    cpu: float  # the adapter's (benchmark) plus, on the job server, its worker's (job log)
    rss_mb: float
    on_server: bool
    step_seconds: float | None  # the step itself, from the job log


def job_figures(benchmark: Path, log_file: Path) -> JobFigures:
    with benchmark.open() as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    seconds, cpu = float(row["s"]), float(row["cpu_time"] or 0)
    rss = float(row["max_rss"]) if row["max_rss"] not in ("", "NA", "-") else 0.0
    text = log_file.read_text(errors="replace") if log_file.is_file() else ""
    where, done, worker = STEP_LINE.search(text), DONE_LINE.search(text), WORKER_LINE.search(text)
    on_server = bool(where and where.group(1).startswith("in a worker"))
    if worker:
        cpu += float(worker.group(1))
        rss = max(rss, float(worker.group(2)))
    return JobFigures(seconds, benchmark.stat().st_mtime, cpu, rss, on_server,
                      float(done.group(1)) if done else None)


def rule_figures(results_dir: Path) -> dict[str, list[JobFigures]]:
    """rule -> its jobs' figures, from the benchmark files and the job logs beside them."""
    root = results_dir / "benchmarks"
    by_rule: dict[str, list[JobFigures]] = defaultdict(list)
    for path in sorted(root.rglob("*.tsv")):
        relative = path.relative_to(root)
        log_file = results_dir / "logs" / relative.with_suffix(".log")
        by_rule[relative.parts[0].removesuffix(".tsv")].append(job_figures(path, log_file))
    if not by_rule:
        sys.exit(f"no benchmark files under {root}: run the workflow first")
    return dict(sorted(by_rule.items()))


def startup_of(job: JobFigures, fresh_process_startup: float) -> float:
    """A job's start-up: on the job server, everything but the step (measured); in its own process, what a fresh
    process of its kind spends importing (bench/startup.py), since its step's lazy imports are not separable."""
    if job.on_server and job.step_seconds is not None:
        return max(0.0, job.seconds - job.step_seconds)
    return min(fresh_process_startup, job.seconds)


def quantized_cpu(results_dir: Path) -> dict[str, float]:
    """CPU seconds per (run/checkpoint/quantization): the quantize job (with its job-server worker) plus, where it
    exists, the separate evaluation job of older runs."""
    totals: dict[str, float] = defaultdict(float)
    for rule in ("quantize", "evaluate_quantized"):
        for path in sorted((results_dir / "benchmarks" / rule).rglob("*.tsv")):
            relative = path.relative_to(results_dir / "benchmarks")
            key = str(path.relative_to(results_dir / "benchmarks" / rule).with_suffix(""))
            totals[key] += job_figures(path, results_dir / "logs" / relative.with_suffix(".log")).cpu
    return totals


def disk_use(results_dir: Path) -> list[tuple[str, float]]:
    """MB per top-level folder of the results directory (links into a hub cache are not counted)."""
    sizes = []
    for folder in sorted(path for path in results_dir.iterdir() if path.is_dir()):
        total = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
        sizes.append((folder.name, total / 1e6))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", nargs="?", default="results")
    parser.add_argument("--compare", help="another run's results directory")
    args = parser.parse_args()
    results_dir = Path(args.results_dir)
    figures = rule_figures(results_dir)
    fresh = [rule for rule, jobs in figures.items() if not all(job.on_server for job in jobs)]
    startup = startup_seconds({kind_of(rule) for rule in fresh}) if fresh else {}
    print(f"{'rule':<22}{'jobs':>6}{'server':>8}{'mean s':>9}{'total s':>10}{'cpu s':>9}{'max rss MB':>12}"
          f"{'start-up s':>12}{'share':>7}")
    totals = defaultdict(float)
    for rule, jobs in figures.items():
        total = sum(job.seconds for job in jobs)
        paid = sum(startup_of(job, startup.get(kind_of(rule), 0.0)) for job in jobs)
        cpu, served = sum(job.cpu for job in jobs), sum(job.on_server for job in jobs)
        totals["jobs"] += len(jobs)
        totals["served"] += served
        totals["total"] += total
        totals["cpu"] += cpu
        totals["startup"] += paid
        print(f"{rule:<22}{len(jobs):>6}{served:>8}{total / len(jobs):>9.2f}{total:>10.1f}{cpu:>9.1f}"
              f"{max(job.rss_mb for job in jobs):>12.0f}{paid:>12.1f}{paid / total:>7.0%}")
    print(f"{'all':<22}{int(totals['jobs']):>6}{int(totals['served']):>8}{'':>9}{totals['total']:>10.1f}"
          f"{totals['cpu']:>9.1f}{'':>12}{totals['startup']:>12.1f}{totals['startup'] / totals['total']:>7.0%}")
    every = [job for jobs in figures.values() for job in jobs]
    span = max(job.ended for job in every) - min(job.ended - job.seconds for job in every)
    print(f"jobs with a benchmark ran from the first one's start to the last one's end in {span:.0f} s "
          f"({int(span // 60)} min {span % 60:.0f} s); the job time above is {totals['total'] / span:.2f}x that")
    print("start-up: jobs on the job server (column server): wall time minus the step's own time, from the job "
          "log; others: a fresh process's imports (bench/startup.py)"
          + (", CPU s measured now: " + ", ".join(f"{rule}: {startup[kind_of(rule)]:.2f}" for rule in fresh)
             if fresh else ""))
    print("disk (MB): " + ", ".join(f"{name} {size:.1f}" for name, size in disk_use(results_dir))
          + " — no quantized model is written (quantize jobs hold it in memory)")
    if args.compare:
        ours, theirs = quantized_cpu(results_dir), quantized_cpu(Path(args.compare))
        shared = sorted(set(ours) & set(theirs))
        if not shared:
            sys.exit("the two runs share no (run, checkpoint, quantization)")
        mean_ours = statistics.mean(ours[key] for key in shared)
        mean_theirs = statistics.mean(theirs[key] for key in shared)
        print(f"CPU s per (checkpoint, quantization) over {len(shared)} shared: this run {mean_ours:.2f}, "
              f"{args.compare} {mean_theirs:.2f} ({mean_theirs / mean_ours:.2f}x)")


if __name__ == "__main__":
    main()
