"""Getting checkpoints, tokenizers and evaluation text from the Hugging Face hub, with errors that say what to do.

All transfers go through huggingface_hub, so HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN mean what they
always mean. A revision already in the local hub cache is used in place (linked, nothing copied); anything else
is downloaded straight into the checkpoint folder (`local_dir`), which the workflow deletes after use, so disk
use grows with the number of jobs running, not with the number of checkpoints.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from qtraj.checkpoints import REMOTE_CODE_MARKER, CheckpointInfo
from qtraj.families import Revision, revision_lr_and_phase
from qtraj.sources.folder import TOKENIZER_MARKERS, allowed_files, build_checkpoint_folder, file_patterns

log = logging.getLogger(__name__)


class HubError(RuntimeError):
    """A checkpoint or file cannot be had from the hub; the message names the cause and the fix."""


def hub_token() -> str | None:
    """HF_TOKEN from the environment, else the token `hf auth login` stored; never logged."""
    from huggingface_hub import get_token

    return get_token()


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _explain(error: Exception, repo: str, revision: str, gated: bool) -> HubError:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(error, GatedRepoError) or (gated and any(sign in str(error) for sign in ("401", "403", "gated"))):
        return HubError(
            f"{repo} is gated: accept its terms at https://huggingface.co/{repo} with your account, then make a "
            f"read token available (export HF_TOKEN=... or `hf auth login`) and rerun")
    if isinstance(error, RevisionNotFoundError):
        return HubError(f"{repo} has no revision {revision!r}: fix the revision name in its family file "
                        f"(list the real ones with `hf download`'s API: HfApi().list_repo_refs({repo!r}))")
    if isinstance(error, RepositoryNotFoundError):
        return HubError(f"the hub has no repo {repo!r} (or it is private and the token cannot read it): check "
                        "`repo:` in the family file and HF_TOKEN")
    if isinstance(error, LocalEntryNotFoundError) or _offline():
        return HubError(
            f"revision {revision!r} of {repo} is not in the local hub cache ({_cache_dir()}) and the hub cannot "
            "be reached (HF_HUB_OFFLINE is set or there is no network): download it on a machine with access "
            "(the workflow's download jobs run on the submitting host) or point HF_HOME at a cache that has it")
    return HubError(f"downloading revision {revision!r} of {repo} failed: {type(error).__name__}: {error}")


def _cached_snapshot(repo: str, ref: str, patterns: list[str]) -> Path | None:
    """The snapshot folder of `ref` in the local hub cache, if it is there with weights."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=ref, allow_patterns=patterns, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return folder if has_weights and (folder / "config.json").is_file() else None


