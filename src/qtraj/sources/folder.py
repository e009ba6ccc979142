"""Checkpoint folders made of links: the one builder every source that links files uses (local folders, a hub
cache's snapshots, a user's source of folders on disk), and `FolderSource`, the base of sources whose checkpoints
are Hugging Face model folders on disk.

A built folder holds links to the allow-listed files of its source folder (weights, configs, tokenizer; never code
unless the source trusts it, never optimizer state), the trajectory's tokenizer copied in when the checkpoint has
none, and qtraj's metadata (qtraj.checkpoints). Nothing is copied from, or written into, the source folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from qtraj.checkpoints import REMOTE_CODE_MARKER, CheckpointInfo, write_checkpoint_info
from qtraj.sources.base import Source

if TYPE_CHECKING:
    from qtraj.families import Revision
    from qtraj.resources import ModelShape

# What a checkpoint folder contributes: weights, configs and tokenizer; never optimizer state or qtraj's own
# metadata (which qtraj writes itself, from the config alone); code and pickle weights only where allowed.
CHECKPOINT_FILES = ("*.safetensors", "*.json", "tokenizer*", "*.model", "*.tiktoken", "merges.txt", "vocab.txt",
                    "*.jinja")
PICKLE_WEIGHTS = "pytorch_model*.bin"
REMOTE_CODE_FILES = ("*.py",)
NOT_LINKED = ("qtraj_*", "trainer_state.json", "optimizer*", "scheduler*", "rng_state*", "training_args*")
# a folder holding either has a tokenizer of its own
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def file_patterns(allow_pickle: bool = False, remote_code: bool = False) -> list[str]:
    """The names of the files qtraj takes from a checkpoint (fnmatch patterns; a hub download asks for these)."""
    return [*CHECKPOINT_FILES, *(REMOTE_CODE_FILES if remote_code else ()),
            *((PICKLE_WEIGHTS,) if allow_pickle else ())]


def allowed_files(source: str | Path, allow_pickle: bool = False, remote_code: bool = False) -> list[Path]:
    """The files of checkpoint folder `source` that qtraj reads (and links), by name."""
    patterns = file_patterns(allow_pickle, remote_code)
    return [item for item in sorted(Path(source).iterdir()) if item.is_file()
            and any(fnmatch(item.name, pattern) for pattern in patterns)
            and not any(fnmatch(item.name, pattern) for pattern in NOT_LINKED)]


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
    files = allowed_files(source, allow_pickle)
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


def build_checkpoint_folder(out_dir: str | Path, files: Iterable[Path], info: CheckpointInfo,
                            tokenizer_dir: str | Path | None = None, remote_code: str | None = None) -> int:
    """Make `out_dir` a qtraj checkpoint folder: a link to each of `files` (nothing is copied), the trajectory's
    tokenizer (`tokenizer_dir`) copied in when the folder has none of its own, so that every folder is a complete
    model folder, the remote-code marker (`remote_code`: what the code is, e.g. `repo@commit`) for a source that
    trusts it, and qtraj's metadata. Returns how many files were linked."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    count = 0
    for item in files:
        (out_dir / item.name).symlink_to(item.resolve())
        count += 1
    if tokenizer_dir is not None and not any((out_dir / name).exists() for name in TOKENIZER_MARKERS):
        for item in sorted(Path(tokenizer_dir).iterdir()):
            # never over an existing entry, even a dangling link: a linked one points into someone's folder
            if item.is_file() and not item.name.startswith("qtraj_") and not os.path.lexists(out_dir / item.name):
                shutil.copy2(item, out_dir / item.name)
    if remote_code is not None:
        (out_dir / REMOTE_CODE_MARKER).write_text(f"{remote_code}\n")
    write_checkpoint_info(out_dir, info)
    return count


def link_checkpoint(source: str | Path, out_dir: str | Path, info: CheckpointInfo,
                    tokenizer_dir: str | Path | None = None, allow_pickle: bool = False,
                    allow_external_links: bool = False) -> int:
    """Make `out_dir` a qtraj checkpoint folder of links to checkpoint folder `source`'s files (`checked_files`:
    links out of `source` are refused unless `allow_external_links`, every safetensors file must be whole, so that
    a stray link or a truncated copy is named here rather than failing a later job with an error that names no
    file); returns how many files were linked."""
    files = checked_files(source, allow_pickle, allow_external_links)
    return build_checkpoint_folder(out_dir, files, info, tokenizer_dir)


def save_tokenizer(where: str, folder: str | Path, out_dir: str | Path) -> None:
    """Save the tokenizer found in `folder` as a plain tokenizer folder, or say which key to set (`where`: the
    trajectory's config key, e.g. `local.mine`)."""
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():  # else transformers would take the path for a hub repo id and go online
        raise FileNotFoundError(f"{where}: the tokenizer folder {folder} does not exist (yet); for checkpoints a rule "
                                f"makes, name it as `tokenizer:` in {where} so the workflow makes it first")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as error:
        raise FileNotFoundError(
            f"{where}: no usable tokenizer in {folder} ({type(error).__name__}: {error}); checkpoints saved without "
            f"one need `tokenizer: <folder with tokenizer files>` in {where}"
        ) from error
    tokenizer.save_pretrained(str(out_dir))


