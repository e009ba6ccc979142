"""The fault suite: hostile inputs and broken states qtraj must survive without running foreign code, writing
where it must not, or losing what it computed. Fast cases run in `make test`; slow ones are marked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb
import pytest

from qtraj import results
from qtraj.query import QueryError, connect, run_query
from tests.test_results_and_query import quantized_row


def digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A results directory whose path holds a quote, with a small dataset."""
    root = tmp_path / "it's results"
    path = root / "evals" / "q.parquet"
    results.write_rows([quantized_row()], results.QUANTIZED_EVAL_SCHEMA, path)
    results.aggregate({"results": [str(path)]}, root / "dataset")
    return root


WRITES_AND_ESCAPES = [
    "COPY (SELECT 42 AS x) TO '{dataset}/results.parquet' (FORMAT parquet)",
    "EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{dataset}/results.parquet' (FORMAT parquet, USE_TMP_FILE false)",
    "EXPLAIN ANALYZE COPY results TO '{outside}/stolen.csv'",
    "DROP TABLE results",
    "EXPLAIN ANALYZE DROP TABLE results",
    "EXPLAIN ANALYZE DROP VIEW error_by_phase",
    "EXPLAIN (ANALYZE) DROP TABLE results",
    "ATTACH '{outside}/other.db' AS other",
    "EXPLAIN ANALYZE ATTACH '{outside}/other.db' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "PRAGMA enable_profiling",
    "SET enable_external_access = true",
    "EXPLAIN ANALYZE SET enable_external_access = true",
    "SELECT * FROM read_csv('{outside}/secret.csv')",
    "SELECT * FROM read_text('{outside}/secret.csv')",
    "SELECT * FROM glob('{outside}/*')",
    "SELECT * FROM read_parquet('{dataset}/results.parquet')",
    "CREATE TABLE x AS SELECT 1",
    "SELECT 1; DROP TABLE results",
]


@pytest.mark.parametrize("sql", WRITES_AND_ESCAPES)
def test_no_query_reads_outside_the_dataset_or_writes_anything(dataset, tmp_path, sql):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("a,b\n1,2\n")
    before, before_outside = digest(dataset), digest(outside)
    # paths written as SQL string literals (the quote in the results path doubled), as an attacker would
    statement = sql.format(dataset=str(dataset / "dataset").replace("'", "''"), outside=outside)
    # refused by the statement filter, by DuckDB's locked-down connection, or (EXPLAIN ANALYZE ATTACH) its parser
    with pytest.raises((QueryError, duckdb.Error)):
        relation = run_query(connect(dataset), statement)
        if relation is not None:
            relation.fetchall()
    assert digest(dataset) == before and digest(outside) == before_outside
    # the views and tables are intact for the next statement
    assert run_query(connect(dataset), "SELECT count(*) FROM results JOIN error_by_phase USING (run)").fetchall()


def test_the_cli_refuses_a_write_and_leaves_the_results_alone(dataset):
    from qtraj.cli import main

    before = digest(dataset)
    target = str(dataset / "dataset" / "results.parquet").replace("'", "''")
    sql = f"EXPLAIN ANALYZE COPY (SELECT 42 AS x) TO '{target}' (FORMAT parquet)"
    assert main(["query", "--results-dir", str(dataset), sql]) != 0
    assert digest(dataset) == before
    assert main(["query", "--results-dir", str(dataset), "SELECT count(*) AS n FROM results"]) == 0


def test_an_unreadable_dataset_file_is_named_with_how_to_rebuild_it(dataset):
    from qtraj.query import DatasetError

    (dataset / "dataset" / "results.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"results.parquet cannot be read.*--forcerun aggregate"):
        connect(dataset)
