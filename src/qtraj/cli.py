"""The `qtraj` command line: `qtraj query "SQL"`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from qtraj.query import DATASET_FILES, QueryError, connect, run_query


def _print(relation, output_format: str, max_rows: int) -> None:
    columns = relation.columns
    rows = relation.fetchall()
    if output_format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    elif output_format == "json":
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str, indent=1))
    else:
        relation.show(max_rows=max_rows, max_width=10_000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qtraj", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    query = commands.add_parser(
        "query", help="answer SQL over the results dataset",
        description=f"Read-only SQL (DuckDB dialect) over the views: {', '.join(DATASET_FILES)}.",
    )
    query.add_argument("sql", help='e.g. "SELECT run, phase, avg(delta_q_loss) FROM results GROUP BY ALL"')
    query.add_argument("--results-dir", default=os.environ.get("QTRAJ_RESULTS_DIR", "results"),
                       help="the workflow's results_dir (default: $QTRAJ_RESULTS_DIR or ./results)")
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")
    query.add_argument("--max-rows", type=int, default=100, help="rows shown in table format")
    args = parser.parse_args(argv)

    try:
        relation = run_query(connect(args.results_dir), args.sql)
    except (FileNotFoundError, QueryError) as error:
        print(f"qtraj: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # DuckDB's parser and binder errors already name the problem
        print(f"qtraj: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    if relation is not None:
        _print(relation, args.format, args.max_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
