"""Trajectories from checkpoint folders on disk: a researcher's own training run, read in place.

A `local:` entry of the config names a folder with one Hugging Face model folder per checkpoint (what
`save_pretrained` or the HF Trainer writes: `step1000/`, `checkpoint-500/`, ...) and says how a subfolder maps to a
step: a name pattern with `{step}`, else the folder's own `trainer_state.json` (`global_step`) or
`qtraj_checkpoint.json`. The LR schedule, when given, fills the LR and phase columns as for hub families.

The workflow never writes into these folders: each checkpoint gets a folder of links to its allow-listed
files (weights, configs, tokenizer) in the results tree, with qtraj's metadata written beside them
(qtraj.sources.folder, which every source of folders on disk shares); deleting that folder removes links only. A
checkpoint folder deleted from disk (say by the HF Trainer's `save_total_limit`) drops out of the plan and the
dataset; its per-job results stay under evals/.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from qtraj.checkpoints import CheckpointInfo
from qtraj.families import Revision, revision_lr_and_phase, select_revisions
from qtraj.schema import ConfigError


def _pattern_regex(pattern: str) -> re.Pattern:
    """`step{step}` -> a regex with a `step` group; any other text matches literally, `*` any characters."""
    parts = re.split(r"(\{step\}|\*)", pattern)
    body = "".join({"{step}": r"(?P<step>\d+)", "*": ".*"}.get(part, re.escape(part)) for part in parts)
    return re.compile(f"^{body}$")


def _step_from_metadata(folder: Path) -> tuple[int | None, int | None]:
    """(step, tokens) a checkpoint folder records about itself: qtraj's metadata, else the HF Trainer's state."""
    qtraj = folder / "qtraj_checkpoint.json"
    if qtraj.is_file():
        data = json.loads(qtraj.read_text())
        return data.get("step"), data.get("tokens")
    trainer = folder / "trainer_state.json"
    if trainer.is_file():
        return json.loads(trainer.read_text()).get("global_step"), None
    return None, None


def discover_checkpoints(name: str, entry: dict) -> list[Revision]:
    """The checkpoints of a local trajectory in training order: the `checkpoints` the entry lists, else the
    subfolders of `path` whose names match `pattern`. Errors name the config key and what was found.

    Snakemake asks for these once per job while it builds the DAG: the folder listing is cached per entry and
    folder state (its modification time), so hundreds of checkpoints are scanned once."""
    root = Path(entry["path"])
    key = (name, json.dumps(entry, sort_keys=True, default=str),
           root.stat().st_mtime_ns if root.is_dir() else None)
    if key not in _DISCOVERED:
        _DISCOVERED[key] = _discover(name, entry)
    return _DISCOVERED[key]


_DISCOVERED: dict[tuple, list[Revision]] = {}


def _discover(name: str, entry: dict) -> list[Revision]:
    where = f"config key 'local.{name}"
    per_step = entry["tokens_per_step"]
    if entry["checkpoints"]:
        found = [Revision(item["name"], item.get("step"), item.get("tokens"), "pretraining")
                 for item in entry["checkpoints"]]
        found = [r if r.tokens is not None or r.step is None or per_step is None
                 else Revision(r.revision, r.step, r.step * per_step, r.stage) for r in found]
    else:
        root = Path(entry["path"])
        if not root.is_dir():
            raise ConfigError(f"{where}.path': {root} is not a folder; point it at the folder that holds one "
                              "subfolder per checkpoint (or list them under `checkpoints`)")
        regex = _pattern_regex(entry["pattern"])
        found = []
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            match = regex.match(folder.name)
            if not match:
                continue
            step, tokens = _step_from_metadata(folder)
            if "step" in match.groupdict():
                step = int(match["step"])
            if tokens is None and step is not None and per_step is not None:
                tokens = step * per_step
            found.append(Revision(folder.name, step, tokens, "pretraining"))
        if not found:
            names = sorted(p.name for p in root.iterdir() if p.is_dir())[:8]
            raise ConfigError(f"{where}.pattern': no subfolder of {root} matches {entry['pattern']!r} "
                              f"(subfolders: {', '.join(names) or 'none'})")
    bad = [r.revision for r in found if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.revision)]
    if bad:
        raise ConfigError(f"{where}': checkpoint folder names must be letters, digits, . _ - (not {bad[:3]})")
    found.sort(key=lambda r: (r.step is None, r.step or 0, r.revision))
    return [Revision(r.revision, r.step, r.tokens, r.stage, None, index) for index, r in enumerate(found)]


def selected_checkpoints(config: dict, name: str) -> list[Revision]:
    """The checkpoints of local trajectory `name` that its `select` picks (at least one, or an error)."""
    entry = config["local"][name]
    try:
        picked = select_revisions(discover_checkpoints(name, entry), entry["select"])
    except ConfigError as error:
        if str(error).startswith("config key"):
            raise
        raise ConfigError(f"config key 'local.{name}.select': {error}") from error
    if not picked:
        raise ConfigError(f"config key 'local.{name}.select' picks no checkpoint of {entry['path']}; widen it")
    return picked


def schedule_family(entry: dict) -> dict | None:
    """The entry's schedule in a family file's shape (qtraj.families computes LR and phase from it)."""
    if entry["schedule"] is None:
        return None
    schedule = {"warmup_steps": 0, "decay_start_step": None, "final_lr": 0.0, **entry["schedule"]}
    return {"schedule": schedule, "stages": {"pretraining": "pretraining"}}


def checkpoint_info(name: str, entry: dict, revision: Revision) -> CheckpointInfo:
    family = schedule_family(entry)
    lr, phase = (None, None) if family is None else revision_lr_and_phase(family, revision)
    return CheckpointInfo(run=name, checkpoint=revision.revision, step=revision.step, tokens=revision.tokens, lr=lr,
                          phase=phase, source="local")
