"""Content fingerprints of input files that qtraj does not write: a local checkpoint's weights and configs, a GGUF
file. A job's params carry the fingerprint, so Snakemake reruns exactly the jobs of an input whose content changed,
whatever its timestamps say (a weights file overwritten in place leaves its folder's modification time unchanged;
`cp` or `rsync -a` can keep a file's), and every result row records it.

Hashing a 7B checkpoint takes seconds, and Snakemake asks for params every time it builds the DAG, so each file's
digest is cached by what changes whenever its bytes do: (size, modification and status-change time, inode, device).
The status-change time cannot be set by a user, so an overwrite that restores the modification time still counts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# sha256: hashlib's file_digest runs it at several GB/s with the CPU's SHA extensions
ALGORITHM = "sha256"
# where the digests are kept, relative to the results folder (the workflow's params and the link job share it)
CACHE_FILE = "data/fingerprints.json"
_MEMORY: dict[tuple, str] = {}


def _stat_key(path: Path) -> tuple:
    stat = path.stat()  # follows links: the content is what counts
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def file_digest(path: str | Path, cache_file: str | Path | None = None) -> str:
    """`path`'s content digest, from the cache when the file is unchanged since it was hashed."""
    path = Path(path)
    key = _stat_key(path)
    if key in _MEMORY:
        return _MEMORY[key]
    cache = _read_cache(cache_file)
    cached = cache.get(key[0])
    if cached is not None and tuple(cached["stat"]) == key[1:]:
        digest = cached["digest"]
    else:
        with path.open("rb") as handle:
            digest = hashlib.file_digest(handle, ALGORITHM).hexdigest()
        if cache_file is not None:
            cache[key[0]] = {"stat": list(key[1:]), "digest": digest}
            _write_cache(cache_file, cache)
    _MEMORY[key] = digest
    return digest


def fingerprint(files: list[str | Path], cache_file: str | Path | None = None) -> str:
    """One digest over the names, sizes and contents of `files` (order does not matter): what identifies a
    checkpoint's content."""
    combined = hashlib.new(ALGORITHM)
    for path in sorted(map(Path, files), key=lambda path: path.name):
        combined.update(f"{path.name}\0{path.stat().st_size}\0{file_digest(path, cache_file)}\n".encode())
    return f"{ALGORITHM}:{combined.hexdigest()[:32]}"


def _read_cache(cache_file: str | Path | None) -> dict:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        return json.loads(Path(cache_file).read_text())
    except ValueError:  # a cache is only a cache: a broken one is rebuilt
        return {}


def _write_cache(cache_file: str | Path, cache: dict) -> None:
    from qtraj.results import write_text_atomically

    write_text_atomically(json.dumps(cache), cache_file)
