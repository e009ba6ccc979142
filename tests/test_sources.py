"""Checkpoint sources as plugins (qtraj.sources): a source added from one file (tests/manifest_source.py, folders
listed in a CSV manifest) reaches the DAG, `qtraj plan`, `qtraj status` and the dataset with no other file changed;
the registry, the job kinds and the folder builder every linking source shares."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from qtraj.config import ConfigError, checkpoints_of, trajectories, validate_config
from qtraj.jobs import JOB_KINDS, Job
from qtraj.sources import source_classes, source_of
from qtraj.sources.folder import build_checkpoint_folder
from tests.conftest import REPO_ROOT

PLUGIN = REPO_ROOT / "tests" / "manifest_source.py"
QUANTIZATIONS = {"rtn-w4g32": {"method": "rtn", "bits": 4, "group_size": 32}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, tokenizer_dir) -> Path:
    """Two checkpoints of a tiny Llama in folders named as a trainer of its own might name them, listed in a CSV
    in another order than training's."""
    from tests.architectures import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("toy-run")
    first = save_tiny_checkpoint("LlamaForCausalLM", root / "saved" / "early", tokenizer_dir, seed=0)
    save_tiny_checkpoint("LlamaForCausalLM", root / "saved" / "late", tokenizer_dir, seed=1, perturb_from=first)
    path = root / "manifest.csv"
    path.write_text("checkpoint,folder,step,tokens\nafter-200,saved/late,200,409600\nafter-100,saved/early,100,\n")
    return path


def toy_config(manifest: Path, results_dir: Path, corpus: Path) -> dict:
    return {
        "results_dir": str(results_dir),
        "source_plugins": [str(PLUGIN)],
        "manifests": {"toy": {"csv": str(manifest)}},
        "corpus": {"path": str(corpus), "validation_fraction": 0.1, "calibration_fraction": 0.1},
        "quantizations": QUANTIZATIONS,
        "calibration": {"num_samples": 8, "seq_len": 64},
        # random weights, not a pretrained model: the loss check (qtraj.sanity) would refuse them
        "evaluation": {"seq_len": 64, "max_blocks": 8, "batch_size": 8, "max_loss_fraction": None},
    }


def test_a_plugin_source_is_a_trajectory_of_the_config(manifest, small_corpus, tmp_path):
    config = validate_config(toy_config(manifest, tmp_path / "results", small_corpus))
    assert trajectories(config) == ["toy"]
    assert checkpoints_of(config, "toy") == ["after-100", "after-200"]  # in training order
    source = source_of(config, "toy")
    assert source.kind == "manifest" and source.architecture("toy") == "LlamaForCausalLM"
    assert source.parameters("toy") > 0  # read from the safetensors headers: sizes its cluster jobs


def test_a_config_without_the_plugin_knows_neither_its_key_nor_its_source(manifest, small_corpus, tmp_path):
    validate_config(toy_config(manifest, tmp_path / "results", small_corpus))  # the plugin is loaded in this process
    config = toy_config(manifest, tmp_path / "results", small_corpus)
    del config["source_plugins"]
    with pytest.raises(ConfigError, match="'manifests' was unexpected"):
        validate_config(config)
    assert "manifests" not in {cls.key for cls in source_classes({})}


@pytest.mark.parametrize(("plugin", "message"), [
    ("qtraj.nonexistent_module", "cannot be imported"),
    ("qtraj.texttable", "registers no source"),
])
def test_a_bad_plugin_is_named_with_the_fix(plugin, message):
    with pytest.raises(ConfigError, match=f"source_plugins.*{message}"):
        source_classes({"source_plugins": [plugin]})


def test_every_source_that_makes_checkpoints_names_a_job_kind_that_logs():
    for cls in source_classes({}):
        assert cls.makes is None or cls.makes in JOB_KINDS, cls
        assert cls.rules is None or (REPO_ROOT / "rules" / cls.rules).is_file(), cls
    assert Job("quantize", "wsd", "step000100", "rtn").log() == "logs/quantize/wsd/step000100/rtn.log"
    assert Job("train", "wsd").outputs() == ["training/wsd.parquet"]


def test_the_folder_builder_links_copies_a_missing_tokenizer_and_writes_the_metadata(tmp_path, trained_checkpoint):
    from qtraj.checkpoints import CheckpointInfo, read_checkpoint_info
    from qtraj.sources.folder import allowed_files

    source = tmp_path / "source"
    source.mkdir()
    for item in allowed_files(trained_checkpoint):
        if not item.name.startswith("tokenizer"):
            (source / item.name).symlink_to(item)
    (source / "optimizer.pt").write_bytes(b"state")
    info = CheckpointInfo("toy", "c", 1, 2, None, None, "manifest")
    count = build_checkpoint_folder(tmp_path / "out", allowed_files(source), info, trained_checkpoint, "repo@abc")
    out = tmp_path / "out"
    assert count == len(allowed_files(source)) and not (out / "optimizer.pt").exists()
    assert (out / "tokenizer.json").is_file() and not (out / "tokenizer.json").is_symlink()  # copied, not linked
    assert not (out / "qtraj_checkpoint.json").is_symlink() and read_checkpoint_info(out).source == "manifest"
    assert (out / "qtraj_trust_remote_code").read_text() == "repo@abc\n"


@pytest.mark.slow  # a minute of workflow; registration, schema, jobs and folders are tested fast above
def test_a_source_from_one_file_runs_through_the_dag_plan_status_and_dataset(manifest, small_corpus, tmp_path,
                                                                              capsys):
    from qtraj.cli import main
    from tests.test_workflow import planned_jobs, snakemake

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(toy_config(manifest, tmp_path / "results", small_corpus)))
    jobs = planned_jobs(snakemake("--dry-run", "--cores", "2", "--configfile", str(path), workdir=tmp_path).stdout)
    linked = sorted(output for rule, output in jobs if rule == "link_local_checkpoint")
    assert linked == [f"{tmp_path}/results/checkpoints/toy/after-100", f"{tmp_path}/results/checkpoints/toy/after-200"]
    assert [rule for rule, _ in jobs].count("quantize") == 2

    assert main(["plan", "--configfile", str(path)]) == 0
    plan_rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("toy ")]
    assert {(row[1], row[2]) for row in plan_rows} == {("evaluate_fp", "2"), ("quantize", "2")}

    snakemake("--cores", "2", "--configfile", str(path), workdir=tmp_path)
    rows = pq.read_table(tmp_path / "results" / "dataset" / "results.parquet").to_pylist()
    assert [(row["run"], row["checkpoint"], row["step"], row["tokens"], row["source"]) for row in rows] == [
        ("toy", "after-100", 100, None, "manifest"), ("toy", "after-200", 200, 409600, "manifest")]
    assert rows[1]["path"] == str((manifest.parent / "saved" / "late").resolve()) and rows[1]["loss_q"] > 0

    assert main(["status", "--configfile", str(path)]) == 0
    status = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("toy ")]
    assert status == [["toy", "manifest", "2", "2", "0", "0", "4/4"]]
    assert json.loads((tmp_path / "results" / "checkpoints" / "toy" / "after-200" / "qtraj_checkpoint.json")
                      .read_text())["source"] == "manifest"
