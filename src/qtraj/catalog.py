"""The catalog of model family files (`qtraj families`): one line per family of a folder, read and validated as the
workflow reads them (qtraj.families), and, with `--verify`, each file checked against the hub's branches."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
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
    caveat: str  # a known way its results can be silently wrong; printed as a warning


def default_families_dir() -> str:
    """Where a config looks for family files unless it says otherwise (the schema's `families_dir` default)."""
    return load_schema(SCHEMA_PATH)["properties"]["families_dir"]["default"]


def describe_schedule(schedule: dict | None) -> str:
    """A family's pretraining schedule in a few words, e.g. `wsd 0.0003→3e-05, 10,000 steps, decay from 9,000`."""
    if schedule is None:
        return "unknown"
    text = f"{schedule['type']} {schedule['peak_lr']:g}→{schedule['final_lr']:g}, {schedule['total_steps']:,} steps"
    if schedule.get("decay_start_step") is not None:
        # the shape is named only where the file names one: a file without it decays linearly (Schedule's default)
        decay = f"{schedule['decay_shape']} decay" if schedule.get("decay_shape") else "decay"
        text += f", {decay} from {schedule['decay_start_step']:,}"
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
                       schedule=describe_schedule(family["schedule"]), caveat=family["caveat"].strip())


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


def caveat_warnings(entries: list[FamilyEntry]) -> list[str]:
    """One warning per family whose file declares a caveat, naming the family: results of such a family can be
    wrong without any error, so the catalog says so wherever it lists them."""
    return [f"warning: family {entry.slug!r}: {entry.caveat}" for entry in entries if entry.caveat]


# --- the catalog against the hub (`qtraj families --verify`) ---------------------------------------------------------

HUB_TIMEOUT_S = 30.0  # a hub that has not answered by then is reported unreachable instead of waited on forever
LISTED_NAMES = 10  # revisions named per list in the text report; --format json lists them all


class HubUnreachable(RuntimeError):
    """The hub cannot be asked (HF_HUB_OFFLINE is set, or no connection): nothing was verified."""


@dataclass(frozen=True)
class Verification:
    """One family file against the hub. `problems` each name the cause and the fix; none means the file's
    revisions all exist. Hub branches the file does not list (`extra`) are no problem: files may list a subset."""

    slug: str
    repo: str
    hub_repo: str | None  # the id the hub answers to (another one after a rename); None when it could not be asked
    revisions: int  # how many revisions the file lists
    missing: list[str] = field(default_factory=list)  # revisions of the file that are no branch or tag on the hub
    extra: list[str] = field(default_factory=list)  # hub branches the file does not list
    problems: list[str] = field(default_factory=list)


def natural_key(name: str) -> list:
    """Sort key that puts step9 before step10 (digits compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def compare_revisions(listed: list[str], branches: list[str], tags: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(revisions of the file the hub lacks, in the file's order; hub branches the file lacks, in natural order).
    A revision may name a tag too; only branches count as unlisted, since tags mark versions, not checkpoints."""
    on_hub = set(branches) | set(tags)
    listed_set = set(listed)
    return ([name for name in listed if name not in on_hub],
            sorted((name for name in branches if name not in listed_set), key=natural_key))


def verify_family(slug: str, family: dict, api) -> Verification:
    """Ask the hub (through `api`, an `HfApi` or anything with its `model_info` and `list_repo_refs`) for the repo's
    id, gating and branches, and compare them with the family file. Raises HubUnreachable when there is no hub."""
    import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    repo = family["repo"]
    listed = [revision.revision for revision in expand_revisions(family)]
    result = {"slug": slug, "repo": repo, "revisions": len(listed)}
    try:
        info = api.model_info(repo, timeout=HUB_TIMEOUT_S)
        refs = api.list_repo_refs(repo)
    except (OfflineModeIsEnabled, httpx.TransportError) as error:
        raise HubUnreachable(unreachable_message(error)) from None
    except GatedRepoError:  # before RepositoryNotFoundError, whose subclass it is
        fix = "" if family["gated"] else "; and set `gated: true` in the family file"
        return Verification(**result, hub_repo=None, problems=[
            f"{repo} is gated and the token in use may not read it (branches not checked): accept its terms at "
            f"https://huggingface.co/{repo}, make a read token available (HF_TOKEN or `hf auth login`) and rerun{fix}"])
    except RepositoryNotFoundError:
        return Verification(**result, hub_repo=None, problems=[
            f"the hub has no repo {repo!r} (deleted, private to others, or misspelt; a renamed repo would still "
            "answer under its old id): fix `repo:` in the family file"])
    except HfHubHTTPError as error:
        return Verification(**result, hub_repo=None, problems=[
            f"the hub answered {repo} with HTTP {error.response.status_code} (branches not checked): rerun later"])
    missing, extra = compare_revisions(listed, [ref.name for ref in refs.branches], [ref.name for ref in refs.tags])
    return Verification(**result, hub_repo=info.id, missing=missing, extra=extra,
                        problems=hub_problems(family, info.id, bool(info.gated), missing))


