"""The `qtraj` command line: `qtraj query "SQL"`, `qtraj science-check`, `qtraj check-config FILE`, `qtraj status`,
`qtraj plan`, `qtraj families`, `qtraj adopt-results DIR` and `qtraj --version`. Thin: the logic lives in
qtraj.query, qtraj.science, qtraj.status, qtraj.plan, qtraj.catalog and qtraj.ownership."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import signal
import sys
from collections.abc import Callable

import qtraj
from qtraj.catalog import HubUnreachable
from qtraj.ownership import OwnershipError
from qtraj.query import CANNED_VIEWS, DATASET_FILES, QueryError, connect, run_query
from qtraj.schema import ConfigError

DEFAULT_CONFIG = "config/config.yaml"  # what the Snakefile reads when no --configfile is given


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


def _print_json(value) -> None:
    print(json.dumps(value, default=str, indent=1))


def _results_dir(args) -> str:
    """--results-dir, else the results_dir of --configfile, else $QTRAJ_RESULTS_DIR, else ./results."""
    if args.results_dir is not None:
        return args.results_dir
    if args.configfile is not None:
        from qtraj.status import results_dir_of

        return results_dir_of(args.configfile)
    return os.environ.get("QTRAJ_RESULTS_DIR", "results")


def _families_dir(args) -> str:
    """--families-dir, else the families_dir of --configfile, else the schema's default (config/families)."""
    from qtraj.catalog import default_families_dir
    from qtraj.schema import read_yaml

    if args.families_dir is not None:
        return args.families_dir
    if args.configfile is None:
        return default_families_dir()
    config = read_yaml(args.configfile) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"{args.configfile}: the configuration must be a mapping of keys to values")
    families_dir = config.get("families_dir", default_families_dir())
    if not isinstance(families_dir, str):
        raise ConfigError(f"{args.configfile}: config key 'families_dir': {families_dir!r} is not a folder name")
    return families_dir


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per tool (the docs' flags are checked against it, tests/test_docs.py)."""
    parser = argparse.ArgumentParser(prog="qtraj", description=__doc__)
    parser.add_argument("--version", action="version", version=f"qtraj {qtraj.__version__}")
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
        description="Per quantization and setting, mean ± 95% CI over seeds (ΔQ L in %, differences in percentage "
                    "points, fp loss in nats) of: the decayed run against the constant-LR run of the same seed at "
                    "equal tokens; the stable-phase trend; the decay within the run; LAWA against the newest "
                    "checkpoint it averages. Each effect: supported / not resolved / opposite. Exit status: 0 when "
                    "the check was computed, whatever it shows; 1 with --strict when an effect with an expected "
                    "direction is not supported; 2 when nothing could be checked (no dataset, an unreadable one, "
                    "or no run with a decay phase and no averages).")
    check.add_argument("--strict", action="store_true",
                       help="exit 1 unless every effect with an expected direction is supported (the stable-phase "
                            "trend, a comparison, does not count; nor does a section that could not be computed)")
    check.add_argument("--cells", action="store_true",
                       help="instead of the report, the decay map's cells: section 1 per model size and tokens per "
                            "parameter (runs whose training log records their size, e.g. a `sweeps:` grid), with the "
                            "evaluation's noise (median half width of the seeds' paired bootstrap intervals)")
    check_config = commands.add_parser(
        "check-config", help="validate a config file as the workflow will, one line per problem",
        description="Reads FILE strictly (YAML syntax errors and keys written twice named with their lines) and "
                    "validates it (every key, the family files and local folders it names, the methods' options) "
                    "without running anything. Snakemake itself reports a missing or unparsable --configfile with "
                    "a traceback; this says it in one line.")
    check_config.add_argument("file")
    status = commands.add_parser(
        "status", help="per trajectory: checkpoints measured, pending and failed",
        description="Reads the config and the results tree (per-job Parquet files, job logs); runs nothing. A "
                    "checkpoint is done when every job measuring it wrote its files, failed when a file is "
                    "unreadable or a job's log records a failure, pending otherwise (a job killed without a word, "
                    "e.g. by a time limit, counts as pending). The logs of what failed are listed. Its jobs are "
                    "those that measure a checkpoint (evaluate_fp, sharpness, quantize); training, cooldowns and the "
                    "jobs that prepare data or draw figures are not counted (`snakemake --dry-run` lists every job).")
    plan = commands.add_parser(
        "plan", help="the jobs and GPU-hours a config asks a cluster for",
        description="Per trajectory and rule: jobs, GPUs, requested runtime and memory per job, GPU-hours, sized as "
                    "the rules size them (qtraj.resources, the Slurm profile's resources). Runtimes are requested "
                    "limits, so the hours are upper bounds. Only the jobs the resource model sizes are counted (train, "
                    "cooldown, evaluate_fp, sharpness, quantize): downloads, data preparation, averaging, the "
                    "aggregate, the science check and figures need no GPU (`snakemake --dry-run` lists every job).")
    families = commands.add_parser(
        "families", help="the catalog of model family files: repo, revisions, parameters, schedule",
        description="Every family file (<slug>.yaml) of a folder, validated as the workflow validates it; a file "
                    "that does not validate is named on stderr (exit status 1), and a family whose file declares a "
                    "caveat gets a warning there. With --verify (needs the hub): each family's revisions against "
                    "the hub's branches, its gating and whether its repo was renamed; exit status 1 when a file "
                    "disagrees with the hub, 2 when the hub cannot be reached.")
    families.add_argument("--families-dir", default=None,
                          help="the folder of family files (default: the --configfile's families_dir, else the "
                               "config schema's default, config/families)")
    families.add_argument("--verify", nargs="?", const=True, default=None, metavar="NAME",
                          help="check every family (or the one named) against the hub: revisions the hub lacks, "
                               "hub branches the file lacks, gated, renamed or missing repos")
    adopt = commands.add_parser(
        "adopt-results", help="let the workflow use an earlier qtraj results folder that has no marker",
        description="The workflow works only in a results folder qtraj created (it carries a .qtraj-results "
                    "marker), since reruns delete outputs. A results folder of a qtraj from before the marker, or one "
                    "copied without hidden files, is adopted here: refused if its top level holds anything qtraj "
                    "never writes; the contents of each folder a job wrote are recorded as qtraj's.")
    adopt.add_argument("folder")
    for command in (query, check):
        command.add_argument("--results-dir", default=None,
                             help="the workflow's results_dir (default: the --configfile's results_dir, else "
                                  "$QTRAJ_RESULTS_DIR, else ./results)")
        command.add_argument("--configfile", default=None, help="a workflow config: read its results_dir")
    status.add_argument("--results-dir", default=None, help="the workflow's results_dir (default: the config's)")
    for command in (status, plan):
        command.add_argument("--configfile", default=DEFAULT_CONFIG,
                             help=f"the workflow config (default: {DEFAULT_CONFIG})")
    families.add_argument("--configfile", default=None,
                          help="a workflow config: list the family files of its families_dir")
    for command in (status, plan, families):
        command.add_argument("--format", choices=["table", "json"], default="table")
    return parser


