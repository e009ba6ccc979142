"""The central schemas of qtraj's result tables, atomic Parquet writes, and the aggregate dataset.

Columns are only ever added, never retyped: readers use DuckDB's `union_by_name`, so old files stay valid.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qtraj.checkpoints import CheckpointInfo
from qtraj.provenance import TRACKED_LIBRARIES, version_column

# The columns every row of a checkpoint carries: qtraj.checkpoints.CheckpointInfo's fields, typed from its
# annotations (`int | None` -> int64); run and checkpoint, which name every row, are never null.
ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}
CHECKPOINT_FIELDS = [
    pa.field(field.name, ARROW_TYPES[field.type.split(" | ")[0]], nullable=field.name not in ("run", "checkpoint"))
    for field in fields(CheckpointInfo)
]

# What every row carries to be traced back to the code and settings that made it (qtraj.provenance).
PROVENANCE_FIELDS = [
    pa.field("qtraj_version", pa.string()),
    pa.field("config_hash", pa.string()),
    pa.field("device", pa.string()),
    pa.field("created_at", pa.timestamp("us")),
    *(pa.field(version_column(name), pa.string()) for name in TRACKED_LIBRARIES),
]

# Added later (older per-job files lack it: null): each validation block's mean loss, in block order, so a paired
# bootstrap can resample the blocks two models were scored on (qtraj.science.paired_bootstrap_interval).
BLOCK_LOSSES = pa.list_(pa.float64())

FP_EVAL_SCHEMA = pa.schema([
    *CHECKPOINT_FIELDS,
    pa.field("loss_fp", pa.float64()),
    pa.field("ppl_fp", pa.float64()),
    pa.field("eval_tokens", pa.int64()),
    pa.field("eval_seconds", pa.float64()),
    *PROVENANCE_FIELDS,
    # columns added later (null in older files)
    pa.field("eval_bos", pa.bool_()),  # blocks start with the tokenizer's <bos> (context, never scored)
    pa.field("loss_fraction_of_uniform", pa.float64()),  # loss_fp / ln V: 1 = uniform guessing (qtraj.sanity)
    pa.field("block_losses", BLOCK_LOSSES),
])

QUANTIZED_EVAL_SCHEMA = pa.schema([
    *CHECKPOINT_FIELDS,
    pa.field("quantization", pa.string(), nullable=False),  # the config entry, e.g. gptq-w3g32
    pa.field("method", pa.string()),
    pa.field("bits", pa.int32()),
    pa.field("group_size", pa.int32()),  # null: per-channel
    pa.field("symmetric", pa.bool_()),
    pa.field("options", pa.string()),  # the method's other options, as JSON
    pa.field("engine", pa.string()),
    pa.field("engine_version", pa.string()),
    pa.field("loss_fp", pa.float64()),
    pa.field("loss_q", pa.float64()),
    pa.field("delta_q_loss", pa.float64()),  # L_q / L_fp - 1, the paper's ΔQ L
    pa.field("loss_diff", pa.float64()),  # L_q - L_fp
    pa.field("ppl_fp", pa.float64()),
    pa.field("ppl_q", pa.float64()),
    pa.field("eval_tokens", pa.int64()),
    pa.field("calibration_samples", pa.int32()),
    pa.field("calibration_seq_len", pa.int32()),
    # MoE models: which calibration tokens each expert saw (null: the model has no fused experts)
    pa.field("expert_calibration", pa.string()),
    pa.field("quantize_seconds", pa.float64()),
    pa.field("eval_seconds", pa.float64()),
    *PROVENANCE_FIELDS,
    pa.field("eval_bos", pa.bool_()),  # added later; the same blocks as the fp row's (checked)
    pa.field("block_losses", BLOCK_LOSSES),  # loss_q per validation block, in the fp row's block order
])

TRAINING_LOG_SCHEMA = pa.schema([
    pa.field("run", pa.string(), nullable=False),
    pa.field("schedule", pa.string()),  # the run's settings, the same on every row (view `runs`)
    pa.field("peak_lr", pa.float64()),
    pa.field("weight_decay", pa.float64()),
    pa.field("seed", pa.int64()),
    pa.field("parent_run", pa.string()),  # cooldowns: the run and checkpoint the branch resumed from
    pa.field("parent_checkpoint", pa.string()),
    pa.field("step", pa.int64()),
    pa.field("tokens", pa.int64()),
    pa.field("lr", pa.float64()),
    pa.field("train_loss", pa.float64()),
    pa.field("elapsed_s", pa.float64()),
    pa.field("parameters", pa.int64()),  # added later: the model's parameter count (a run's size, in the science check)
])

LAYER_ERROR_SCHEMA = pa.schema([
    *CHECKPOINT_FIELDS,
    pa.field("quantization", pa.string(), nullable=False),
    pa.field("method", pa.string()),
    pa.field("bits", pa.int32()),
    pa.field("group_size", pa.int32()),
    pa.field("engine", pa.string()),
    pa.field("layer", pa.string(), nullable=False),  # module path, e.g. model.layers.0.mlp.down_proj
    pa.field("layer_index", pa.int32()),  # transformer block
    pa.field("module_type", pa.string()),  # q_proj, k_proj, ..., down_proj
    pa.field("weight_error", pa.float64()),  # ||W - Ŵ||_F / ||W||_F
    pa.field("weight_error_abs", pa.float64()),  # ||W - Ŵ||_F
    pa.field("recon_error", pa.float64()),  # ||X Wᵀ - X Ŵᵀ||_F on calibration inputs X
    pa.field("recon_error_rel", pa.float64()),  # recon_error / ||X Wᵀ||_F
    pa.field("input_rows", pa.int64()),  # tokens in X
    pa.field("qtraj_version", pa.string()),
    pa.field("config_hash", pa.string()),
])

SHARPNESS_SCHEMA = pa.schema([
    *CHECKPOINT_FIELDS,
    pa.field("top_eigenvalue", pa.float64()),  # largest (algebraic) Hessian eigenvalue of the validation loss
    pa.field("iterations", pa.int32()),  # Lanczos steps (Hessian-vector products) taken
    pa.field("converged", pa.bool_()),
    pa.field("eigenvalue_residual", pa.float64()),  # ‖Hv − θv‖: bounds |top_eigenvalue − the true eigenvalue|
    pa.field("sharpness_tokens", pa.int64()),  # scored predictions the loss averages over
    pa.field("sharpness_seconds", pa.float64()),
    *PROVENANCE_FIELDS,
    pa.field("eval_bos", pa.bool_()),  # added later: the blocks start with the tokenizer's <bos>
])

ACCURACY_SCHEMA = pa.schema([
    *CHECKPOINT_FIELDS,
    pa.field("quantization", pa.string()),  # null: the full-precision model
    pa.field("method", pa.string()),
    pa.field("bits", pa.int32()),
    pa.field("group_size", pa.int32()),
    pa.field("task", pa.string(), nullable=False),  # lm-eval task or group (a group's subtasks have rows too)
    pa.field("configured", pa.bool_()),  # named in the config (false: a subtask of a configured group)
    pa.field("metric", pa.string(), nullable=False),  # acc, acc_norm, ... (lm-eval's "metric,filter" key, split)
    pa.field("filter", pa.string()),  # lm-eval's filter; "none" for multiple-choice log-likelihood tasks
    pa.field("value", pa.float64()),
    pa.field("stderr", pa.float64()),
    pa.field("samples", pa.int64()),  # items scored (after `limit`)
    # each item's score (1/0 for acc) in lm-eval's doc_id order: the fp and a quantized model answer the same
    # items, so their difference per item gives the drop a paired standard error (qtraj.science)
    pa.field("item_scores", pa.list_(pa.float64())),
    pa.field("num_fewshot", pa.int32()),
    pa.field("accuracy_seconds", pa.float64()),  # all tasks of the model, together
    pa.field("lm_eval_version", pa.string()),
    *PROVENANCE_FIELDS,
])



@dataclass(frozen=True)
class Table:
    """One table of the results dataset: the one place its schema, grain, row order and files are declared.

    `per_job` are the files the workflow's jobs write, relative to the results directory, with `{run}`,
    `{checkpoint}` and `{quantization}` to fill (the rules' outputs and the aggregate's inputs use them);
    `finite` the columns that must hold finite numbers (a NaN is a broken job, refused when aggregating)."""

    schema: pa.Schema
    grain: str
    sort_keys: tuple[str, ...]
    per_job: tuple[str, ...]
    finite: tuple[str, ...] = ()


TABLES: dict[str, Table] = {
    "results": Table(QUANTIZED_EVAL_SCHEMA, "one row per (run, checkpoint, quantization)",
                     ("run", "step", "quantization"), ("evals/quantized/{run}/{checkpoint}/{quantization}.parquet",),
                     ("loss_fp", "loss_q", "delta_q_loss")),
    "fp_evals": Table(FP_EVAL_SCHEMA, "one row per checkpoint: full-precision validation loss", ("run", "step"),
                      ("evals/fp/{run}/{checkpoint}.parquet",)),
    "training_log": Table(TRAINING_LOG_SCHEMA, "trained runs and cooldowns: LR and training loss over steps",
                          ("run", "step"), ("training/{run}.parquet", "training/{run}/{checkpoint}.parquet")),
    "layer_errors": Table(LAYER_ERROR_SCHEMA, "one row per (run, checkpoint, quantization, linear layer)",
                          ("run", "step", "quantization", "layer"),
                          ("evals/layers/{run}/{checkpoint}/{quantization}.parquet",), ("weight_error", "recon_error")),
    "sharpness": Table(SHARPNESS_SCHEMA, "one row per checkpoint: top Hessian eigenvalue of the validation loss",
                       ("run", "step"), ("evals/sharpness/{run}/{checkpoint}.parquet",), ("top_eigenvalue",)),
    "accuracy": Table(ACCURACY_SCHEMA, "one row per (model, task, metric, filter); quantization null = fp",
                      ("run", "step", "quantization", "task", "metric"),
                      ("evals/accuracy/fp/{run}/{checkpoint}.parquet",
                       "evals/accuracy/quantized/{run}/{checkpoint}/{quantization}.parquet")),
}


def dataset_file(name: str) -> str:
    """Table `name`'s file in the results dataset, relative to the results directory."""
    if name not in TABLES:
        raise KeyError(f"no result table {name!r}; tables: {', '.join(TABLES)}")
    return f"dataset/{name}.parquet"


