import pytest

from qtraj.corpus import read_documents, split_documents, split_of
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
