"""The README's measured figures are what their commands print on the committed snapshot of the default run
(bench/measured.py), that snapshot is of the current default config, and the run's size and job counts are what
Snakemake, `qtraj plan` and `qtraj status` count for that config."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"


@pytest.fixture(scope="module")
def measured():
    spec = importlib.util.spec_from_file_location("measured", REPO_ROOT / "bench" / "measured.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_figures_are_in_step_with_the_default_runs_snapshot(measured):
    assert measured.problems() == []


@pytest.fixture(scope="module")
def dry_run_jobs(tmp_path_factory) -> dict[str, int]:
    """Rule -> jobs of the default config's DAG, and `total`: Snakemake's own count, from a dry run in an empty
    folder (nothing is computed; the results folder is that empty folder's)."""
    folder = tmp_path_factory.mktemp("dry-run")
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["corpus"]["path"] = str(REPO_ROOT / config["corpus"]["path"])
    config["results_dir"] = str(folder / "results")
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"),
                             "--directory", str(folder), "--dry-run", "--quiet", "rules", "--cores", "1",
                             "--configfile", str(config_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stats = (result.stdout + result.stderr).split("Job stats:", 1)[1]
    return {rule: int(count) for rule, count in re.findall(r"^([\w-]+)\s+(\d+)$", stats, re.M)}


def snapshot_benchmarked_jobs(measured) -> int:
    """The jobs of the default run that wrote a benchmark file: the `all` row of bench/workflow_jobs.py's table."""
    return int(re.search(r"^all\s+(\d+)", (measured.SNAPSHOT / "workflow_jobs.txt").read_text(), re.M).group(1))


def test_the_readmes_size_and_time_of_the_default_run_are_the_snapshots(measured, dry_run_jobs):
    """The README's "(N checkpoints, M jobs, ~T min on 2 cores" and its "(~T min)" next to `make run`: the snapshot's
    checkpoints, Snakemake's job count for the default config and the jobs' span bench/workflow_jobs.py printed."""
    import pyarrow.parquet as pq

    readme = measured.README.read_text()
    size = re.search(r"\((\d+)\s+checkpoints, (\d+) jobs, ~(\d+) min on 2 cores", readme)
    command = re.search(r"make run .*end to end \(~(\d+) min\)", readme)
    assert size and command, "the README no longer states the default run's size and time where this test looks"
    span_s = int(re.search(r"end in (\d+) s", (measured.SNAPSHOT / "workflow_jobs.txt").read_text()).group(1))
    checkpoints = pq.read_table(measured.SNAPSHOT / "dataset" / "fp_evals.parquet", columns=["run", "checkpoint"])
    assert (int(size.group(1)), int(size.group(2))) == (checkpoints.num_rows, dry_run_jobs["total"])
    assert int(size.group(3)) == int(command.group(1)) == round(span_s / 60)


def test_the_four_job_counts_of_the_default_run_are_what_each_command_counts(measured, dry_run_jobs):
    """docs/measured.md's counts: Snakemake's jobs (dry run), those that write a benchmark file (the snapshot's bench
    table: every job but `all`, the aggregate, the science check, the task files and the figures), `qtraj plan`'s
    total and `qtraj status`'s jobs."""
    from qtraj.config import load_config
    from qtraj.plan import plan, totals_by_rule
    from qtraj.status import workflow_status

    text = " ".join((REPO_ROOT / "docs" / "measured.md").read_text().split())
    counts = re.search(r"\*\*(\d+) jobs\*\*: Snakemake's count.*?\*\*(\d+)\*\* of them write a benchmark file.*?"
                       r"The other (\d+) \(`all`, `aggregate`, `science_check`, (\d+) `build_task`, (\d+) figures\).*?"
                       r"\*\*(\d+)\*\* in `qtraj plan`.*?\*\*(\d+)\*\* in `qtraj status`", text)
    assert counts, "docs/measured.md no longer states the four job counts where this test looks"
    total, benchmarked, others, tasks, figures, planned, measuring = map(int, counts.groups())
    unbenchmarked = {rule: jobs for rule, jobs in dry_run_jobs.items()
                     if rule in ("all", "aggregate", "science_check", "build_task") or rule.startswith("plot_")}
    assert total == dry_run_jobs["total"]
    assert benchmarked == snapshot_benchmarked_jobs(measured) == total - sum(unbenchmarked.values())
    assert (others, tasks, figures) == (sum(unbenchmarked.values()), dry_run_jobs["build_task"],
                                        sum(jobs for rule, jobs in unbenchmarked.items() if rule.startswith("plot_")))
    config = load_config(DEFAULT_CONFIG)
    assert planned == totals_by_rule(plan(config))["total"]["jobs"]
    assert measuring == sum(status.jobs_total for status in workflow_status(config, REPO_ROOT / "no-results-here"))


def test_a_figure_typed_into_a_document_is_caught(measured, tmp_path, monkeypatch):
    document, match = next((document, match) for document in measured.documents()
                           for match in measured.BLOCK.finditer(document.read_text()))
    text = document.read_text()
    body = match.group("body")
    tampered = body.replace("0", "1", 1) if "0" in body else body + "x\n"
    copy = tmp_path / document.name
    copy.write_text(text[:match.start("body")] + tampered + text[match.end("body"):])
    others = [other for other in measured.documents() if other != document]
    monkeypatch.setattr(measured, "documents", lambda: [copy, *others])
    where = f"{document.name} block {match.group('name')!r}"
    assert measured.problems() == [f"{where} differs from what its command prints"]


def test_every_decimal_figure_of_the_science_page_is_printed_by_one_of_its_blocks(measured):
    """docs/science.md reports the decay map in prose too: each figure with a decimal point there must be what one
    of the page's measured blocks prints (which test_readme_figures_are_in_step... keeps equal to the commands), so
    a figure typed by hand, or left behind by a rerun, fails here. The protocol quotes the config, not results."""
    text = (REPO_ROOT / "docs" / "science.md").read_text()
    blocks = "\n".join(match.group("body") for match in measured.BLOCK.finditer(text))
    results = measured.BLOCK.sub("", text).split("## What it found", 1)[1]
    figures = re.findall(r"[+-]?\d[\d,]*\.\d+", results)
    assert len(figures) > 10 and [figure for figure in figures if figure not in blocks] == []