def per_job_file(name: str, index: int = 0) -> str:
    """The `index`-th per-job file pattern of table `name` (e.g. the quantize job's results file)."""
    return TABLES[name].per_job[index]


def delta_q_loss(loss_q: float, loss_fp: float) -> float:
    """The paper's ΔQ L: relative increase of validation loss caused by quantization."""
    return loss_q / loss_fp - 1.0


def write_parquet_atomically(table: pa.Table, path: str | Path) -> None:
    """Write to a temporary file beside the target, then rename: a killed job never leaves a half file."""
    temporary = _write_beside(table, Path(path))
    os.replace(temporary, path)


def _write_beside(table: pa.Table, path: Path) -> str:
    """`table` written whole to a temporary file beside `path` (removed again if writing fails); its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        pq.write_table(table, temporary)
        with open(temporary, "rb") as handle:  # on disk before the rename: a node failure leaves old or new, whole
            os.fsync(handle.fileno())
        # mkstemp makes the file private (0600); results are shared like any file the user writes, so the
        # umask decides (group members on a cluster can read them)
        os.chmod(temporary, 0o666 & ~current_umask())
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return temporary


def current_umask() -> int:
    """The process's umask, read without changing it (os.umask can only be read by setting it, which races with
    threads creating files); Linux reports it in /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: read by setting it, and set it back at once
    os.umask(mask)
    return mask


