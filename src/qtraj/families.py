"""Model families on the Hugging Face hub: one YAML file each, expanded into revisions with step, tokens,
LR and phase, and narrowed down by the selectors of the main config.

A family file is declarative (config/README.md, "Family files"); everything the DAG needs from it comes from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from qtraj.schedules import Schedule, lr_at, phase_at
from qtraj.schema import FAMILY_SCHEMA_PATH, ConfigError, load_schema, read_yaml
from qtraj.schema import validate_against as _validate


@dataclass(frozen=True)
class Revision:
    """One checkpoint of a family: a hub revision (branch) and where it sits in training."""

    revision: str
    step: int | None
    tokens: int | None
    stage: str
    commit: str | None = None
    index: int = 0  # position in the family's revision list (training order)


def load_family(path: str | Path) -> dict:
    """Read and validate a family file (defaults filled); errors name the file and the key. Cached per file
    (Snakemake asks for the same family once per job): treat the result as read-only."""
    path = Path(path).resolve()
    key = (str(path), path.stat().st_mtime_ns if path.exists() else None)
    if key not in _LOADED:
        _LOADED[key] = _read_family(path)
    return _LOADED[key]


_LOADED: dict[tuple, dict] = {}


def _read_family(path: Path) -> dict:
    try:
        family = read_yaml(path)
    except ConfigError as error:
        raise ConfigError(f"family file {error}") from None
    if not isinstance(family, dict):
        raise ConfigError(f"family file {path} must be a mapping of keys to values")
    try:
        _validate(family, load_schema(FAMILY_SCHEMA_PATH))
        check_family(family)
    except ConfigError as error:
        raise ConfigError(f"family file {path}: {error}") from error
    return family


def check_family(family: dict) -> None:
    """What the schema cannot say: stages are declared, names unique, remote code pinned, ranges sensible."""
    revisions = expand_revisions(family)
    for revision in revisions:
        if revision.stage not in family["stages"]:
            raise ConfigError(f"revision {revision.revision!r} has stage {revision.stage!r}, which `stages` does "
                              f"not declare (declared: {', '.join(family['stages'])}); a revision without `stage:` "
                              "is in stage pretraining")
    names = [revision.revision for revision in revisions]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"revisions listed twice: {', '.join(duplicates[:5])}")
    if family["schedule"] is not None:  # a family without one is fine: its revisions get null LR and phase
        check_schedule(family)
    for number, series in enumerate(family["revision_ranges"]):
        if series["stop"] < series["start"]:
            raise ConfigError(f"revision_ranges.{number}: stop {series['stop']} is below start {series['start']}")


def check_schedule(family: dict) -> None:
    schedule = family["schedule"]
    if schedule["type"] == "wsd" and schedule["decay_start_step"] is None:
        raise ConfigError("schedule.decay_start_step is required for a wsd schedule")
    if schedule["decay_start_step"] is not None and schedule["decay_start_step"] >= schedule["total_steps"]:
        raise ConfigError(f"schedule.decay_start_step {schedule['decay_start_step']} must be below total_steps "
                          f"{schedule['total_steps']}")
    family_schedule(family)  # raises ConfigError for impossible schedules


def family_schedule(family: dict) -> Schedule:
    """The family's pretraining schedule as a qtraj `Schedule` (absolute steps)."""
    spec = family["schedule"]
    total = spec["total_steps"]
    decay_start = spec["decay_start_step"] if spec["decay_start_step"] is not None else total - 1
    # passed only when given, so that Schedule's default is the one default (a local folder's schedule, qtraj.local,
    # never has the key)
    shape = {"decay_shape": spec["decay_shape"]} if "decay_shape" in spec else {}
    try:
        return Schedule(kind=spec["type"], peak_lr=spec["peak_lr"], total_steps=total,
                        warmup_steps=spec["warmup_steps"],
                        decay_fraction=max(1, total - decay_start) / total,
                        final_lr_fraction=spec["final_lr"] / spec["peak_lr"], **shape)
    except ValueError as error:
        raise ConfigError(f"schedule: {error}") from error


def expand_revisions(family: dict) -> list[Revision]:
    """Every revision of the family, explicit ones and those of `revision_ranges`, in training order.

    Order: by stage in the order `stages` lists them, then by step (revisions without a step, like `main`, last
    in their stage).
    """
    found = [Revision(entry["revision"], entry.get("step"), entry.get("tokens"), entry["stage"], entry.get("commit"))
             for entry in family["revisions"]]
    for series in family["revision_ranges"]:
        per_step = series["tokens_per_step"] or family["tokens_per_step"]
        for index, step in enumerate(range(series["start"], series["stop"] + 1, series["every"])):
            tokens = None if per_step is None else series["tokens_offset"] + step * per_step
            fields = {"step": step, "index": index,
                      "tokens_b": None if tokens is None else round(tokens / 1e9)}
            try:
                name = series["template"].format(**fields)
            except (KeyError, ValueError, TypeError) as error:
                raise ConfigError(f"revision template {series['template']!r} cannot be filled: {error} "
                                  "(placeholders: {step}, {index}, {tokens_b})") from error
            found.append(Revision(name, step, tokens, series["stage"]))
    stage_order = {stage: number for number, stage in enumerate(family["stages"])}
    found.sort(key=lambda r: (stage_order.get(r.stage, len(stage_order)), r.step is None, r.step or 0))
    return [Revision(r.revision, r.step, r.tokens, r.stage, r.commit, index) for index, r in enumerate(found)]


