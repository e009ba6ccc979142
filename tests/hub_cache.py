"""A local Hugging Face hub cache built from local folders, in the layout huggingface_hub itself writes
(`<kind>s--org--name/{blobs,refs/<revision>,snapshots/<commit>/...}`), so the real download code runs on it
with HF_HUB_OFFLINE=1 — no fake of huggingface_hub anywhere."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def fake_commit(repo: str, revision: str) -> str:
    return hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()


def add_to_hub_cache(cache: Path, repo: str, revision: str, files: dict[str, Path], kind: str = "model") -> str:
    """Put `files` (name in the repo -> local file) into the cache as `repo@revision`; returns the commit.

    Like huggingface_hub, snapshot entries are symlinks to content-addressed blobs.
    """
    commit = fake_commit(repo, revision)
    repo_dir = cache / f"{kind}s--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            shutil.copyfile(source, blob)
        target = repo_dir / "snapshots" / commit / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.symlink_to(blob)
    return commit


def add_model_folder(cache: Path, repo: str, revision: str, folder: Path, skip: tuple[str, ...] = ()) -> str:
    """Every file of a model folder (except qtraj's own metadata and `skip`) as `repo@revision`."""
    files = {item.name: item for item in Path(folder).iterdir()
             if item.is_file() and not item.name.startswith("qtraj_") and item.name not in skip}
    return add_to_hub_cache(cache, repo, revision, files)
