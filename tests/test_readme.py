"""The README's measured figures are what their commands print on the committed snapshot of the default run
(bench/measured.py), and that snapshot is of the current default config."""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def measured():
    spec = importlib.util.spec_from_file_location("measured", REPO_ROOT / "bench" / "measured.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_figures_are_in_step_with_the_default_runs_snapshot(measured):
    assert measured.problems() == []


def test_the_readmes_size_and_time_of_the_default_run_are_the_snapshots(measured):
    """The README's "(N checkpoints, M jobs, ~T min on 2 cores" and its "(~T min)" next to `make run` are the
    snapshot's: its checkpoints, the job count and the jobs' span that bench/workflow_jobs.py printed for it."""
    import pyarrow.parquet as pq

    readme = measured.README.read_text()
    size = re.search(r"\((\d+)\s+checkpoints, (\d+) jobs, ~(\d+) min on 2 cores", readme)
    command = re.search(r"make run .*end to end \(~(\d+) min\)", readme)
    assert size and command, "the README no longer states the default run's size and time where this test looks"
    jobs_table = (measured.SNAPSHOT / "workflow_jobs.txt").read_text()
    jobs = int(re.search(r"^all\s+(\d+)", jobs_table, re.M).group(1))
    span_s = int(re.search(r"end in (\d+) s", jobs_table).group(1))
    checkpoints = pq.read_table(measured.SNAPSHOT / "dataset" / "fp_evals.parquet", columns=["run", "checkpoint"])
    assert (int(size.group(1)), int(size.group(2))) == (checkpoints.num_rows, jobs)
    assert int(size.group(3)) == int(command.group(1)) == round(span_s / 60)


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
