"""Trajectories from checkpoint folders on disk: a researcher's own training run, read in place.

A `local:` entry of the config names a folder with one Hugging Face model folder per checkpoint (what
`save_pretrained` or the HF Trainer writes: `step1000/`, `checkpoint-500/`, ...) and says how a subfolder maps to a
step: a name pattern with `{step}`, else the folder's own `trainer_state.json` (`global_step`) or
`qtraj_checkpoint.json`. The LR schedule, when given, fills the LR and phase columns as for hub families.

The workflow never writes into these folders: each checkpoint gets a folder of links to its allow-listed
files (weights, configs, tokenizer) in the results tree, with qtraj's metadata written beside them; deleting that
folder removes links only. A checkpoint folder deleted from disk (say by the HF Trainer's `save_total_limit`)
drops out of the plan and the dataset; its per-job results stay under evals/.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from fnmatch import fnmatch
from pathlib import Path

from qtraj.checkpoints import CheckpointInfo, write_checkpoint_info
from qtraj.families import Revision, revision_lr_and_phase, select_revisions
from qtraj.schema import ConfigError

# What a checkpoint folder contributes: weights, configs and tokenizer; never code, optimizer state or qtraj's own
# metadata (which qtraj writes itself, from the config alone).
LINKED_FILES = ("*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt",
                "*.jinja")
NOT_LINKED = ("qtraj_*", "trainer_state.json", "optimizer*", "scheduler*", "rng_state*", "training_args*")
PICKLE_WEIGHTS = "pytorch_model*.bin"


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


def local_revision_of(config: dict, name: str, checkpoint: str) -> Revision:
    for revision in selected_checkpoints(config, name):
        if revision.revision == checkpoint:
            return revision
    raise KeyError(f"local trajectory {name!r} has no selected checkpoint {checkpoint!r}")


def tokenizer_folder(config: dict, name: str) -> Path:
    """The folder a local trajectory's tokenizer is read from: its `tokenizer` entry, else its first selected
    checkpoint (tokenizers do not change along a run)."""
    entry = config["local"][name]
    if entry["tokenizer"]:
        return Path(entry["tokenizer"])
    return Path(entry["path"]) / selected_checkpoints(config, name)[0].revision


def save_tokenizer(name: str, folder: str | Path, out_dir: str | Path) -> None:
    """Save the tokenizer found in `folder` as a plain tokenizer folder, or say which key to set."""
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():  # else transformers would take the path for a hub repo id and go online
        raise FileNotFoundError(f"local trajectory {name!r}: the tokenizer folder {folder} does not exist (yet); "
                                f"for checkpoints a rule makes, name it as `tokenizer:` in local.{name} so the "
                                "workflow makes it first")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as error:
        raise FileNotFoundError(
            f"local trajectory {name!r}: no usable tokenizer in {folder} ({type(error).__name__}: {error}); "
            f"checkpoints saved without one need `tokenizer: <folder with tokenizer files>` in local.{name}"
        ) from error
    tokenizer.save_pretrained(str(out_dir))


def parameter_count(config: dict, name: str) -> float | None:
    """What sizes a local trajectory's cluster jobs: its entry's `parameters`, else the tensor sizes in its first
    checkpoint's safetensors headers (read without loading anything), else None (a folder a rule has yet to make)."""
    from safetensors import safe_open

    entry = config["local"][name]
    if entry["parameters"]:
        return entry["parameters"]
    folder = Path(entry["path"]) / selected_checkpoints(config, name)[0].revision
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = handle.get_slice(key).get_shape()
                total += math.prod(shape)
    return total or None


def hf_config(config: dict, name: str) -> dict | None:
    """The config.json of a local trajectory's first selected checkpoint (its architecture's widths size the jobs'
    working memory), None where there is none to read yet."""
    path = Path(config["local"][name]["path"]) / selected_checkpoints(config, name)[0].revision / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def external_link_target(item: Path, folder: Path) -> Path | None:
    """Where `item` really is, when following its links leads out of `folder`; None for a file inside it (a link
    between two files of the folder, or a folder that is itself reached through a link, is inside)."""
    target = item.resolve()
    return None if target.is_relative_to(folder.resolve()) else target


