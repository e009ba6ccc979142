"""What every result row carries so that it can be traced back to the code and settings that made it."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

import qtraj

# every row records the versions of these (qtraj.results.PROVENANCE_FIELDS: one `version_column` each)
TRACKED_LIBRARIES = ("torch", "transformers", "llmcompressor", "compressed-tensors")


def version_column(library: str) -> str:
    """The column holding a tracked library's version: `compressed-tensors` -> `compressed_tensors_version`."""
    return f"{library.replace('-', '_')}_version"


def library_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def config_hash(settings: object) -> str:
    """A short, stable hash of the settings that determine a result (canonical JSON, sorted keys)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def provenance(settings: object, device: str) -> dict:
    row = {
        "qtraj_version": qtraj.__version__,
        "config_hash": config_hash(settings),
        "device": device,
        "created_at": datetime.now(UTC).replace(tzinfo=None),
    }
    for name in TRACKED_LIBRARIES:
        row[version_column(name)] = library_version(name)
    return row
