"""The `qtraj` command line: `qtraj query "SQL"`, `qtraj science-check` and `qtraj check-config FILE`."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from qtraj.query import CANNED_VIEWS, DATASET_FILES, QueryError, connect, run_query


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
        description=f"Read-only SQL (DuckDB dialect) over the tables {', '.join(DATASET_FILES)} and the canned "
                    f"views {', '.join(CANNED_VIEWS)} (README: Canned views).",
    )
    query.add_argument("sql", help='e.g. "SELECT run, phase, avg(delta_q_loss) FROM results GROUP BY ALL"')
    query.add_argument("--format", choices=["table", "csv", "json"], default="table")
    query.add_argument("--max-rows", type=int, default=100, help="rows shown in table format")
    check = commands.add_parser(
        "science-check", help="the paper's effects across seeds (LR decay against a constant LR, LAWA)",
        description="Per quantization and setting, mean ± 95%% CI over seeds (ΔQ L in %%, differences in percentage "
                    "points, fp loss in nats) of: the decayed run against the constant-LR run of the same seed at "
                    "equal tokens; the stable-phase trend; the decay within the run; LAWA against the newest "
                    "checkpoint it averages. Each effect: supported / not resolved / opposite. Exit status: 0 when "
                    "the check was computed, whatever it shows; 1 with --strict when an effect with an expected "
                    "direction is not supported; 2 when nothing could be checked (no dataset, an unreadable one, "
                    "or no run with a decay phase and no averages).")
    check.add_argument("--strict", action="store_true",
                       help="exit 1 unless every effect with an expected direction is supported (the stable-phase "
                            "trend, a comparison, does not count; nor does a section that could not be computed)")
    check_config = commands.add_parser(
        "check-config", help="validate a config file as the workflow will, one line per problem",
        description="Reads FILE strictly (YAML syntax errors and keys written twice named with their lines) and "
                    "validates it (every key, the family files and local folders it names, the methods' options) "
                    "without running anything. Snakemake itself reports a missing or unparsable --configfile with "
                    "a traceback; this says it in one line.")
    check_config.add_argument("file")
    for command in (query, check):
        command.add_argument("--results-dir", default=os.environ.get("QTRAJ_RESULTS_DIR", "results"),
                             help="the workflow's results_dir (default: $QTRAJ_RESULTS_DIR or ./results)")
    args = parser.parse_args(argv)

    if args.command == "check-config":
        from qtraj.config import ConfigError, load_config, trajectories

        try:
            config = load_config(args.file)
        except ConfigError as error:
            print(f"qtraj: {error}", file=sys.stderr)
            return 2
        print(f"{args.file}: valid ({len(trajectories(config))} trajectories, {len(config['quantizations'])} "
              "quantizations)")
        return 0
    if args.command == "science-check":
        from qtraj.science import measure, render

        try:
            science_check = measure(args.results_dir)
        except FileNotFoundError as error:
            print(f"qtraj: {error}", file=sys.stderr)
            return 2
        except Exception as error:  # e.g. a dataset aggregated by an older qtraj: the view says what to do
            print(f"qtraj: the science check could not be computed: {type(error).__name__}: {error}", file=sys.stderr)
            return 2
        print(render(science_check))
        if not science_check.checked:
            return 2
        unsupported = science_check.unsupported
        if args.strict and unsupported:
            print(f"qtraj: --strict: {len(unsupported)} effects with an expected direction are not supported",
                  file=sys.stderr)
            return 1
        return 0
    try:
        relation = run_query(connect(args.results_dir), args.sql)
        if relation is not None:  # relations are lazy: errors of the query itself surface while printing
            _print(relation, args.format, args.max_rows)
    except (FileNotFoundError, QueryError) as error:
        print(f"qtraj: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # DuckDB's parser and binder errors already name the problem
        print(f"qtraj: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
