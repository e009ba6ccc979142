"""SQL over the results dataset through DuckDB views, read-only."""

from __future__ import annotations

from pathlib import Path

import duckdb

# view name -> file of the results dataset (written by the workflow's aggregate step)
DATASET_FILES = {
    "results": "results.parquet",  # one row per (run, checkpoint, quantization)
    "fp_evals": "fp_evals.parquet",  # one row per checkpoint: full-precision validation loss
    "training_log": "training_log.parquet",  # trained runs: LR and training loss over steps
    "layer_errors": "layer_errors.parquet",  # one row per (run, checkpoint, quantization, linear layer)
    "sharpness": "sharpness.parquet",  # one row per checkpoint: top Hessian eigenvalue of the validation loss
    "accuracy": "accuracy.parquet",  # one row per (model, task, metric, filter); quantization null = fp
}

# Statement types a query may run: reading only. Everything that writes (COPY, CREATE, INSERT, SET, ATTACH)
# is refused, so a query can never change the results it reads.
READ_ONLY_STATEMENTS = {
    duckdb.StatementType.SELECT,
    duckdb.StatementType.EXPLAIN,
    duckdb.StatementType.PRAGMA,
}


class QueryError(ValueError):
    pass


def dataset_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "dataset"


def connect(results_dir: str | Path = "results") -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per dataset table and file access locked down."""
    directory = dataset_dir(results_dir).resolve()
    present = {view: directory / name for view, name in DATASET_FILES.items() if (directory / name).is_file()}
    if "results" not in present:
        raise FileNotFoundError(
            f"no results dataset in {directory}: run the workflow first (`make run`, or `snakemake --cores 2` "
            "with your config), or point --results-dir at the results_dir of your config"
        )
    connection = duckdb.connect(":memory:")
    for view, path in present.items():
        connection.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{path}', union_by_name = true)")
    # The views read only these files; after this, no statement can touch any other file.
    allowed = ", ".join(f"'{path}'" for path in present.values())
    connection.execute(f"SET allowed_paths = [{allowed}]")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")
    return connection


def run_query(connection: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Run `sql` (one or more statements, each read-only); returns the last statement's result."""
    statements = connection.extract_statements(sql)
    if not statements:
        raise QueryError("the query is empty")
    for statement in statements:
        if statement.type not in READ_ONLY_STATEMENTS:
            raise QueryError(f"only read-only statements (SELECT, DESCRIBE, SHOW, EXPLAIN) are allowed; "
                             f"got {statement.type.name}: {statement.query.strip()[:80]}")
    for statement in statements[:-1]:
        connection.execute(statement)
    return connection.sql(statements[-1].query)


def query(sql: str, results_dir: str | Path = "results"):
    """Convenience for notebooks: the answer as a list of dicts."""
    relation = run_query(connect(results_dir), sql)
    if relation is None:
        return []
    columns = relation.columns
    return [dict(zip(columns, row, strict=True)) for row in relation.fetchall()]