def rows_to_table(rows: Iterable[dict], schema: pa.Schema) -> pa.Table:
    """Rows to a table of exactly `schema`: missing columns become typed nulls, unknown keys are an error."""
    rows = list(rows)
    unknown = {key for row in rows for key in row} - set(schema.names)
    if unknown:
        raise KeyError(f"columns {sorted(unknown)} are not in the schema; add them to qtraj.results first")
    return pa.Table.from_pylist(rows, schema=schema)


def write_rows(rows: Iterable[dict], schema: pa.Schema, path: str | Path) -> None:
    write_parquet_atomically(rows_to_table(rows, schema), path)


def read_tables(paths: Iterable[str | Path], schema: pa.Schema) -> pa.Table:
    """Concatenate per-job files into one table of `schema` (older files may lack newer columns)."""
    tables = []
    for path in paths:
        table = pq.read_table(path)
        for field in schema:
            if field.name not in table.column_names:
                table = table.append_column(field, pa.nulls(len(table), field.type))
        tables.append(table.select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


PARQUET_MAGIC = b"PAR1"


def unreadable_parquet_files(paths: Iterable[str | Path]) -> list[str]:
    """The existing files among `paths` that cannot be Parquet: a truncated write, an overwrite with something
    else. Checks the size and the magic bytes at both ends only, so it is cheap enough to run on every workflow
    start. A file this process may not read is not reported: that is a permission to ask for, not a broken result
    (PermissionError propagates)."""
    broken = []
    for path in map(Path, paths):
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if size < 12:  # magic, footer length, magic: nothing shorter is a Parquet file
            broken.append(str(path))
            continue
        with path.open("rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            tail = handle.read(4)
        if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
            broken.append(str(path))
    return broken


def check_finite(table: pa.Table, columns: Iterable[str]) -> None:
    for column in columns:
        for index, value in enumerate(table.column(column).to_pylist()):
            if value is None or not math.isfinite(value):
                row = {name: table.column(name)[index].as_py() for name in ("run", "checkpoint")}
                raise ValueError(f"{column} is {value} for {row}; the job that wrote it is broken: "
                                 "delete its Parquet file and rerun")


# What the aggregate job declares as its output: the dataset's tables are not outputs of it, because Snakemake
# deletes a job's outputs before running it, and queries must keep reading the old dataset until the new one is
# complete (and keep it if the aggregate fails).
DATASET_MANIFEST = "dataset/tables.json"


def aggregate(inputs: dict[str, list[str]], output_dir: str | Path) -> dict[str, int]:
    """Build the results dataset under `output_dir` (the results directory's `dataset/`): one sorted Parquet file
    per table (`inputs`: table -> its per-job files). Every table is written beside the old dataset first and
    swapped in only when all are written (each by an atomic rename), then the manifest (DATASET_MANIFEST) is
    written; a failure before the swap leaves the old dataset as it was."""
    counts, written = {}, {}
    try:
        for name, paths in inputs.items():
            spec = TABLES[name]
            table = read_tables(sorted(paths), spec.schema)
            check_finite(table, spec.finite)
            table = table.sort_by([(key, "ascending") for key in spec.sort_keys])
            target = Path(output_dir) / Path(dataset_file(name)).name
            written[target] = _write_beside(table, target)
            counts[name] = table.num_rows
    except BaseException:
        for temporary in written.values():
            Path(temporary).unlink(missing_ok=True)
        raise
    for target, temporary in written.items():
        os.replace(temporary, target)
    _write_manifest(counts, Path(output_dir) / Path(DATASET_MANIFEST).name)
    return counts


def _write_manifest(counts: dict[str, int], path: Path) -> None:
    import json

    write_text_atomically(json.dumps({"tables": {name: {"file": Path(dataset_file(name)).name, "rows": rows}
                                                 for name, rows in counts.items()}}, indent=1) + "\n", path)


def write_text_atomically(text: str, path: str | Path) -> None:
    """Write a small text file via a private temporary beside it, with the umask, then rename: readers (and a
    killed writer) see the old file or the new one, whole. The temporary's name holds the process id, so
    concurrent writers never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