def hub_problems(family: dict, hub_repo: str, hub_gated: bool, missing: list[str]) -> list[str]:
    """What the file says that the hub contradicts, each with its fix."""
    repo, problems = family["repo"], []
    if hub_repo != repo:
        # the hub client follows the rename's redirect, so the id it answers with is the only sign of a rename
        problems.append(f"{repo} is now {hub_repo} on the hub (renamed; the old id still redirects): set "
                        f"`repo: {hub_repo}` in the family file (this reruns its download jobs)")
    if hub_gated != family["gated"]:
        problems.append(f"the hub says {repo} is {'gated' if hub_gated else 'not gated'}: set "
                        f"`gated: {str(hub_gated).lower()}` in the family file")
    if missing:
        shown = ", ".join(missing[:LISTED_NAMES]) + (", …" if len(missing) > LISTED_NAMES else "")
        problems.append(f"{len(missing)} revision(s) of the file are no branch of {repo}: {shown}; fix or drop "
                        "them in the family file (--format json lists every hub branch the file lacks)")
    return problems


def unreachable_message(error: BaseException | None) -> str:
    # one line whatever the library's message holds: the command's whole answer is this line
    why = "HF_HUB_OFFLINE is set" if error is None else " ".join(f"{type(error).__name__}: {error}".split())
    return (f"cannot verify family files: the hub cannot be reached ({why}); rerun `qtraj families --verify` on "
            "a machine with network access to huggingface.co (and without HF_HUB_OFFLINE)")


def verify_catalog(folder: str | Path, name: str | None = None, api=None) -> list[Verification]:
    """Every family file of `folder` (or only `<name>.yaml`) against the hub. A file that does not validate is
    reported as its problem; without a hub (HF_HUB_OFFLINE, no connection) raises HubUnreachable, having checked
    nothing further."""
    from huggingface_hub import constants

    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"no family folder {folder}: pass --families-dir (a config's `families_dir`)")
    paths = sorted(folder.glob("*.yaml"))
    if name is not None:
        paths = [path for path in paths if path.stem == name]
        if not paths:
            known = ", ".join(path.stem for path in sorted(folder.glob("*.yaml"))) or "none"
            raise ConfigError(f"--verify {name}: there is no family file {folder / (name + '.yaml')}; families: "
                              f"{known}")
    if constants.is_offline_mode():  # huggingface_hub would refuse each call; say it once
        raise HubUnreachable(unreachable_message(None))
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    results = []
    for path in paths:
        try:
            family = load_family(path)
        except ConfigError as error:
            results.append(Verification(slug=path.stem, repo="?", hub_repo=None, revisions=0, problems=[str(error)]))
            continue
        results.append(verify_family(path.stem, family, api))
    return results


def render_verification(results: list[Verification]) -> str:
    """Per family: a line saying how many of its revisions the hub has and which hub branches it lacks, then one
    indented line per problem."""
    lines = []
    for result in results:
        head = f"{result.slug} ({result.repo}): "
        if result.hub_repo is None:
            head += "not checked"
        else:
            head += f"{result.revisions - len(result.missing)} of {result.revisions} revisions on the hub"
            if result.extra:
                shown = ", ".join(result.extra[:LISTED_NAMES]) + (", …" if len(result.extra) > LISTED_NAMES else "")
                head += f"; {len(result.extra)} hub branch(es) not in the file: {shown}"
        lines.append(head)
        lines.extend(f"  ! {problem}" for problem in result.problems)
    return "\n".join(lines)