def _cached_files(repo: str, ref: str) -> set[str] | None:
    """The file names of `repo@ref` in the local hub cache, or None when the cache does not have that revision."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=ref, local_files_only=True))
    except LocalEntryNotFoundError:
        return None
    except Exception:  # an unusual cache layout: let transformers' own lookup speak
        return None
    return {item.name for item in folder.iterdir()}


def _file_patterns(family: dict, pickle: bool) -> list[str]:
    """The files of a checkpoint qtraj takes (qtraj.sources.folder, as for every source that links files): weights,
    configs, tokenizer; remote code and pickle weights only where the family allows them (and, for pickle, only where
    `pickle` asks for them)."""
    return file_patterns(pickle and family["allow_pickle"], family["trust_remote_code"])


def _weight_patterns(repo: str, ref: str, family: dict, token: str | None) -> list[str]:
    """Which files to fetch; refuses pickle-only revisions unless the family allows them (pickle runs code)."""
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo, revision=ref, token=token)
    patterns = _file_patterns(family, pickle=False)
    if any(name.endswith(".safetensors") for name in files):
        return patterns
    if any(name.endswith(".bin") for name in files):
        if family["allow_pickle"]:
            return _file_patterns(family, pickle=True)
        raise HubError(f"revision {ref!r} of {repo} has only pickle weights (.bin), which can run arbitrary code "
                       "when loaded; qtraj refuses them unless the family file sets `allow_pickle: true`")
    raise HubError(f"revision {ref!r} of {repo} holds no model weights (files: {', '.join(files[:10])})")


def download_checkpoint(slug: str, family: dict, revision: Revision, out_dir: str | Path,
                        tokenizer_dir: str | Path | None = None,
                        lr_and_phase: tuple[float | None, str | None] | None = None) -> CheckpointInfo:
    """Make `out_dir` a qtraj checkpoint folder holding `revision` of the family's repo.

    Checkpoint repos that keep their tokenizer elsewhere (SmolLM3's) get the family's tokenizer copied in, so
    every checkpoint folder is a complete model folder that calibration can tokenize with. `family` needs only
    `repo`, `trust_remote_code`, `allow_pickle` and `gated` when `lr_and_phase` is given (the workflow passes no more,
    so that editing anything else in a family file reruns nothing).
    """
    repo, ref = family["repo"], revision.commit or revision.revision
    if family["trust_remote_code"] and revision.commit is None:
        # Remote code runs with the job's rights: only code of a commit someone pinned (and could review) runs.
        raise HubError(f"{repo} needs trust_remote_code, so revision {revision.revision!r} must be pinned: add "
                       f"`commit: <40-hex sha>` to it in the family file (the sha of the branch: "
                       f"HfApi().list_repo_refs({repo!r}))")
    out_dir = Path(out_dir)
    snapshot = _cached_snapshot(repo, ref, _file_patterns(family, pickle=True))
    if snapshot is not None:
        commit = snapshot.name
        # links into the cache: nothing is copied, the cache stays intact; only what a download would fetch, so that
        # a cached snapshot brings no file the family did not allow
        files = allowed_files(snapshot, family["allow_pickle"], family["trust_remote_code"])
        log.info("%s@%s: linked from the local hub cache (commit %s)", repo, ref, commit)
    else:
        commit = _download(repo, ref, family, out_dir)
        files = []
    if not family["allow_pickle"] and not any(item.suffix == ".safetensors" for item in files) and not any(
            out_dir.glob("*.safetensors")):
        raise HubError(f"revision {ref!r} of {repo} in the local hub cache has only pickle weights; set "
                       "`allow_pickle: true` in the family file if you trust it")
    lr, phase = lr_and_phase if lr_and_phase is not None else revision_lr_and_phase(family, revision)
    info = CheckpointInfo(run=slug, checkpoint=revision.revision, step=revision.step, tokens=revision.tokens,
                          lr=lr, phase=phase, source="hub", repo=repo, revision=revision.revision, commit=commit)
    build_checkpoint_folder(out_dir, files, info, tokenizer_dir,
                            f"{repo}@{commit}" if family["trust_remote_code"] else None)
    return info


def _download(repo: str, ref: str, family: dict, out_dir: Path) -> str:
    from huggingface_hub import HfApi, snapshot_download

    token = hub_token()
    if family["gated"] and token is None and not _offline():
        raise HubError(f"{repo} is gated and no Hugging Face token is set: accept its terms at "
                       f"https://huggingface.co/{repo}, then export HF_TOKEN=<a read token> (or `hf auth login`) "
                       "and rerun")
    try:
        if _offline():
            raise _explain(RuntimeError("offline"), repo, ref, family["gated"])
        commit = HfApi().repo_info(repo, revision=ref, token=token).sha
        patterns = _weight_patterns(repo, commit, family, token)
        snapshot_download(repo, revision=commit, allow_patterns=patterns, local_dir=out_dir, token=token)
    except HubError:
        raise
    except Exception as error:  # every hub failure gets the message that says what to do about it
        raise _explain(error, repo, ref, family["gated"]) from error
    # local_dir downloads keep bookkeeping under .cache/; it is not part of the model
    log.info("%s@%s: downloaded (commit %s)", repo, ref, commit)
    return commit


def download_tokenizer(repo: str, revision: str, out_dir: str | Path, trust_remote_code: bool = False,
                       gated: bool = False, named: bool = True) -> None:
    """Save the tokenizer of `repo@revision` as a plain folder (through transformers, which uses the hub cache)."""
    import re

    from transformers import AutoTokenizer

    if trust_remote_code and not re.fullmatch(r"[0-9a-f]{40}", revision):
        raise HubError(f"{repo} needs trust_remote_code, so its tokenizer must come from a pinned commit: set "
                       f"`tokenizer: {{repo: {repo}, revision: <40-hex sha>}}` in the family file")
    cached = _cached_files(repo, revision) if _offline() else None
    if cached is not None and not any(name in cached for name in (*TOKENIZER_MARKERS, "tokenizer.model")):
        # offline, transformers would report this as "not in the cache", which sends users looking for a download
        raise HubError(f"revision {revision!r} of {repo} is in the local hub cache but has no tokenizer files "
                       f"({', '.join(sorted(cached)[:8])}); set `tokenizer: {{repo: ..., revision: ...}}` in the "
                       "family file to a repo that has one")
    try:
        tokenizer = AutoTokenizer.from_pretrained(repo, revision=revision, trust_remote_code=trust_remote_code,
                                                  token=hub_token())
    except Exception as error:
        # transformers wraps the hub's GatedRepoError in an OSError; the family file knows whether it is gated
        where = ("the family file's `tokenizer:` entry names it" if named else
                 "the family file names no `tokenizer:`, so the first selected revision's own is used")
        # offline, transformers' refusal of untrusted code would be explained as a missing download
        auto_map = None if trust_remote_code else _cached_tokenizer_auto_map(repo, revision)
        if auto_map:
            raise HubError(
                f"the family's tokenizer (from {repo}@{revision}; {where}) needs the repo's own Python code: its "
                f"tokenizer_config.json maps the tokenizer to it (auto_map: {json.dumps(auto_map)}), and the family "
                "file does not trust remote code. If you have reviewed that code, set `trust_remote_code: true` in "
                "the family file and pin the revision the tokenizer comes from (`commit: <40-hex sha>`, or "
                f"`tokenizer: {{repo: {repo}, revision: <40-hex sha>}}`); otherwise set `tokenizer: {{repo: ..., "
                "revision: ...}` to a repo whose tokenizer needs no code") from error
        raise HubError(f"the family's tokenizer (from {repo}@{revision}; {where}) cannot be had: "
                       f"{_explain(error, repo, revision, gated=gated)}. Set `tokenizer: {{repo: ..., revision: ...}}` "
                       "in the family file to take it from a repo that has one") from error
    tokenizer.save_pretrained(str(out_dir))
    if trust_remote_code:
        Path(out_dir, REMOTE_CODE_MARKER).write_text(f"{repo}@{revision}\n")


def _cached_tokenizer_auto_map(repo: str, revision: str) -> dict | None:
    """The `auto_map` of `repo@revision`'s tokenizer_config.json, where the local hub cache holds that file."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo, "tokenizer_config.json", revision=revision)
    if not isinstance(path, str):  # None (not cached) or the cache's marker for a file the repo does not have
        return None
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, ValueError):  # unreadable: let transformers' own error speak
        return None
    return settings.get("auto_map") if isinstance(settings, dict) else None


