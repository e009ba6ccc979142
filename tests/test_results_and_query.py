import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from qtraj import results
from qtraj.query import QueryError, connect, query, run_query


def quantized_row(run="wsd", step=10, quantization="gptq-w3g32", loss_q=2.2, loss_fp=2.0, **extra):
    return {"run": run, "checkpoint": f"step{step:06d}", "step": step, "tokens": step * 100, "lr": 1e-3,
            "phase": "stable", "quantization": quantization, "method": quantization.split("-")[0], "bits": 3,
            "group_size": 32, "loss_fp": loss_fp, "loss_q": loss_q,
            "delta_q_loss": results.delta_q_loss(loss_q, loss_fp), **extra}


@pytest.fixture
def results_dir(tmp_path):
    files = []
    for step, loss_q in ((10, 2.2), (20, 2.1)):
        path = tmp_path / "evals" / f"{step}.parquet"
        results.write_rows([quantized_row(step=step, loss_q=loss_q)], results.QUANTIZED_EVAL_SCHEMA, path)
        files.append(str(path))
    fp = tmp_path / "evals" / "fp.parquet"
    results.write_rows([{"run": "wsd", "checkpoint": "step000010", "step": 10, "loss_fp": 2.0}],
                       results.FP_EVAL_SCHEMA, fp)
    results.aggregate({"results": files, "fp_evals": [str(fp)], "training_log": []}, tmp_path / "dataset")
    return tmp_path


def test_delta_q_loss_is_the_relative_increase():
    assert results.delta_q_loss(2.2, 2.0) == pytest.approx(0.1)


def test_rows_get_the_central_schema_with_typed_nulls(tmp_path):
    path = tmp_path / "row.parquet"
    results.write_rows([quantized_row()], results.QUANTIZED_EVAL_SCHEMA, path)
    table = pq.read_table(path)
    assert table.schema.equals(results.QUANTIZED_EVAL_SCHEMA)
    assert table.column("engine").type == "string" and table.column("engine")[0].as_py() is None
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed away


def test_unknown_column_is_refused(tmp_path):
    with pytest.raises(KeyError, match="not in the schema"):
        results.write_rows([quantized_row(loss_quantized=1.0)], results.QUANTIZED_EVAL_SCHEMA, tmp_path / "x.pq")


def test_aggregate_reads_files_written_before_a_column_was_added(tmp_path):
    import pyarrow as pa

    old = tmp_path / "old.parquet"
    pq.write_table(pa.table({"run": ["a"], "checkpoint": ["c"], "step": [1], "loss_fp": [1.0]}), old)
    counts = results.aggregate({"fp_evals": [str(old)]}, tmp_path / "dataset")
    table = pq.read_table(tmp_path / "dataset" / "fp_evals.parquet")
    assert counts == {"fp_evals": 1} and table.schema.equals(results.FP_EVAL_SCHEMA)


def test_aggregate_refuses_non_finite_results(tmp_path):
    path = tmp_path / "nan.parquet"
    results.write_rows([quantized_row(loss_q=math.nan)], results.QUANTIZED_EVAL_SCHEMA, path)
    with pytest.raises(ValueError, match=r"loss_q is nan.*'run': 'wsd'"):
        results.aggregate({"results": [str(path)]}, tmp_path / "dataset")


def test_query_answers_sql_over_the_views(results_dir):
    rows = query("SELECT step, round(delta_q_loss, 6) AS d FROM results ORDER BY step", results_dir)
    assert rows == [{"step": 10, "d": 0.1}, {"step": 20, "d": 0.05}]
    joined = query("SELECT r.step FROM results r JOIN fp_evals f USING (run, checkpoint)", results_dir)
    assert joined == [{"step": 10}]


@pytest.mark.parametrize("sql", ["COPY results TO 'out.csv'", "CREATE TABLE x AS SELECT 1",
                                 "SET enable_external_access = true", "SELECT 1; DROP VIEW results"])
def test_query_is_read_only(results_dir, sql):
    with pytest.raises(QueryError, match="read-only"):
        run_query(connect(results_dir), sql)


def test_query_cannot_read_other_files(results_dir):
    with pytest.raises(Exception, match="disabled"):
        run_query(connect(results_dir), "SELECT * FROM read_csv('/etc/hostname')").fetchall()


def test_missing_dataset_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the workflow first"):
        connect(tmp_path)


