"""The README's measured figures are what their commands print on the committed snapshot of the default run
(bench/measured.py), and that snapshot is of the current default config."""

from __future__ import annotations

import importlib.util

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


def test_a_figure_typed_into_the_readme_is_caught(measured, tmp_path, monkeypatch):
    text = measured.README.read_text()
    match = next(measured.BLOCK.finditer(text))  # the science check's
    body = match.group("body")
    tampered = body.replace("0", "1", 1) if "0" in body else body + "x\n"
    readme = tmp_path / "README.md"
    readme.write_text(text[:match.start("body")] + tampered + text[match.end("body"):])
    monkeypatch.setattr(measured, "README", readme)
    assert measured.problems() == [f"README.md block {match.group('name')!r} differs from what its command prints"]