def download_text(repo: str, filename: str, documents: int, text_field: str, out_file: str | Path) -> int:
    """The first `documents` texts of one data file of a hub dataset (JSON lines, optionally gzipped, or
    Parquet), written as JSON lines {"text": ...}; returns how many were written."""
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo, filename, repo_type="dataset", token=hub_token())
    except Exception as error:
        raise _explain(error, repo, filename, gated=False) from error
    texts = []
    for text in _iter_texts(Path(path), text_field):
        texts.append(text)
        if len(texts) == documents:
            break
    if len(texts) < documents:
        log.warning("%s/%s has only %d documents, fewer than the %d asked for", repo, filename, len(texts), documents)
    tmp = Path(f"{out_file}.tmp")
    with tmp.open("w") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, out_file)
    return len(texts)


def _iter_texts(path: Path, text_field: str) -> Iterator[str]:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(columns=[text_field], batch_size=1024):
            yield from batch.column(0).to_pylist()
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as raw:
        for line in io.TextIOWrapper(raw, encoding="utf-8"):
            if line.strip():
                record = json.loads(line)
                if text_field not in record:
                    raise HubError(f"{path.name}: records have no field {text_field!r} (fields: {sorted(record)}); "
                                   "set `text_field` for this data file")
                yield record[text_field]