class FolderSource(Source):
    """A source whose checkpoints are Hugging Face model folders on disk, read in place: rules/local.smk links each
    into the results tree (`link_checkpoint`), saves the trajectory's tokenizer once and tokenizes the carried
    corpus with it. A subclass says which folders a trajectory's checkpoints are (`revisions`,
    `checkpoint_folder`); an entry may set `tokenizer` (a folder), `parameters`, `allow_pickle` and
    `allow_external_links` as a `local` entry does."""

    external = True
    links_folders = True
    makes = "link_local_checkpoint"
    rules = "local.smk"
    column: ClassVar[str] = "local"

    def revisions(self, name: str) -> list[Revision]:
        """The selected checkpoints of `name` in training order (qtraj.families.Revision: name, step, tokens)."""
        raise NotImplementedError

    def checkpoint_folder(self, name: str, checkpoint: str) -> str:
        """The folder on disk that checkpoint `checkpoint` of `name` is read from."""
        raise NotImplementedError

    def checkpoints(self, name: str) -> list[str]:
        return [revision.revision for revision in self.revisions(name)]

    def check(self) -> None:
        for name in self.names():
            self.revisions(name)  # finds the folders, resolves the selector

    def revision(self, name: str, checkpoint: str) -> Revision:
        for revision in self.revisions(name):
            if revision.revision == checkpoint:
                return revision
        raise KeyError(f"{self.key} trajectory {name!r} has no selected checkpoint {checkpoint!r}")

    def checkpoint_info(self, name: str, checkpoint: str) -> CheckpointInfo:
        """What the link job records about a checkpoint (the job adds its path and fingerprint)."""
        revision = self.revision(name, checkpoint)
        return CheckpointInfo(run=name, checkpoint=checkpoint, step=revision.step, tokens=revision.tokens, lr=None,
                              phase=None, source=self.column)

    def checkpoint_facts(self, name: str, checkpoint: str) -> dict:
        """The link job's params: `checkpoint_info` without the folder's path, which the job fills in, so that
        moving the data never reruns anything."""
        return {key: value for key, value in asdict(self.checkpoint_info(name, checkpoint)).items() if key != "path"}

    def link_settings(self, name: str) -> dict:
        """What the link job accepts from a folder (the trust checks of `checked_files`)."""
        entry = self.entry(name)
        return {"allow_pickle": entry.get("allow_pickle", False),
                "allow_external_links": entry.get("allow_external_links", False)}

    def linked_files(self, name: str, checkpoint: str) -> list[Path] | None:
        """The files a checkpoint contributes, as far as they can be read without the link job's checks (a link out
        of the folder is left out: the job refuses it); None for a folder not there yet."""
        folder = Path(self.checkpoint_folder(name, checkpoint))
        if not folder.is_dir():
            return None
        settings = self.link_settings(name)
        return [path for path in allowed_files(folder, settings["allow_pickle"])
                if settings["allow_external_links"] or external_link_target(path, folder) is None]

    def tokenizer_input(self, name: str) -> list[str]:
        """The `tokenizer` folder an entry names (an input of the tokenizer job); none: the job takes the first
        selected checkpoint's own, so that selecting other checkpoints never reruns the trajectory."""
        folder = self.entry(name).get("tokenizer")
        return [folder] if folder else []

    def tokenizer_folder(self, name: str) -> Path:
        """The folder the trajectory's tokenizer is read from: its `tokenizer` entry, else its first selected
        checkpoint (tokenizers do not change along a run)."""
        folder = self.entry(name).get("tokenizer")
        return Path(folder) if folder else self.first_folder(name)

    def first_folder(self, name: str) -> Path:
        return Path(self.checkpoint_folder(name, self.revisions(name)[0].revision))

    def hf_config(self, name: str) -> dict | None:
        """The config.json of the first selected checkpoint, None where there is none to read yet."""
        try:
            return json.loads((self.first_folder(name) / "config.json").read_text())
        except (OSError, ValueError):
            return None

    def architecture(self, name: str) -> str | None:
        return ((self.hf_config(name) or {}).get("architectures") or [None])[0]

    def parameters(self, name: str) -> float | None:
        """The entry's `parameters`, else the tensor sizes in the first checkpoint's safetensors headers (read
        without loading anything), else None (a folder a rule has yet to make)."""
        from safetensors import safe_open

        if self.entry(name).get("parameters"):
            return self.entry(name)["parameters"]
        total = 0
        for path in sorted(self.first_folder(name).glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                    total += math.prod(handle.get_slice(key).get_shape())
        return total or None

    def shape(self, name: str) -> ModelShape | None:
        from qtraj.resources import estimated_shape, shape_of_hf_config

        parameters = self.parameters(name)
        if parameters is None:
            return None
        settings = self.hf_config(name)
        return shape_of_hf_config(settings, parameters) if settings else estimated_shape(parameters)
