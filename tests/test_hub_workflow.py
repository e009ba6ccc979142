"""Hub families end to end: the workflow downloads from a local hub cache (offline), quantizes, evaluates;
adding a family file runs only the new family's jobs."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow.parquet as pq
import pytest
import yaml

from tests.hub_cache import add_model_folder, add_to_hub_cache, fake_commit
from tests.test_workflow import planned_jobs, snakemake

FAMILY_A = {
    "name": "Tiny A", "repo": "qtraj-test/tiny-a", "parameters": 1e5, "tokens_per_step": 512,
    "schedule": {"type": "cosine", "peak_lr": 3e-3, "warmup_steps": 3, "total_steps": 60},
    "stages": {"pretraining": "pretraining"},
    "revision_ranges": [{"template": "step{step}-tokens{tokens_b}B", "start": 30, "stop": 60, "every": 30,
                         "stage": "pretraining"}],
}
FAMILY_B = {
    "name": "Tiny B", "repo": "qtraj-test/tiny-b", "parameters": 1e5, "gated": True,
    "tokenizer": {"repo": "qtraj-test/tiny-b-tokenizer"},
    "schedule": {"type": "wsd", "peak_lr": 3e-3, "warmup_steps": 3, "total_steps": 60, "decay_start_step": 40},
    "stages": {"main": "pretraining", "chat": "post-training"},
    "revisions": [{"revision": "ckpt_000", "step": 20, "tokens": 10240, "stage": "main"},
                  {"revision": "ckpt_001", "step": 60, "tokens": 30720, "stage": "main"},
                  {"revision": "main", "stage": "chat"}],
}


@pytest.fixture(scope="module")
def hub_setup(tmp_path_factory, trained_checkpoint, corpus_lines):
    root = tmp_path_factory.mktemp("hub")
    cache = root / "hf" / "hub"
    # only step branches, no `main` (like SmolLM3's checkpoint repo): the tokenizer comes from a selected revision
    for revision in ("step30-tokens0B", "step60-tokens0B"):
        add_model_folder(cache, "qtraj-test/tiny-a", revision, trained_checkpoint)
    for revision in ("ckpt_000", "ckpt_001", "main"):  # B's own revisions lack a tokenizer: it has its own repo
        add_model_folder(cache, "qtraj-test/tiny-b", revision, trained_checkpoint,
                         skip=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    add_model_folder(cache, "qtraj-test/tiny-b-tokenizer", "main", trained_checkpoint)
    shard = root / "text.json.gz"
    with gzip.open(shard, "wt") as handle:
        for line in corpus_lines[:30]:
            handle.write(json.dumps({"text": json.loads(line)["text"], "timestamp": "x"}) + "\n")
    for name in ("en/c4-train.00001-of-01024.json.gz", "en/c4-validation.00000-of-00008.json.gz"):
        add_to_hub_cache(cache, "allenai/c4", "main", {name: shard}, kind="dataset")

    families = root / "families"
    families.mkdir()
    (families / "tiny-a.yaml").write_text(yaml.safe_dump(FAMILY_A))
    env = {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN", None)
    return root, families, env


def hub_config(root, families_dir, names):
    config = {
        "results_dir": str(root / "results"),
        "families_dir": str(families_dir),
        "families": {name: {} for name in names},
        "quantizations": {"gptq-w4g16": {"method": "gptq", "bits": 4, "group_size": 16},
                          "bnb-int8": {"method": "bnb", "bits": 8, "group_size": None}},
        "hub_data": {"calibration_text": {"repo": "allenai/c4", "filename": "en/c4-train.00001-of-01024.json.gz",
                                          "documents": 20},
                     "validation_text": {"repo": "allenai/c4", "filename": "en/c4-validation.00000-of-00008.json.gz",
                                         "documents": 30},
                     "calibration": {"num_samples": 8, "seq_len": 64},
                     # random weights: the loss check for pretrained models (qtraj.sanity) is off
                     "evaluation": {"seq_len": 64, "max_blocks": 16, "batch_size": 8, "max_loss_fraction": None}},
    }
    path = root / f"config-{'-'.join(names)}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(root, config, env, *args, check=True):
    return snakemake("--cores", "2", "--configfile", str(config), *args, workdir=root, check=check, env=env)


@pytest.fixture(scope="module")
def family_a_run(hub_setup):
    root, families, env = hub_setup
    config = hub_config(root, families, ["tiny-a"])
    run(root, config, env)
    return root, families, env


def test_a_family_runs_from_the_local_hub_cache(family_a_run):
    root, _, _ = family_a_run
    rows = pq.read_table(root / "results" / "dataset" / "results.parquet").to_pylist()
    assert len(rows) == 2 * 2
    assert {row["checkpoint"] for row in rows} == {"step30-tokens0B", "step60-tokens0B"}
    for row in rows:
        assert row["source"] == "hub" and row["repo"] == "qtraj-test/tiny-a"
        assert row["commit"] == fake_commit("qtraj-test/tiny-a", row["checkpoint"])
        assert row["tokens"] == row["step"] * 512 and row["phase"] in {"stable", "decay"}
        assert row["loss_q"] > 0 and row["eval_tokens"] == 16 * 64
    assert len(pq.read_table(root / "results" / "dataset" / "layer_errors.parquet")) == 4 * 2 * 7
    assert not any((root / "results" / "checkpoints").rglob("*.safetensors"))  # temp(): gone after use
    assert (root / "results" / "figures" / "tiny-a.png").exists()


def test_adding_a_family_file_runs_only_that_familys_jobs(family_a_run):
    root, families, env = family_a_run
    (families / "tiny-b.yaml").write_text(yaml.safe_dump(FAMILY_B))
    config = hub_config(root, families, ["tiny-a", "tiny-b"])
    before = {path: path.stat().st_mtime_ns for path in (root / "results" / "evals").rglob("*.parquet")}
    jobs = planned_jobs(run(root, config, env, "--dry-run").stdout)
    new = [(rule, output) for rule, output in jobs
           if rule not in ("aggregate", "science_check", "all") and not rule.startswith("plot_")]
    assert "sharpness" not in [rule for rule, _ in jobs]  # off for families by default
    assert new and all("tiny-b" in output for _, output in new), new

    run(root, config, env)
    after = {path: path.stat().st_mtime_ns for path in (root / "results" / "evals").rglob("*.parquet")}
    assert all(after[path] == mtime for path, mtime in before.items())
    rows = pq.read_table(root / "results" / "dataset" / "results.parquet").to_pylist()
    b_rows = [row for row in rows if row["run"] == "tiny-b"]
    assert len(b_rows) == 3 * 2
    assert {row["phase"] for row in b_rows} == {"stable", "decay", "post-training"}
    again = run(root, config, env, "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow  # a minute; only-new-jobs is guarded by the added family file's test above
def test_kept_checkpoints_let_a_new_quantization_plan_only_its_jobs(family_a_run):
    """With hub_data.keep_checkpoints the downloaded folders stay, so a new quantization needs nothing else
    (with temp() folders Snakemake would re-download them and redo each revision's other jobs too)."""
    root, families, env = family_a_run
    config = yaml.safe_load(hub_config(root, families, ["tiny-a"]).read_text())
    config["results_dir"] = str(root / "results-kept")
    config["hub_data"]["keep_checkpoints"] = True
    first = root / "config-kept.yaml"
    first.write_text(yaml.safe_dump(config))
    run(root, first, env)
    assert any((root / "results-kept" / "checkpoints").rglob("*.safetensors"))
    config["quantizations"]["rtn-w3g16"] = {"method": "rtn", "bits": 3, "group_size": 16}
    path = root / "config-more-quantizations.yaml"
    path.write_text(yaml.safe_dump(config))
    jobs = planned_jobs(run(root, path, env, "--dry-run").stdout)
    rules = sorted({rule for rule, _ in jobs if not rule.startswith("plot_")} - {"aggregate", "science_check", "all"})
    assert rules == ["quantize"], rules
    assert all("rtn-w3g16" in output for rule, output in jobs if rule == "quantize")


def test_editing_a_family_file_reruns_only_what_the_edit_changes(family_a_run):
    """A job's params hold only its own revision's facts: notes or a new revision in the family file rerun nothing
    that exists (issue: the whole family dict used to be a param of every download)."""
    root, families, env = family_a_run
    config = hub_config(root, families, ["tiny-a"])
    family_file = families / "tiny-a.yaml"
    original = family_file.read_text()
    try:
        family_file.write_text(yaml.safe_dump({**FAMILY_A, "notes": "edited: a note about the checkpoints"}))
        assert not work_planned(run(root, config, env, "--dry-run").stdout)
        more = {**FAMILY_A, "revision_ranges": [{**FAMILY_A["revision_ranges"][0], "stop": 90}]}
        family_file.write_text(yaml.safe_dump(more))
        planned = work_planned(run(root, config, env, "--dry-run").stdout)
        assert planned and all("step90" in output for _, output in planned), planned
    finally:
        family_file.write_text(original)


def work_planned(dry_run_output: str) -> list[tuple[str, str]]:
    """The jobs of a dry run that compute something (not the cheap aggregate and figures)."""
    return [(rule, output) for rule, output in planned_jobs(dry_run_output)
            if rule not in ("aggregate", "science_check", "all") and not rule.startswith("plot_")]