def check_safetensors_file(path: str | Path) -> None:
    """Raise ValueError naming `path` and what is wrong unless it is a whole safetensors file: an 8-byte
    little-endian header length, a JSON header of that length, and every tensor's data inside the file. Only the
    header is read, so checking a large checkpoint costs no more than opening it."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: only {size} bytes, fewer than the 8 a safetensors header length takes: not a "
                             "safetensors file (truncated or empty)")
        header_length = int.from_bytes(prefix, "little")
        if header_length > size - 8:
            raise ValueError(f"{path}: header length {header_length} exceeds the file's {size} bytes: not a "
                             "safetensors file (truncated or another format)")
        raw_header = handle.read(header_length)
    try:
        header = json.loads(raw_header)
    except ValueError as error:  # UnicodeDecodeError is a ValueError too
        raise ValueError(f"{path}: its {header_length}-byte header is not JSON ({error}): not a safetensors file "
                         "(corrupt or another format)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: its header is JSON but not an object: not a safetensors file")
    data_size = size - 8 - header_length
    ends = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise ValueError(f"{path}: tensor {name!r} has no valid data_offsets in the header: not a safetensors "
                             "file (corrupt)")
        ends[name] = offsets[1]
    last = max(ends, key=ends.get, default=None)
    if last is not None and ends[last] > data_size:
        raise ValueError(f"{path}: truncated: tensor {last!r} ends at byte {8 + header_length + ends[last]}, the "
                         f"file has {size} bytes")


def checked_files(source: str | Path, allow_pickle: bool = False, allow_external_links: bool = False) -> list[Path]:
    """The files of checkpoint folder `source` that qtraj reads, after refusing what cannot be read safely (no
    config, remote code, no weights, links out of the folder, a file that is not safetensors), naming the file."""
    source = Path(source)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint folder {source} has no config.json: it is not a Hugging Face model "
                                "folder (save it with save_pretrained, or fix `path`/`pattern` of its local entry)")
    if "auto_map" in json.loads((source / "config.json").read_text()):
        raise ValueError(f"checkpoint folder {source} needs its own Python code (config.json has an auto_map); qtraj "
                         "runs remote code only for hub families with a pinned commit, never from a local folder")
    files = linked_files(source, allow_pickle)
    if not any(item.suffix == ".safetensors" or fnmatch(item.name, PICKLE_WEIGHTS) for item in files):
        pickle = any(source.glob(PICKLE_WEIGHTS))
        raise FileNotFoundError(
            f"checkpoint folder {source} holds no safetensors weights"
            + ("; it has pickle weights (pytorch_model*.bin), which can run code when loaded: set "
               "`allow_pickle: true` in its local entry if you trust them, or re-save with safe_serialization"
               if pickle else ""))
    for item in files:
        target = external_link_target(item, source)
        if target is not None and not allow_external_links:
            raise ValueError(
                f"{item} is a link to {target}, outside the checkpoint folder {source}: qtraj reads only files "
                "that lie in the checkpoint folder, so that a stray link cannot pass for weights or configs. If the "
                "link is meant (say the folder is a Hugging Face cache snapshot, whose files link into ../../blobs), "
                "set `allow_external_links: true` in its local entry; otherwise replace the link with the file")
        if item.suffix == ".safetensors":
            try:
                check_safetensors_file(item)
            except ValueError as error:
                linked = f" ({item} is a link to {target})" if target is not None else ""
                raise ValueError(f"{error}{linked}. Re-save that checkpoint with save_pretrained (safetensors), or "
                                 f"move {source.name} out of its local entry's `path` (or narrow `select` so it is "
                                 "not picked)") from None
    return files


def link_checkpoint(source: str | Path, out_dir: str | Path, info: CheckpointInfo,
                    tokenizer_dir: str | Path | None = None, allow_pickle: bool = False,
                    allow_external_links: bool = False) -> int:
    """Make `out_dir` a qtraj checkpoint folder of links to `source`'s weights, configs and tokenizer (nothing is
    copied, nothing in `source` is written) plus qtraj's metadata; returns how many files were linked. A checkpoint
    saved without a tokenizer gets the trajectory's (`tokenizer_dir`) copied in, so every folder is complete.

    Files that are links out of `source` are refused unless `allow_external_links` (a Hugging Face cache snapshot's
    files all link into ../../blobs), and every safetensors file must be one, so that a stray link or a truncated
    copy is named here rather than failing a later job with an error that names no file."""
    source, out_dir = Path(source), Path(out_dir)
    files = checked_files(source, allow_pickle, allow_external_links)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in files:
        (out_dir / item.name).symlink_to(item.resolve())
    if tokenizer_dir is not None and not any((out_dir / name).exists() for name in TOKENIZER_MARKERS):
        for item in Path(tokenizer_dir).iterdir():
            if item.is_file() and not os.path.lexists(out_dir / item.name):
                shutil.copy2(item, out_dir / item.name)
    write_checkpoint_info(out_dir, info)
    return len(files)


# a folder holding either has a tokenizer of its own
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def linked_files(source: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The files of checkpoint folder `source` that qtraj reads (and links): weights, configs, tokenizer."""
    patterns = LINKED_FILES + ((PICKLE_WEIGHTS,) if allow_pickle else ())
    return [item for item in sorted(Path(source).iterdir()) if item.is_file()
            and any(fnmatch(item.name, pattern) for pattern in patterns)
            and not any(fnmatch(item.name, pattern) for pattern in NOT_LINKED)]
