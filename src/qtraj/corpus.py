"""The carried text corpus and its fixed train / validation / calibration split."""

from __future__ import annotations

import hashlib
import json
import lzma
from collections.abc import Iterable, Iterator
from pathlib import Path

SPLITS = ("train", "validation", "calibration")
# the splits a model is evaluated and calibrated on: a model from elsewhere tokenizes these with its own tokenizer,
# and hub families take them from the hub text instead (`hub_data.<split>_text`)
MEASURED_SPLITS = ("validation", "calibration")


def read_documents(path: str | Path) -> list[dict]:
    """Read a JSON-Lines corpus (optionally .xz-compressed); every document needs a `text` field."""
    path = Path(path)
    opener = lzma.open if path.suffix == ".xz" else open
    documents = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                document = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{line_number}: not valid JSON ({error}); the corpus must be JSON Lines"
                ) from error
            if not isinstance(document.get("text"), str):
                raise ValueError(f"{path}:{line_number}: document has no string field 'text'")
            documents.append(document)
    if not documents:
        raise ValueError(f"{path}: the corpus holds no documents")
    return documents


def document_key(document: dict) -> str:
    """A stable identity for a document: its metadata when present, else its text."""
    if "year" in document and "president" in document:
        return f"{document['year']}|{document['president']}"
    return document["text"]


def split_of(document: dict, validation_fraction: float, calibration_fraction: float) -> str:
    """The split a document belongs to, from a SHA-256 bucket of its key.

    A hash rather than a shuffle: the assignment of a document never depends on file order, on how many
    other documents there are, or on a seed, so validation data stay fixed as the corpus grows.
    """
    digest = hashlib.sha256(document_key(document).encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:8], "big") / 2**64
    if bucket < validation_fraction:
        return "validation"
    if bucket < validation_fraction + calibration_fraction:
        return "calibration"
    return "train"


def split_documents(
    documents: Iterable[dict], validation_fraction: float, calibration_fraction: float
) -> dict[str, list[dict]]:
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for document in documents:
        splits[split_of(document, validation_fraction, calibration_fraction)].append(document)
    empty = [name for name, docs in splits.items() if not docs]
    if empty:
        raise ValueError(
            f"split(s) {', '.join(empty)} received no documents; raise corpus.validation_fraction / "
            "corpus.calibration_fraction or use a larger corpus"
        )
    return splits


def write_jsonl(documents: Iterable[dict], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")


def iter_texts(path: str | Path) -> Iterator[str]:
    """The `text` of each document of a JSON-Lines file, in order."""
    for document in read_documents(path):
        yield document["text"]


def write_splits(corpus_path: str | Path, outputs: dict[str, str | Path], validation_fraction: float,
                 calibration_fraction: float) -> dict[str, int]:
    """Split the corpus and write one JSON-Lines file per split; returns the document count per split."""
    splits = split_documents(read_documents(corpus_path), validation_fraction, calibration_fraction)
    for name, documents in splits.items():
        write_jsonl(documents, outputs[name])
    return {name: len(documents) for name, documents in splits.items()}
