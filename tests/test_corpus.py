import pytest

from qtraj.corpus import document_key, read_documents, split_documents, split_of
from tests.conftest import CORPUS


def test_carried_corpus_has_all_addresses_and_every_split_is_used():
    documents = read_documents(CORPUS)
    assert len(documents) == 233
    splits = split_documents(documents, 0.05, 0.03)
    assert sum(len(docs) for docs in splits.values()) == 233
    assert len(splits["validation"]) >= 5 and len(splits["calibration"]) >= 3


def test_split_does_not_depend_on_order_or_on_other_documents():
    documents = read_documents(CORPUS)
    forward = {d["year"]: split_of(d, 0.05, 0.03) for d in documents}
    backward = {d["year"]: split_of(d, 0.05, 0.03) for d in reversed(documents[:50])}
    assert all(forward[year] == split for year, split in backward.items())


def test_malformed_corpus_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_documents(path)


def test_empty_split_is_an_error_that_names_the_fix():
    with pytest.raises(ValueError, match="validation_fraction"):
        split_documents([{"text": "a", "year": 1, "president": "x"}], 0.0001, 0.0001)


# The carried corpus's validation and calibration addresses at the default fractions: a change here changes every
# validation loss measured so far, so it must be deliberate.
PINNED_SPLITS = {
    "validation": ["1801|Thomas Jefferson", "1820|James Monroe", "1824|James Monroe", "1850|Millard Fillmore",
                   "1871|Ulysses S Grant", "1890|Benjamin Harrison", "1932|Herbert Hoover",
                   "1958|Dwight D Eisenhower", "1985|Ronald Reagan"],
    "calibration": ["1807|Thomas Jefferson", "1830|Andrew Jackson", "1911|William H Taft"],
}


def test_the_split_of_the_carried_addresses_is_pinned():
    splits = split_documents(read_documents(CORPUS), 0.05, 0.03)
    assert {name: [document_key(d) for d in splits[name]] for name in PINNED_SPLITS} == PINNED_SPLITS
    assert len(splits["train"]) == 233 - 9 - 3


def test_other_processes_split_alike_whatever_their_hash_seed():
    """Python's own hash() of a string changes with PYTHONHASHSEED (random per process): the split must not."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json; from qtraj.corpus import read_documents, split_of, document_key; "
            f"print(json.dumps({{document_key(d): split_of(d, 0.05, 0.03) for d in read_documents({str(CORPUS)!r})}}))")
    here = {document_key(d): split_of(d, 0.05, 0.03) for d in read_documents(CORPUS)}
    for seed in ("1", "2"):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(result.stdout) == here, seed