def _query(args) -> int:
    results_dir = _results_dir(args)
    try:
        relation = run_query(connect(results_dir), args.sql)
        if relation is not None:  # relations are lazy: errors of the query itself surface while printing
            _print(relation, args.format, args.max_rows)
    except (FileNotFoundError, QueryError, BrokenPipeError):
        raise  # no dataset or a refused statement: a user error for _main; a closed pipe: main() ends quietly
    except Exception as error:
        # the SQL itself is wrong (DuckDB's parser and binder errors name the problem, their type says which kind):
        # status 1, apart from the 2 of a missing dataset or a refused statement
        print(f"qtraj: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


def _science_check(args) -> int:
    from qtraj.science import decay_map_cells, measure, render, render_cells

    results_dir = _results_dir(args)
    try:
        science_check = measure(results_dir)
    except FileNotFoundError:
        raise  # no dataset: a user error for _main
    except Exception as error:  # e.g. a dataset aggregated by an older qtraj: the view says what to do
        # status 2, which the help promises for an unreadable dataset; 1 is --strict's, for a check that was computed
        print(f"qtraj: the science check could not be computed: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(render_cells(decay_map_cells(results_dir, science_check)) if args.cells else render(science_check))
    if not science_check.checked:
        return 2  # nothing could be checked (no decay phase, no averages): the help's status 2
    unsupported = science_check.unsupported
    if args.strict and unsupported:
        print(f"qtraj: --strict: {len(unsupported)} effects with an expected direction are not supported",
              file=sys.stderr)
        return 1
    return 0


def _check_config(args) -> int:
    from qtraj.config import load_config, trajectories

    config = load_config(args.file)
    print(f"{args.file}: valid ({len(trajectories(config))} trajectories, {len(config['quantizations'])} "
          "quantizations)")
    return 0


def _status(args) -> int:
    from qtraj.config import load_config
    from qtraj.status import render_status, workflow_status

    statuses = workflow_status(load_config(args.configfile), args.results_dir)
    if args.format == "json":
        _print_json([{**dataclasses.asdict(status), "checkpoints": status.checkpoints} for status in statuses])
    else:
        print(render_status(statuses))
    return 0


def _plan(args) -> int:
    from qtraj.config import load_config
    from qtraj.plan import plan, render_plan, totals_by_rule

    rows = plan(load_config(args.configfile))
    if args.format == "json":
        _print_json({"jobs": [{**dataclasses.asdict(row), "hours": row.hours, "gpu_hours": row.gpu_hours}
                              for row in rows], "totals": totals_by_rule(rows)})
    else:
        print(render_plan(rows))
    return 0


def _families(args) -> int:
    from qtraj.catalog import caveat_warnings, family_catalog, render_catalog

    folder = _families_dir(args)
    if args.verify is not None:
        return _verify_families(folder, None if args.verify is True else args.verify, args.format)
    entries, problems = family_catalog(folder)
    if args.format == "json":
        _print_json([dataclasses.asdict(entry) for entry in entries])
    else:
        print(render_catalog(entries))
    for line in [*problems, *caveat_warnings(entries)]:
        print(f"qtraj: {line}", file=sys.stderr)
    return 1 if problems else 0


def _verify_families(folder: str, name: str | None, output_format: str) -> int:
    from qtraj.catalog import render_verification, verify_catalog

    results = verify_catalog(folder, name)
    if output_format == "json":
        _print_json([dataclasses.asdict(result) for result in results])
    else:
        print(render_verification(results))
    return 1 if any(result.problems for result in results) else 0


def _adopt_results(args) -> int:
    from qtraj.ownership import adopt_results_dir

    sealed = adopt_results_dir(args.folder)
    print(f"{args.folder}: adopted as a qtraj results folder ({sealed} job-written folders recorded)")
    return 0


# One handler per subcommand of build_parser() (tests/test_cli.py checks that the two name the same commands).
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "query": _query,
    "science-check": _science_check,
    "check-config": _check_config,
    "status": _status,
    "plan": _plan,
    "families": _families,
    "adopt-results": _adopt_results,
}

# What a user's input can be refused with (a config, a folder, a statement, a hub out of reach): each names the
# input and the fix, so the message alone is printed, with exit status 2, by _main and nowhere else.
USER_ERRORS = (ConfigError, OwnershipError, FileNotFoundError, QueryError, HubUnreachable)


def main(argv: list[str] | None = None) -> int:
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at exit, where Python would print a traceback
        return status
    except BrokenPipeError:
        # the reader went away (`qtraj plan | head`): stop quietly, with the status of a process that SIGPIPE ends
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as error:
        print(f"qtraj: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
