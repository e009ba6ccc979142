"""Where the wall time of a finished workflow run goes: per rule, jobs, seconds, CPU, memory, and the share that is
process start-up rather than work; then the results directory's disk use.

    .venv/bin/python bench/workflow_jobs.py [results_dir] [--compare other_results_dir]

Job figures come from Snakemake's `benchmark:` files. Start-up per job is measured here, not guessed: for each
kind of job, a fresh process imports what that kind's script imports and loads a tiny model (bench/startup.py,
with qtraj's start-up hook as jobs run it), median CPU seconds of 3; jobs run one thread, so a job's start-up CPU
is its start-up wall time. `--compare` prints the CPU per (checkpoint, quantization) of the two runs' quantize and
evaluation jobs side by side (e.g. a run of an older qtraj that quantized and evaluated in separate jobs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import duckdb

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


def rule_figures(results_dir: Path) -> dict[str, tuple]:
    """rule -> (jobs, mean s, total s, cpu s, max rss MB) from the benchmark files."""
    root = results_dir / "benchmarks"
    by_rule: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*.tsv")):
        by_rule[path.relative_to(root).parts[0].removesuffix(".tsv")].append(path)
    if not by_rule:
        sys.exit(f"no benchmark files under {root}: run the workflow first")
    connection = duckdb.connect()
    figures = {}
    for rule, paths in sorted(by_rule.items()):
        listing = ", ".join(f"'{path}'" for path in paths)
        figures[rule] = connection.execute(
            f"SELECT count(*), avg(s), sum(s), sum(cpu_time), max(max_rss) FROM read_csv([{listing}], delim='\t')"
        ).fetchone()
    return figures


def quantized_cpu(results_dir: Path) -> dict[str, float]:
    """CPU seconds per (run/checkpoint/quantization): the quantize job plus, where it exists, the separate
    evaluation job of older runs."""
    totals: dict[str, float] = defaultdict(float)
    connection = duckdb.connect()
    for rule in ("quantize", "evaluate_quantized"):
        for path in sorted((results_dir / "benchmarks" / rule).rglob("*.tsv")):
            key = str(path.relative_to(results_dir / "benchmarks" / rule).with_suffix(""))
            totals[key] += connection.execute(f"SELECT sum(cpu_time) FROM read_csv('{path}', delim='\t')").fetchone()[0]
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
    startup = startup_seconds({kind_of(rule) for rule in figures})
    print(f"{'rule':<22}{'jobs':>6}{'mean s':>9}{'total s':>10}{'cpu s':>9}{'max rss MB':>12}{'start-up s':>12}"
          f"{'share':>7}")
    totals = defaultdict(float)
    for rule, (jobs, mean, total, cpu, rss) in figures.items():
        paid = min(jobs * startup[kind_of(rule)], total)
        totals["jobs"] += jobs
        totals["total"] += total
        totals["cpu"] += cpu or 0
        totals["startup"] += paid
        print(f"{rule:<22}{jobs:>6}{mean:>9.2f}{total:>10.1f}{cpu or 0:>9.1f}{rss or 0:>12.0f}{paid:>12.1f}"
              f"{paid / total:>7.0%}")
    print(f"{'all':<22}{int(totals['jobs']):>6}{'':>9}{totals['total']:>10.1f}{totals['cpu']:>9.1f}{'':>12}"
          f"{totals['startup']:>12.1f}{totals['startup'] / totals['total']:>7.0%}")
    print("start-up per job (CPU s, measured now): "
          + ", ".join(f"{rule}: {startup[kind_of(rule)]:.2f}" for rule in figures))
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
