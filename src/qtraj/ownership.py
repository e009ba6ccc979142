"""What qtraj owns, so that it never deletes or rewrites what it did not write.

Snakemake deletes a job's outputs before it reruns the job, a `directory()` output with everything in it. So qtraj
works only in a results folder it created (a marker file written on first use; an earlier qtraj results folder can be
adopted explicitly), and each folder a job writes whole records what it holds (a manifest written when its job
ends): a file found there that the manifest does not list is someone else's, and the workflow stops naming it
before any job runs. Every file qtraj writes into such a folder follows the user's umask.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

RESULTS_MARKER = ".qtraj-results"
FOLDER_MANIFEST = ".qtraj-folder.json"
SNAKEMAKE_TIMESTAMP = ".snakemake_timestamp"  # Snakemake's own mark in each directory output it completed

# The folders jobs write whole (the rules' `directory()` outputs), relative to the results folder, with `*` for a
# wildcard. rules/common.smk refuses a rule whose directory output is not declared here, so this stays complete.
FOLDER_OUTPUTS = ("data/tokenizer", "data/tokenizers/*", "checkpoints/*/*", "packed/*/*/*")

# What a results folder of qtraj holds at its top level (`qtraj adopt-results` refuses a folder holding more).
RESULTS_ENTRIES = frozenset({RESULTS_MARKER, "data", "checkpoints", "evals", "training", "dataset", "figures",
                             "logs", "benchmarks", "packed", "science_check.txt", "report.html"})


class OwnershipError(RuntimeError):
    """A folder qtraj would write holds something it did not write."""


def unsafe_results_dir(results_dir: str, protected: dict[str, str | Path]) -> str | None:
    """Why `results_dir` must not be a results folder (None: it may be). `protected`: what a folder must not be nor
    contain, by name (e.g. {"your home folder": "~", "the repository": <Snakefile folder>}); the filesystem root and
    the home folder are always protected. A results folder is rewritten at will, so none of these may be it."""
    if not results_dir.strip():
        return "it is empty (outputs would be written at the filesystem root)"
    path = Path(results_dir).expanduser().resolve()
    places = {"the filesystem root": Path("/"), "your home folder": Path.home(), **protected}
    for name, place in places.items():
        place = Path(place).expanduser().resolve()
        if path == place:
            return f"it is {name} ({place})"
        if place.is_relative_to(path):
            return f"it contains {name} ({place})"
    return None


def results_dir_problem(results_dir: str, protected: dict[str, str | Path]) -> str | None:
    """The config error for a `results_dir` that must not hold results (None: it may), naming the fix."""
    reason = unsafe_results_dir(results_dir, protected)
    if reason is None:
        return None
    return (f"config key 'results_dir': {results_dir!r} cannot hold results: {reason}; name a folder of its own, "
            "e.g. results")


def claim_results_dir(results_dir: str | Path, create: bool = True) -> None:
    """Make `results_dir` qtraj's: create it with its marker when it is missing or empty (unless not `create`: a
    dry run); accept it when it carries the marker; else refuse, naming what is in it and the fix (nothing is
    written then)."""
    folder = Path(results_dir)
    if (folder / RESULTS_MARKER).is_file():
        return
    if folder.exists() and not folder.is_dir():
        raise OwnershipError(f"results_dir {folder} is a file, not a folder; choose a folder name")
    entries = sorted(item.name for item in folder.iterdir()) if folder.is_dir() else []
    if entries:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        raise OwnershipError(
            f"results_dir {folder} already holds files that qtraj did not create ({shown}) and no {RESULTS_MARKER} "
            "marker. qtraj deletes and rewrites files in its results folder, so it works only in a folder it "
            "created: choose a new or empty folder for results_dir. If this is a results folder of an earlier "
            f"qtraj (made before the marker existed, or copied without hidden files), adopt it with `qtraj "
            f"adopt-results {folder}`. Nothing was written.")
    if not create:
        return
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / RESULTS_MARKER, {"created_by": "qtraj", "note": "this folder is written by qtraj; files "
                                          "put here by hand can be deleted by a rerun"})


def adopt_results_dir(results_dir: str | Path) -> int:
    """Mark an earlier qtraj results folder as qtraj's: refuse one whose top level holds anything qtraj does not
    write; record the contents of each job-written folder that has no manifest yet (returns how many)."""
    folder = Path(results_dir)
    if not folder.is_dir():
        raise OwnershipError(f"{folder} is not a folder")
    foreign = sorted(item.name for item in folder.iterdir() if item.name not in RESULTS_ENTRIES)
    if foreign:
        raise OwnershipError(f"{folder} is not a qtraj results folder: it holds {', '.join(foreign[:6])}, which "
                             "qtraj never writes there. Move those out first, or choose another results_dir")
    sealed = 0
    for output in folder_outputs(folder):
        if not (output / FOLDER_MANIFEST).is_file():
            seal_folder(output)
            sealed += 1
    if not (folder / RESULTS_MARKER).is_file():
        _write_json(folder / RESULTS_MARKER, {"created_by": "qtraj", "adopted": True})
    return sealed


def folder_outputs(results_dir: str | Path, patterns: Iterable[str] = FOLDER_OUTPUTS) -> list[Path]:
    """The job-written folders that exist under `results_dir`."""
    root = Path(results_dir)
    return sorted(path for pattern in patterns for path in root.glob(pattern) if path.is_dir()
                  and not path.is_symlink())


def _listing(folder: Path) -> list[str]:
    """Every file and link below `folder` (links not followed), relative, without the manifest."""
    found = []
    for directory, subfolders, files in os.walk(folder):
        for name in files + [name for name in subfolders if os.path.islink(os.path.join(directory, name))]:
            relative = os.path.relpath(os.path.join(directory, name), folder)
            if relative not in (FOLDER_MANIFEST, SNAKEMAKE_TIMESTAMP):
                found.append(relative)
    return sorted(found)


def seal_folder(folder: str | Path) -> None:
    """Record what a job wrote into `folder` (its manifest)."""
    _write_json(Path(folder, FOLDER_MANIFEST), {"files": _listing(Path(folder))})


def foreign_files(folders: Iterable[str | Path]) -> list[str]:
    """Files in job-written folders that their manifest does not list. A folder without a manifest is not
    judged: a job killed mid-way (Snakemake reruns it as incomplete) or a folder from before manifests."""
    foreign = []
    for folder in map(Path, folders):
        manifest = folder / FOLDER_MANIFEST
        if not folder.is_dir() or not manifest.is_file():
            continue
        try:
            listed = set(json.loads(manifest.read_text())["files"])
        except (ValueError, KeyError, TypeError):
            listed = set()
        foreign += [str(folder / name) for name in _listing(folder) if name not in listed]
    return foreign


def check_no_foreign_files(folders: Iterable[str | Path]) -> None:
    foreign = foreign_files(folders)
    if foreign:
        shown = "\n".join(f"  {path}" for path in foreign[:20])
        more = f"\n  ... and {len(foreign) - 20} more" if len(foreign) > 20 else ""
        raise OwnershipError(
            "files that qtraj did not write are inside folders that its jobs write whole (a rerun of such a job "
            f"deletes the folder with everything in it):\n{shown}{more}\nMove them out of the results folder; "
            "nothing was run or deleted.")


def follow_umask(folder: str | Path) -> None:
    """Give the files and folders a job wrote the user's umask (libraries write some 0600, e.g. through a private
    temporary file). Links are left alone: they point at the user's or the hub cache's files."""
    from qtraj.results import current_umask

    umask = current_umask()
    for directory, _subfolders, files in os.walk(folder):
        os.chmod(directory, 0o777 & ~umask)
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def writes_folders(*arguments: str) -> Callable:
    """Declare which arguments of a workflow step name folders the step writes whole (a path, a dict of paths, or
    None). When the step succeeds, each folder gets the umask and its manifest."""

    def decorate(step: Callable) -> Callable:
        signature = inspect.signature(step)

        @functools.wraps(step)
        def wrapper(*args, **kwargs):
            result = step(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            for argument in arguments:
                value = bound.arguments.get(argument)
                for folder in value.values() if isinstance(value, dict) else [value]:
                    if folder is not None and Path(folder).is_dir():
                        follow_umask(folder)
                        seal_folder(folder)
            return result

        return wrapper

    return decorate


def _write_json(path: Path, data: dict) -> None:
    from qtraj.results import write_text_atomically

    write_text_atomically(json.dumps(data, indent=1) + "\n", path)
