"""Print per-rule job times and memory of a finished workflow run, from Snakemake's `benchmark:` files.

    .venv/bin/python bench/workflow_jobs.py [results_dir]

Shows where the wall time of `make run` goes: per rule, the number of jobs, mean and total seconds,
CPU seconds and the largest resident memory.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import duckdb


def main(results_dir: str = "results") -> None:
    root = Path(results_dir) / "benchmarks"
    files = sorted(root.rglob("*.tsv"))
    if not files:
        sys.exit(f"no benchmark files under {root}: run the workflow first")
    by_rule: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        by_rule[path.relative_to(root).parts[0].removesuffix(".tsv")].append(path)
    connection = duckdb.connect()
    print(f"{'rule':<20}{'jobs':>6}{'mean s':>10}{'total s':>10}{'cpu s':>10}{'max rss MB':>12}")
    totals = [0, 0.0, 0.0]
    for rule, paths in sorted(by_rule.items()):
        listing = ", ".join(f"'{path}'" for path in paths)
        jobs, mean, total, cpu, rss = connection.execute(
            f"SELECT count(*), avg(s), sum(s), sum(cpu_time), max(max_rss) FROM read_csv([{listing}], delim='\t')"
        ).fetchone()
        totals = [totals[0] + jobs, totals[1] + total, totals[2] + (cpu or 0)]
        print(f"{rule:<20}{jobs:>6}{mean:>10.2f}{total:>10.1f}{cpu or 0:>10.1f}{rss or 0:>12.0f}")
    print(f"{'all':<20}{totals[0]:>6}{'':>10}{totals[1]:>10.1f}{totals[2]:>10.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