def test_cli_prints_csv(results_dir, capsys):
    from qtraj.cli import main

    assert main(["query", "SELECT step FROM results ORDER BY step", "--results-dir", str(results_dir),
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["step", "10", "20"]
    assert main(["query", "DELETE FROM results", "--results-dir", str(results_dir)]) == 2


def test_cli_reports_bad_sql_and_missing_results(results_dir, tmp_path, capsys):
    from qtraj.cli import main

    assert main(["query", "SELECT no_such_column FROM results", "--results-dir", str(results_dir)]) == 1
    assert "no_such_column" in capsys.readouterr().err
    assert main(["query", "SELECT 1", "--results-dir", str(tmp_path / "nowhere")]) == 2
    assert "run the workflow first" in capsys.readouterr().err


def accuracy_row(task, value, stderr, quantization=None, metric="acc", item_scores=None):
    return {"run": "wsd", "checkpoint": "step000010", "step": 10, "quantization": quantization,
            "method": quantization and "gptq", "bits": quantization and 3, "task": task, "configured": True,
            "metric": metric, "filter": "none", "value": value, "stderr": stderr, "item_scores": item_scores}


def accuracy_dataset(tmp_path, rows):
    path = tmp_path / "accuracy.parquet"
    results.write_rows(rows, results.ACCURACY_SCHEMA, path)
    evals = tmp_path / "evals.parquet"
    results.write_rows([quantized_row()], results.QUANTIZED_EVAL_SCHEMA, evals)
    results.aggregate({"results": [str(evals)], "accuracy": [str(path)]}, tmp_path / "dataset")
    return tmp_path


def test_accuracy_views_carry_standard_errors(tmp_path):
    """Per task: fp and quantized standard errors combined as independent; the summary's mean: the root of the
    summed variances over the task count, and the relative drop's scaled by 1 / (1 - acc_fp). acc_norm of t1 is
    not the headline metric (acc is) and must not count."""
    directory = accuracy_dataset(tmp_path, [
        accuracy_row("t1", 0.6, 0.03), accuracy_row("t1", 0.55, 0.04, "gptq-w3g32"),
        accuracy_row("t1", 0.9, 0.5, metric="acc_norm"), accuracy_row("t1", 0.1, 0.5, "gptq-w3g32", "acc_norm"),
        accuracy_row("t2", 0.7, 0.02), accuracy_row("t2", 0.66, 0.05, "gptq-w3g32")])
    drops = query("SELECT task, abs_drop_stderr, rel_drop_stderr FROM accuracy_drop WHERE metric = 'acc' "
                  "ORDER BY task", directory)
    assert drops[0]["abs_drop_stderr"] == pytest.approx(0.05)
    assert drops[0]["rel_drop_stderr"] == pytest.approx(0.05 / 0.4)
    (summary,) = query("SELECT * FROM accuracy_summary", directory)
    variances = {"t1": 0.03**2 + 0.04**2, "t2": 0.02**2 + 0.05**2}
    assert summary["tasks"] == 2
    assert summary["mean_abs_drop_stderr"] == pytest.approx(math.sqrt(sum(variances.values())) / 2)
    assert summary["mean_rel_drop_stderr"] == pytest.approx(
        math.sqrt(variances["t1"] / 0.4**2 + variances["t2"] / 0.3**2) / 2)


def test_the_accuracy_drop_of_models_scored_item_by_item_has_a_paired_standard_error(tmp_path):
    """Both models answer the same 40 items and differ on 4 of them: the drop's standard error is that of the
    per-item differences' mean (~0.04), far below the two accuracies' own errors combined (~0.11), which would
    leave a 10-point drop unresolved. Items of another length cannot be paired: the independent one then."""
    rng = np.random.default_rng(0)
    fp = rng.integers(0, 2, 40).astype(float)
    quantized = fp.copy()
    quantized[np.flatnonzero(fp)[:4]] = 0.0  # four right answers lost
    own = [float(np.sqrt(scores.mean() * (1 - scores.mean()) / 39)) for scores in (fp, quantized)]
    directory = accuracy_dataset(tmp_path, [
        accuracy_row("t1", fp.mean(), own[0], item_scores=list(fp)),
        accuracy_row("t1", quantized.mean(), own[1], "gptq-w3g32", item_scores=list(quantized)),
        accuracy_row("t2", fp.mean(), own[0], item_scores=list(fp)),
        accuracy_row("t2", quantized.mean(), own[1], "gptq-w3g32", item_scores=list(quantized[:-1]))])
    t1, t2 = query("SELECT * FROM accuracy_drop ORDER BY task", directory)
    paired = float(np.std(fp - quantized, ddof=1) / np.sqrt(40))
    assert (t1["abs_drop"], t1["stderr_paired"]) == (pytest.approx(0.1), True)
    assert t1["abs_drop_stderr"] == pytest.approx(paired) and paired < 0.5 * math.hypot(*own)
    assert t1["rel_drop_stderr"] == pytest.approx(paired / (1 - fp.mean()))
    assert (t2["stderr_paired"], t2["abs_drop_stderr"]) == (False, pytest.approx(math.hypot(*own)))


def test_accuracy_summary_has_no_standard_error_when_a_task_lacks_one(tmp_path):
    """A mean over two tasks with one standard error missing would understate it: null instead."""
    directory = accuracy_dataset(tmp_path, [
        accuracy_row("t1", 0.6, 0.03), accuracy_row("t1", 0.55, 0.04, "gptq-w3g32"),
        accuracy_row("t2", 0.7, None), accuracy_row("t2", 0.66, 0.05, "gptq-w3g32")])
    (summary,) = query("SELECT mean_abs_drop, mean_abs_drop_stderr, mean_rel_drop_stderr FROM accuracy_summary",
                       directory)
    assert summary["mean_abs_drop"] == pytest.approx((0.05 + 0.04) / 2)
    assert summary["mean_abs_drop_stderr"] is None and summary["mean_rel_drop_stderr"] is None


def test_a_write_killed_midway_leaves_the_old_file_whole_and_no_temporary(tmp_path, monkeypatch):
    """A job killed while writing its result (here: the Parquet writer fails after half a file) leaves the previous
    result readable, byte for byte, and nothing else in the folder."""
    import pyarrow.parquet

    path = tmp_path / "evals" / "result.parquet"
    results.write_rows([quantized_row(loss_q=2.2)], results.QUANTIZED_EVAL_SCHEMA, path)
    before = path.read_bytes()
    real_write = pyarrow.parquet.write_table

    def killed_midway(table, where, **kwargs):
        real_write(table, where, **kwargs)
        with open(where, "r+b") as handle:  # what a kill leaves: the first half of the file
            handle.truncate(len(before) // 2)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(pyarrow.parquet, "write_table", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        results.write_rows([quantized_row(loss_q=9.9)], results.QUANTIZED_EVAL_SCHEMA, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and pq.read_table(path).column("loss_q").to_pylist() == [2.2]
    assert [item.name for item in path.parent.iterdir()] == ["result.parquet"]


def test_the_aggregate_sorts_every_table_by_its_keys(tmp_path):
    """Row order in the dataset comes from the table's sort keys, never from file names or the order rows were
    written: files here hold rows in reverse order and are named against it."""
    import pyarrow as pa

    def value(field, rank):
        if pa.types.is_string(field.type):
            return f"{field.name}-{rank}"
        return rank if pa.types.is_integer(field.type) else float(rank + 1)

    for name, table in results.TABLES.items():
        required = [field for field in table.schema if not field.nullable or field.name in table.finite]
        keys = [table.schema.field(key) for key in table.sort_keys]
        # every combination of two values per key, written backwards over two files whose names sort the other way
        combos = [tuple((rank >> shift) & 1 for shift in reversed(range(len(keys)))) for rank in range(2 ** len(keys))]
        rows = [{**{field.name: value(field, 0) for field in required},
                 **{field.name: value(field, bit) for field, bit in zip(keys, combo, strict=True)}}
                for combo in reversed(combos)]
        half = len(rows) // 2
        folder = tmp_path / name
        for file_name, part in (("b.parquet", rows[half:]), ("a.parquet", rows[:half])):
            results.write_rows(part, table.schema, folder / file_name)
        results.aggregate({name: [str(folder / "b.parquet"), str(folder / "a.parquet")]}, tmp_path / "dataset")
        written = pq.read_table(tmp_path / "dataset" / f"{name}.parquet")
        order = list(zip(*(written.column(key).to_pylist() for key in table.sort_keys), strict=True))
        assert order == [tuple(value(field, bit) for field, bit in zip(keys, combo, strict=True))
                         for combo in combos], name


@pytest.mark.parametrize(("sql", "kind"), [
    ("EXPLAIN SELECT 1", "SELECT"),
    ("EXPLAIN ANALYZE CREATE TABLE x AS SELECT 1", "CREATE"),
    ("-- a comment\n/* and another */ explain analyse INSERT INTO results SELECT * FROM results", "INSERT"),
    ("EXPLAIN (FORMAT json) COPY results TO 'out.csv'", "COPY"),
])
def test_the_statement_filter_looks_through_explain(results_dir, sql, kind):
    """EXPLAIN ANALYZE runs what it explains: the filter judges the explained statement (the read-only connection
    would refuse a write anyway; this layer names it first)."""
    from qtraj.query import _statement_kind

    connection = connect(results_dir)
    [statement] = connection.extract_statements(sql)
    assert _statement_kind(connection, statement).name == kind
    if kind != "SELECT":
        with pytest.raises(QueryError, match=f"read-only statements .*; got {kind}"):
            run_query(connection, sql)
