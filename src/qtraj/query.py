"""SQL over the results dataset through DuckDB views, read-only."""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path

import duckdb

from qtraj.results import TABLES, dataset_file

# view name -> file of the results dataset (qtraj.results.TABLES: what each holds; the aggregate step writes them)
DATASET_FILES = {name: Path(dataset_file(name)).name for name in TABLES}

# What makes a constant-LR run the control of a decayed run (view control_effect, and qtraj.science naming the runs
# that have none): the same seed, peak LR, weight decay and model size (a sweep trains several; null where the
# training log predates the column), and, for a constant branch of a run (parent_run), that run only.
CONTROL_KEYS = ("seed", "peak_lr", "weight_decay", "parameters")


def is_control_of(constant: dict, decayed: str, decayed_settings: dict) -> bool:
    """Whether the constant-LR run with `runs` row `constant` controls run `decayed` (its `runs` row)."""
    return (all(constant[key] == decayed_settings[key] for key in CONTROL_KEYS)
            and constant["parent_run"] in (None, decayed))


# Canned views: the paper's questions as SQL over the tables above. Name -> (tables it needs, SELECT). A view is
# created only when its tables are in the dataset; README.md ("Canned views") shows example queries.
CANNED_VIEWS = {
    # one row per trained run or cooldown: the settings its training log carries
    "runs": (("training_log",), """
        SELECT run, any_value(schedule) AS schedule, any_value(peak_lr) AS peak_lr,
               any_value(weight_decay) AS weight_decay, any_value(seed) AS seed, any_value(parent_run) AS parent_run,
               max(step) AS last_step, max(tokens) AS last_tokens, any_value(parameters) AS parameters
        FROM training_log GROUP BY run"""),
    # ΔQ L by training phase (warmup / stable / decay / anneal / post-training) per trajectory and quantization
    "error_by_phase": (("results",), """
        SELECT run, quantization, any_value(method) AS method, any_value(bits) AS bits, phase,
               count(*) AS checkpoints, avg(delta_q_loss) AS mean_delta_q_loss,
               min(delta_q_loss) AS min_delta_q_loss, max(delta_q_loss) AS max_delta_q_loss,
               avg(loss_fp) AS mean_loss_fp, min(step) AS first_step, max(step) AS last_step
        FROM results GROUP BY run, quantization, phase"""),
    # Pearson correlation of ΔQ L with the LR at the checkpoint, with tokens seen and with the fp loss, per
    # trajectory and quantization (null where a column is constant or there are fewer than 3 checkpoints)
    "error_correlations": (("results",), """
        SELECT run, quantization, any_value(method) AS method, any_value(bits) AS bits, count(*) AS checkpoints,
               CASE WHEN count(*) >= 3 THEN corr(delta_q_loss, lr) END AS corr_lr,
               CASE WHEN count(*) >= 3 THEN corr(delta_q_loss, tokens) END AS corr_tokens,
               CASE WHEN count(*) >= 3 THEN corr(delta_q_loss, loss_fp) END AS corr_loss_fp
        FROM results WHERE step IS NOT NULL GROUP BY run, quantization"""),
    # the LR decay: the last checkpoint before it (warmup / stable) against the last one of the decay, per
    # trajectory and quantization; the paper: loss falls (loss_fp_change < 0) while ΔQ L rises
    "decay_effect": (("results",), """
        WITH ranked AS (
            SELECT *, row_number() OVER (PARTITION BY run, quantization, phase = 'decay' ORDER BY step DESC) AS newest
            FROM results WHERE step IS NOT NULL AND phase IN ('warmup', 'stable', 'decay'))
        SELECT before.run, before.quantization, before.method, before.bits,
               before.checkpoint AS checkpoint_before, after.checkpoint AS checkpoint_after,
               before.loss_fp AS loss_fp_before, after.loss_fp AS loss_fp_after,
               after.loss_fp - before.loss_fp AS loss_fp_change,
               before.delta_q_loss AS delta_q_loss_before, after.delta_q_loss AS delta_q_loss_after,
               after.delta_q_loss - before.delta_q_loss AS delta_q_loss_change,
               after.delta_q_loss / before.delta_q_loss AS delta_q_loss_ratio
        FROM ranked AS before JOIN ranked AS after USING (run, quantization)
        WHERE before.newest = 1 AND before.phase <> 'decay' AND after.newest = 1 AND after.phase = 'decay'"""),
    # the LR decay against the constant-LR control at equal tokens: each trained run with a decay phase against
    # every constant-schedule run of the same seed, peak_lr and weight_decay (a run trained at a constant LR from
    # scratch, or a `constant` branch of this very run: cooldowns with shape constant), at each step (and token
    # count) both have a checkpoint; at_end marks the decayed run's last checkpoint. The paper: there the decayed run
    # has the lower fp loss (loss_fp_difference < 0) and the higher ΔQ L (delta_q_loss_difference > 0)
    "control_effect": (("results", "training_log"), """
        WITH decayed AS (
            SELECT * FROM runs
            WHERE schedule <> 'constant'
              AND run IN (SELECT run FROM results WHERE phase = 'decay' AND source = 'trained')),
        constant AS (SELECT * FROM runs WHERE schedule = 'constant'),
        trained AS (
            SELECT *, step = max(step) OVER (PARTITION BY run, quantization) AS at_end
            FROM results WHERE source = 'trained' AND step IS NOT NULL),
        control AS (SELECT * FROM results WHERE source IN ('trained', 'cooldown') AND step IS NOT NULL)
        SELECT d.run AS decayed_run, c.run AS constant_run, d.schedule, d.seed, d.peak_lr, d.weight_decay,
               dr.quantization, dr.method, dr.bits, dr.step, dr.tokens, dr.phase, dr.at_end,
               dr.checkpoint AS checkpoint_decayed, cr.checkpoint AS checkpoint_constant,
               dr.loss_fp AS loss_fp_decayed, cr.loss_fp AS loss_fp_constant,
               dr.loss_fp - cr.loss_fp AS loss_fp_difference,
               dr.delta_q_loss AS delta_q_loss_decayed, cr.delta_q_loss AS delta_q_loss_constant,
               dr.delta_q_loss - cr.delta_q_loss AS delta_q_loss_difference
        FROM decayed AS d
        JOIN constant AS c ON """ + " AND ".join(f"c.{key} IS NOT DISTINCT FROM d.{key}" for key in CONTROL_KEYS) + """
         AND (c.parent_run IS NULL OR c.parent_run = d.run)  -- a constant branch controls only its own parent
        JOIN trained AS dr ON dr.run = d.run
        JOIN control AS cr ON cr.run = c.run AND cr.quantization = dr.quantization
         AND cr.step = dr.step AND cr.tokens IS NOT DISTINCT FROM dr.tokens"""),
    # weight averaging: every averaged checkpoint against the newest checkpoint it averages (a soup: its last
    # ingredient), same quantization; the paper: averaging lowers ΔQ L (delta_q_loss_change < 0)
    "averaging_effect": (("results",), """
        SELECT avg.run AS average, avg.checkpoint, avg.parent_run AS run, avg.quantization, avg.method, avg.bits,
               avg.step, avg.tokens, avg.phase,
               parent.loss_fp AS loss_fp_parent, avg.loss_fp AS loss_fp_average,
               avg.loss_fp - parent.loss_fp AS loss_fp_change,
               parent.delta_q_loss AS delta_q_loss_parent, avg.delta_q_loss AS delta_q_loss_average,
               avg.delta_q_loss - parent.delta_q_loss AS delta_q_loss_change
        FROM results AS avg JOIN results AS parent
          ON parent.run = avg.parent_run AND parent.checkpoint = avg.parent_checkpoint
         AND parent.quantization = avg.quantization
        WHERE avg.source = 'averaged'"""),
    # cooldowns: each branch's end against the checkpoint it branched from, and against the parent run at the same
    # step where it has one (equal tokens, no decay: the controlled comparison of the paper's cooldown experiment)
    "cooldown_effect": (("results",), """
        SELECT c.run AS cooldown, c.checkpoint, c.parent_run AS run, c.parent_checkpoint AS branch, c.quantization,
               c.method, c.bits, p.step AS branch_step, c.step,
               p.loss_fp AS loss_fp_branch, c.loss_fp AS loss_fp_cooled, c.loss_fp - p.loss_fp AS loss_fp_change,
               p.delta_q_loss AS delta_q_loss_branch, c.delta_q_loss AS delta_q_loss_cooled,
               c.delta_q_loss - p.delta_q_loss AS delta_q_loss_change,
               same.loss_fp AS loss_fp_undecayed, same.delta_q_loss AS delta_q_loss_undecayed
        FROM results AS c
        JOIN results AS p ON p.run = c.parent_run AND p.checkpoint = c.parent_checkpoint
         AND p.quantization = c.quantization
        LEFT JOIN results AS same ON same.run = c.parent_run AND same.step = c.step
         AND same.quantization = c.quantization
        WHERE c.source = 'cooldown'"""),
    # accuracy of each quantized model against its fp checkpoint, per task / metric / filter: the absolute drop
    # and rel_drop = (acc_fp - acc_q) / (1 - acc_fp), the relative increase of the error rate (ΔQ L's analogue).
    # Standard errors paired where both models' per-item scores are there (both answer the same items: the
    # standard error of the mean per-item difference), else (older datasets, metrics without per-item scores)
    # lm-eval's per-task ones combined as if independent; stderr_paired says which. rel_drop's treats 1 - acc_fp
    # as exact
    "accuracy_drop": (("accuracy",), """
        WITH pairs AS (
            SELECT q.*, fp.value AS acc_fp,
                   CASE WHEN len(fp.item_scores) = len(q.item_scores) AND len(q.item_scores) > 1
                        THEN list_aggregate(list_transform(range(1, len(q.item_scores) + 1),
                                                           lambda i: fp.item_scores[i] - q.item_scores[i]),
                                            'stddev_samp') / sqrt(len(q.item_scores)) END AS paired_stderr,
                   sqrt(fp.stderr ^ 2 + q.stderr ^ 2) AS independent_stderr
            FROM accuracy AS q JOIN accuracy AS fp
              ON fp.run = q.run AND fp.checkpoint = q.checkpoint AND fp.quantization IS NULL
             AND fp.task = q.task AND fp.metric = q.metric AND fp.filter = q.filter
            WHERE q.quantization IS NOT NULL)
        SELECT run, checkpoint, step, tokens, lr, phase, source, quantization, method, bits, task, metric, filter,
               acc_fp, value AS acc_q, acc_fp - value AS abs_drop, (acc_fp - value) / nullif(1 - acc_fp, 0) AS rel_drop,
               coalesce(paired_stderr, independent_stderr) AS abs_drop_stderr,
               coalesce(paired_stderr, independent_stderr) / nullif(1 - acc_fp, 0) AS rel_drop_stderr,
               paired_stderr IS NOT NULL AS stderr_paired, samples, configured
        FROM pairs"""),
    # the drops averaged over the configured tasks (a group such as mmlu once, by its own score), one headline
    # metric per task (acc, else acc_norm), per quantized model; the mean's standard error from the tasks' ones
    # (sqrt of the summed variances over the count; null when a task has none)
    "accuracy_summary": (("accuracy",), """
        WITH headline AS (
            SELECT *, row_number() OVER (PARTITION BY run, checkpoint, quantization, task
                                         ORDER BY metric = 'acc' DESC, metric) AS pick
            FROM accuracy_drop WHERE metric IN ('acc', 'acc_norm') AND filter = 'none' AND configured IS NOT false)
        SELECT run, checkpoint, any_value(step) AS step, any_value(tokens) AS tokens, any_value(phase) AS phase,
               quantization, any_value(method) AS method, any_value(bits) AS bits, count(*) AS tasks,
               avg(acc_fp) AS mean_acc_fp, avg(acc_q) AS mean_acc_q, avg(abs_drop) AS mean_abs_drop,
               avg(rel_drop) AS mean_rel_drop,
               CASE WHEN count(abs_drop_stderr) = count(*)
                    THEN sqrt(sum(abs_drop_stderr ^ 2)) / count(*) END AS mean_abs_drop_stderr,
               CASE WHEN count(rel_drop_stderr) = count(rel_drop)
                    THEN sqrt(sum(rel_drop_stderr ^ 2)) / count(rel_drop) END AS mean_rel_drop_stderr
        FROM headline WHERE pick = 1 GROUP BY run, checkpoint, quantization"""),
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


class DatasetError(RuntimeError):
    """A file of the results dataset is unreadable (truncated, overwritten); the message says how to rebuild it."""


def dataset_dir(results_dir: str | Path) -> Path:
    return Path(results_dir) / "dataset"


def connect(results_dir: str | Path = "results", read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with one view or table per dataset file and one view per canned question.

    read_only (what `qtraj query` and `query()` get): the tables are copied into a database file in a private
    temporary folder, which is then opened read-only, with no file access and a locked configuration. So no
    statement — COPY, ATTACH, EXPLAIN ANALYZE of a write, read_csv of another file, CREATE OR REPLACE VIEW,
    INSERT, INSTALL/LOAD — can read or write a file or change a table or view, whatever a filter of statement
    kinds would miss. The copy lives on disk, not in memory. read_only=False is for qtraj's own SQL (figures,
    the science check): lazy views over the Parquet files, nothing copied.
    """
    directory = dataset_dir(results_dir).resolve()
    present = {view: directory / name for view, name in DATASET_FILES.items() if (directory / name).is_file()}
    if "results" not in present:
        raise FileNotFoundError(
            f"no results dataset in {directory}: run the workflow first (`make run`, or `snakemake --cores 2` "
            "with your config), or point --results-dir at the results_dir of your config"
        )
    if not read_only:
        connection = duckdb.connect(":memory:")
        _create_tables(connection, present, directory, views=True)
        return connection
    scratch = Path(tempfile.mkdtemp(prefix="qtraj-query-"))
    atexit.register(shutil.rmtree, scratch, True)
    database = scratch / "dataset.duckdb"
    with duckdb.connect(str(database)) as writer:
        _create_tables(writer, present, directory, views=False)
    return duckdb.connect(str(database), read_only=True, config={
        "enable_external_access": False, "temp_directory": str(scratch / "spill"), "lock_configuration": True})


def _create_tables(connection: duckdb.DuckDBPyConnection, present: dict[str, Path], directory: Path,
                   views: bool) -> None:
    """The dataset's tables (copied, or views over the files) and the canned views over them."""
    for table, path in present.items():
        try:
            # the Python API takes the path as a value: no quoting of paths into SQL
            relation = connection.read_parquet(str(path), union_by_name=True)
            if views:
                relation.create_view(table)
            else:
                relation.create(table)
        except duckdb.Error as error:
            raise DatasetError(
                f"the dataset file {path} cannot be read ({type(error).__name__}: {error}); it is rebuilt from the "
                "per-job results by `snakemake --cores 2 --forcerun aggregate` (with your --configfile)") from error
    for view, (tables, select) in CANNED_VIEWS.items():
        if all(table in present for table in tables):
            try:
                connection.execute(f"CREATE VIEW {view} AS {select}")
            except duckdb.BinderException:
                # a dataset aggregated by an older qtraj lacks a column this view reads: the tables still work,
                # and the view says what to do when it is used
                message = (f"view {view} needs columns that {directory} lacks (aggregated by an older qtraj): "
                           "rebuild it with `snakemake --cores 2 --forcerun aggregate`").replace("'", "''")
                connection.execute(f"CREATE VIEW {view} AS SELECT error('{message}')")


def run_query(connection: duckdb.DuckDBPyConnection, sql: str) -> duckdb.DuckDBPyRelation | None:
    """Run `sql` (one or more statements, each read-only); returns the last statement's result."""
    statements = connection.extract_statements(sql)
    if not statements:
        raise QueryError("the query is empty")
    for statement in statements:
        kind = _statement_kind(connection, statement)
        if kind not in READ_ONLY_STATEMENTS:
            raise QueryError(f"only read-only statements (SELECT, DESCRIBE, SHOW, EXPLAIN of those) are allowed; "
                             f"got {kind.name}: {statement.query.strip()[:80]}")
    for statement in statements[:-1]:
        connection.execute(statement)
    return connection.sql(statements[-1].query)


# EXPLAIN, after any comments, with its ANALYZE or (options)
EXPLAIN_PREFIX = re.compile(r"^(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*EXPLAIN\s+(?:ANALY[SZ]E\s+|\(.*?\)\s*)?",
                            re.IGNORECASE | re.DOTALL)


def _statement_kind(connection: duckdb.DuckDBPyConnection, statement) -> duckdb.StatementType:
    """A statement's type, looking through EXPLAIN (EXPLAIN ANALYZE executes what it explains): a clear refusal
    before the read-only database (`connect`) would refuse it anyway."""
    if statement.type != duckdb.StatementType.EXPLAIN:
        return statement.type
    inner = connection.extract_statements(EXPLAIN_PREFIX.sub("", statement.query, count=1))
    return inner[0].type if len(inner) == 1 else duckdb.StatementType.INVALID


def query(sql: str, results_dir: str | Path = "results"):
    """Convenience for notebooks: the answer as a list of dicts."""
    relation = run_query(connect(results_dir), sql)
    if relation is None:
        return []
    columns = relation.columns
    return [dict(zip(columns, row, strict=True)) for row in relation.fetchall()]