def revision_lr_and_phase(family: dict, revision: Revision) -> tuple[float | None, str | None]:
    """The LR the schedule gives at the revision's step, and its phase.

    Pretraining stages get warmup / stable / decay from the schedule (both null for a family whose file gives no
    schedule); annealing and post-training stages are named by their stage, and their LR is left null (their
    schedules are not the pretraining one).
    """
    kind = family["stages"][revision.stage]
    if kind != "pretraining":
        return None, kind
    if family["schedule"] is None:
        return None, None
    if revision.step is None:
        return None, "decay" if family["schedule"]["type"] != "constant" else "stable"
    schedule = family_schedule(family)
    step = min(revision.step, schedule.total_steps)
    return lr_at(schedule, max(step, 1)), phase_at(schedule, step)


def select_revisions(revisions: list[Revision], selector: dict) -> list[Revision]:
    """The revisions a config's selector picks, in training order.

    Filters apply in this order: `stages` (names), `tokens` ([min, max], either may be null), `every` (every
    N-th of what is left, counted from the last, so the final checkpoint is always kept), `last` (the last K);
    `revisions` names revisions explicitly: added to what the filters pick, or, with no filter, the only ones
    picked. An empty selector picks every revision.
    """
    filters = ("stages", "tokens", "every", "last")
    picked = [] if selector.get("revisions") and not any(selector.get(key) for key in filters) else list(revisions)
    if selector.get("stages"):
        unknown = set(selector["stages"]) - {r.stage for r in revisions}
        if unknown:
            raise ConfigError(f"selector stages {sorted(unknown)} do not exist; stages: "
                              f"{sorted({r.stage for r in revisions})}")
        picked = [r for r in picked if r.stage in selector["stages"]]
    if selector.get("tokens"):
        low, high = selector["tokens"]
        low, high = -math.inf if low is None else low, math.inf if high is None else high
        picked = [r for r in picked if r.tokens is not None and low <= r.tokens <= high]
    if selector.get("every"):
        picked = picked[::-1][:: selector["every"]][::-1]
    if selector.get("last"):
        picked = picked[-selector["last"]:]
    if selector.get("revisions"):
        by_name = {r.revision: r for r in revisions}
        unknown = [name for name in selector["revisions"] if name not in by_name]
        if unknown:
            raise ConfigError(f"selector names revisions the family does not list: {', '.join(unknown)}")
        chosen = {r.revision for r in picked} | set(selector["revisions"])
        picked = [r for r in revisions if r.revision in chosen]
    return picked


def configured_family(config: dict, slug: str) -> dict:
    """The family file the config names as `families.<slug>`; a missing file names the ones that exist."""
    folder = Path(config["families_dir"])
    path = folder / f"{slug}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ConfigError(f"config key 'families.{slug}': there is no family file {path}; families in "
                          f"{folder}: {', '.join(known) or 'none'}")
    return load_family(path)


def selected_revisions(config: dict, slug: str) -> list[Revision]:
    """The revisions of family `slug` that the config's selector picks (at least one, or an error)."""
    family = configured_family(config, slug)
    try:
        picked = select_revisions(expand_revisions(family), config["families"][slug]["select"])
    except ConfigError as error:
        raise ConfigError(f"config key 'families.{slug}.select': {error}") from error
    if not picked:
        raise ConfigError(f"config key 'families.{slug}.select' picks no revision of {family['repo']}; widen it")
    return picked


# the keys of a family file that change what a download job produces (the rest is documentation or other revisions)
DOWNLOAD_KEYS = ("repo", "trust_remote_code", "allow_pickle", "gated")


def checkpoint_source(config: dict, slug: str, name: str) -> dict:
    """The params of one revision's download job: the family's download settings, the revision itself (without its
    position in the family's list) and the LR and phase its rows carry. Nothing else of the family file, so that
    adding a revision, editing `notes:` or reordering the file reruns no existing job."""
    from dataclasses import asdict

    family = configured_family(config, slug)
    revision = revision_of(config, slug, name)
    lr, phase = revision_lr_and_phase(family, revision)
    return {"family": {key: family[key] for key in DOWNLOAD_KEYS},
            "revision": {**asdict(revision), "index": 0}, "lr": lr, "phase": phase}


def revision_of(config: dict, slug: str, name: str) -> Revision:
    for revision in selected_revisions(config, slug):
        if revision.revision == name:
            return revision
    raise KeyError(f"family {slug!r} has no selected revision {name!r}")
