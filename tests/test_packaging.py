"""qtraj as a wheel: built from a copy of the source, installed into a folder of its own and used from outside the
repository, so that nothing can be found through the source tree's layout (the JSON schemas are package data)."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

# Run by the installed copy, from a folder outside the repository: everything that reads the schemas.
CHECK = """
import json, sys
from importlib.metadata import version
from pathlib import Path

import qtraj
from qtraj.config import load_config, trajectories
from qtraj.families import load_family
from qtraj.schema import load_schema

repo = Path(sys.argv[1])
config = load_config(repo / "config" / "config.yaml")
family = load_family(repo / "config" / "families" / "pythia-70m.yaml")
print(json.dumps({"file": qtraj.__file__, "version": qtraj.__version__, "installed_version": version("qtraj"),
                  "schema_keys": sorted(load_schema()["properties"]), "trajectories": trajectories(config),
                  "family_repo": family["repo"]}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding qtraj installed from a wheel built here (no dependencies: the venv's serve)."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"  # a copy: building in place would leave build/ and egg-info in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    wheels = root / "wheels"
    subprocess.run([*PIP, "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels)],
                   cwd=source, check=True, capture_output=True, text=True)
    [wheel] = wheels.glob("qtraj-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"qtraj/schemas/config.schema.yaml", "qtraj/schemas/family.schema.yaml"} <= set(names), names
    site = root / "site"
    subprocess.run([*PIP, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    return site


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Python with the installed copy first on the path, in `cwd` (outside the repository)."""
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_installed_wheel_validates_configs_and_family_files_outside_the_repository(installed, tmp_path):
    result = run_installed(installed, tmp_path, "-c", CHECK, str(REPO_ROOT))
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["file"]).resolve().is_relative_to(installed.resolve())  # not the editable src/
    assert {"quantizations", "results_dir", "families_dir"} <= set(found["schema_keys"])
    assert found["trajectories"][:3] == ["wsd", "wsd-seed1", "wsd-seed2"]
    assert found["family_repo"] == "EleutherAI/pythia-70m"
    assert found["installed_version"] == found["version"]  # the wheel's metadata takes qtraj.__version__


def test_the_installed_command_line_answers(installed, tmp_path):
    import qtraj

    version = run_installed(installed, tmp_path, "-m", "qtraj.cli", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"qtraj {qtraj.__version__}", version.stderr
    plan = run_installed(installed, tmp_path, "-m", "qtraj.cli", "plan", "--format", "json",
                         "--configfile", str(REPO_ROOT / "config" / "config.yaml"))
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["totals"]["quantize"]["jobs"] > 0
