"""The catalog of model family files (`qtraj families`): one line per family of a folder, read and validated as the
workflow reads them (qtraj.families)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qtraj.families import expand_revisions, load_family
from qtraj.schema import SCHEMA_PATH, ConfigError, load_schema
from qtraj.texttable import text_table


@dataclass(frozen=True)
class FamilyEntry:
    slug: str  # the file's name: what a config's `families:` names
    name: str
    repo: str
    revisions: int
    parameters: float
    architecture: str
    gated: bool
    schedule: str


def default_families_dir() -> str:
    """Where a config looks for family files unless it says otherwise (the schema's `families_dir` default)."""
    return load_schema(SCHEMA_PATH)["properties"]["families_dir"]["default"]


def describe_schedule(schedule: dict | None) -> str:
    """A family's pretraining schedule in a few words, e.g. `wsd 0.0003→3e-05, 10,000 steps, decay from 9,000`."""
    if schedule is None:
        return "unknown"
    text = f"{schedule['type']} {schedule['peak_lr']:g}→{schedule['final_lr']:g}, {schedule['total_steps']:,} steps"
    if schedule.get("decay_start_step") is not None:
        text += f", decay from {schedule['decay_start_step']:,}"
    return text


def format_parameters(parameters: float) -> str:
    """1.18e9 -> 1.18B, 7.0e7 -> 70M."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if parameters >= scale:
            return f"{parameters / scale:.3g}{suffix}"
    return f"{parameters:g}"


def family_entry(path: Path) -> FamilyEntry:
    family = load_family(path)
    return FamilyEntry(slug=path.stem, name=family["name"], repo=family["repo"],
                       revisions=len(expand_revisions(family)), parameters=family["parameters"],
                       architecture=family["architecture"], gated=family["gated"],
                       schedule=describe_schedule(family["schedule"]))


def family_catalog(folder: str | Path) -> tuple[list[FamilyEntry], list[str]]:
    """Every family file (`*.yaml`) of `folder`, by slug, and the problems of those that do not validate (each names
    its file and key); a folder that does not exist is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"no family folder {folder}: pass --families-dir (a config's `families_dir`)")
    entries, problems = [], []
    for path in sorted(folder.glob("*.yaml")):
        try:
            entries.append(family_entry(path))
        except ConfigError as error:
            problems.append(str(error))
    return entries, problems


def render_catalog(entries: list[FamilyEntry]) -> str:
    return text_table(["family", "repo", "revisions", "parameters", "architecture", "schedule", "gated"],
                      [[entry.slug, entry.repo, entry.revisions, format_parameters(entry.parameters),
                        entry.architecture or "?", entry.schedule, "yes" if entry.gated else ""] for entry in entries],
                      right={2, 3})
