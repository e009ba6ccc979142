"""Local trajectories: checkpoint folders on disk (a researcher's own training run), read in place."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from qtraj.checkpoints import read_checkpoint_info
from qtraj.config import ConfigError, checkpoints_of, validate_config
from qtraj.local import checkpoint_info, discover_checkpoints, selected_checkpoints
from qtraj.sources.folder import link_checkpoint


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file below `folder` (links followed) -> sha256 of its bytes, plus each entry's kind."""
    return {str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file()
                                            else "dir")
            for path in sorted(folder.rglob("*"))}


def local_entry(path, **overrides) -> dict:
    entry = {"path": str(path), "pattern": "step{step}", "checkpoints": [], "tokens_per_step": None,
             "schedule": None, "parameters": None, "allow_pickle": False, "select": {}, "tokenizer": None}
    return {**entry, **overrides}


@pytest.fixture
def trainer_run(tmp_path, trained_checkpoint) -> Path:
    """An HF-Trainer-like run folder: checkpoint-{step} subfolders with trainer_state.json and optimizer state."""
    root = tmp_path / "my-run"
    for step in (10, 20, 100):
        folder = root / f"checkpoint-{step}"
        shutil.copytree(trained_checkpoint, folder)
        (folder / "qtraj_checkpoint.json").unlink()
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "optimizer.pt").write_bytes(b"not a model")
        (folder / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")
        (folder / "qtraj_trust_remote_code").write_text("")
    (root / "runs").mkdir()  # a TensorBoard folder beside the checkpoints
    return root


def test_a_pattern_maps_subfolders_to_steps_in_training_order(trainer_run):
    found = discover_checkpoints("mine", local_entry(trainer_run, pattern="checkpoint-{step}", tokens_per_step=512))
    assert [(r.revision, r.step, r.tokens) for r in found] == [
        ("checkpoint-10", 10, 5120), ("checkpoint-20", 20, 10240), ("checkpoint-100", 100, 51200)]


def test_without_a_step_in_the_pattern_trainer_state_says_it(trainer_run):
    found = discover_checkpoints("mine", local_entry(trainer_run, pattern="checkpoint-*"))
    assert [(r.revision, r.step) for r in found] == [("checkpoint-10", 10), ("checkpoint-20", 20),
                                                     ("checkpoint-100", 100)]


def test_selectors_and_schedule_apply_as_for_hub_families(trainer_run):
    config = {"runs": {}, "families": {}, "quantizations": {"rtn": {"method": "rtn", "bits": 4, "group_size": 16}},
              "local": {"mine": {"path": str(trainer_run), "pattern": "checkpoint-{step}", "select": {"last": 2},
                                 "schedule": {"type": "wsd", "peak_lr": 1e-3, "total_steps": 100, "warmup_steps": 5,
                                              "decay_start_step": 50}}}}
    validate_config(config)
    assert checkpoints_of(config, "mine") == ["checkpoint-20", "checkpoint-100"]
    infos = [checkpoint_info("mine", config["local"]["mine"], r) for r in selected_checkpoints(config, "mine")]
    assert [(i.phase, i.source) for i in infos] == [("stable", "local"), ("decay", "local")]
    assert infos[0].lr == pytest.approx(1e-3) and infos[1].lr == pytest.approx(0.0, abs=1e-4)


def test_errors_name_the_key_and_what_is_there(trainer_run, tmp_path):
    with pytest.raises(ConfigError, match=r"local.mine.pattern.*no subfolder .* matches 'step\{step\}'.*"
                                          r"checkpoint-10"):
        discover_checkpoints("mine", local_entry(trainer_run))
    with pytest.raises(ConfigError, match=r"local.mine.path.*is not a folder"):
        discover_checkpoints("mine", local_entry(tmp_path / "nowhere"))


def test_linking_reads_in_place_and_brings_no_code_or_training_state(trainer_run, tmp_path):
    before = tree_digest(trainer_run)
    entry = local_entry(trainer_run, pattern="checkpoint-{step}")
    revision = discover_checkpoints("mine", entry)[0]
    out = tmp_path / "results" / "checkpoints" / "mine" / revision.revision
    link_checkpoint(trainer_run / revision.revision, out, checkpoint_info("mine", entry, revision))
    linked = {path.name for path in out.iterdir()}
    assert "model.safetensors" in linked and "config.json" in linked and "tokenizer.json" in linked
    assert not linked & {"optimizer.pt", "modeling_evil.py", "trainer_state.json", "qtraj_trust_remote_code"}
    assert all((out / name).is_symlink() for name in linked - {"qtraj_checkpoint.json"})
    assert not (out / "qtraj_checkpoint.json").is_symlink()
    assert read_checkpoint_info(out).step == 10 and read_checkpoint_info(out).source == "local"
    shutil.rmtree(out)  # what temp() or a user's clean-up does: links go, the checkpoints stay
    assert tree_digest(trainer_run) == before


def test_a_folder_whose_config_asks_for_its_own_code_is_refused_and_nothing_is_linked(trainer_run, tmp_path):
    """A local folder never runs code, whatever its config.json maps (the loader would refuse it too, later and
    without naming the local entry)."""
    folder = trainer_run / "checkpoint-10"
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}))
    entry = local_entry(trainer_run, pattern="checkpoint-{step}")
    info = checkpoint_info("mine", entry, discover_checkpoints("mine", entry)[0])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"checkpoint-10 needs its own Python code \(config.json has an auto_map\)"):
        link_checkpoint(folder, out, info)
    assert not out.exists()


def test_a_folder_without_safetensors_is_refused_with_the_fix(trainer_run, tmp_path):
    folder = trainer_run / "checkpoint-10"
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    entry = local_entry(trainer_run, pattern="checkpoint-{step}")
    info = checkpoint_info("mine", entry, discover_checkpoints("mine", entry)[0])
    with pytest.raises(FileNotFoundError, match="pickle weights.*allow_pickle: true"):
        link_checkpoint(folder, tmp_path / "out", info)


@pytest.mark.slow  # a minute; GPT-NeoX is in the architecture matrix, a local run in test_faults' overwrite test
def test_a_local_run_of_another_architecture_goes_through_the_workflow(tmp_path, small_corpus, tokenizer_dir):
    """A Pythia-shaped (GPT-NeoX: biased, fused qkv, `embed_out` head) run saved by an HF-Trainer-like loop,
    evaluated in place; adding a checkpoint later computes only its jobs."""
    import pyarrow.parquet as pq
    import yaml

    from tests.architectures import save_tiny_checkpoint
    from tests.test_workflow import planned_jobs, snakemake

    run = tmp_path / "my-pythia"
    previous = None
    for index, step in enumerate((100, 200, 300)):
        folder = run / f"checkpoint-{step}"
        save_tiny_checkpoint("GPTNeoXForCausalLM", folder, tokenizer_dir, seed=index, perturb_from=previous)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (folder / "optimizer.pt").write_bytes(b"optimizer state")
        previous = folder
    late = tmp_path / "checkpoint-300"
    shutil.move(run / "checkpoint-300", late)  # not saved yet when the first evaluation runs
    before = tree_digest(run)
    config = {
        "results_dir": str(tmp_path / "results"),
        "corpus": {"path": str(small_corpus), "validation_fraction": 0.1, "calibration_fraction": 0.1},
        "local": {"mine": {"path": str(run), "pattern": "checkpoint-{step}", "tokens_per_step": 2048,
                           "schedule": {"type": "cosine", "peak_lr": 1e-3, "warmup_steps": 10, "total_steps": 300}}},
        "quantizations": {"rtn-w4g32": {"method": "rtn", "bits": 4, "group_size": 32}},
        "accuracy": {"local_tasks": {"continuation": {"kind": "continuation", "items": 20, "context_words": 8,
                                                      "choice_words": 3}}},
        "calibration": {"num_samples": 8, "seq_len": 64},
        # random weights, not a pretrained model: the loss check (qtraj.sanity) would refuse them
        "evaluation": {"seq_len": 64, "max_blocks": 8, "batch_size": 8, "max_loss_fraction": None},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    snakemake("--cores", "2", "--configfile", str(path), workdir=tmp_path)

    rows = pq.read_table(tmp_path / "results" / "dataset" / "results.parquet").to_pylist()
    assert [(row["checkpoint"], row["step"], row["tokens"], row["source"]) for row in rows] == [
        ("checkpoint-100", 100, 204800, "local"), ("checkpoint-200", 200, 409600, "local")]
    assert all(row["phase"] == "decay" and row["lr"] > 0 and row["loss_q"] > 0 for row in rows)
    assert rows[0]["path"] == str((run / "checkpoint-100").resolve())
    layers = pq.read_table(tmp_path / "results" / "dataset" / "layer_errors.parquet").to_pylist()
    assert {row["module_type"] for row in layers} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}
    assert tree_digest(run) == before  # read in place: nothing written, nothing deleted

    def planned_work():
        jobs = planned_jobs(snakemake("--cores", "2", "--configfile", str(path), "--dry-run", workdir=tmp_path).stdout)
        return {(rule, output) for rule, output in jobs
                if not rule.startswith("plot_") and rule not in {"aggregate", "science_check", "all"}}

    shutil.move(late, run / "checkpoint-300")
    work = planned_work()
    assert work and all("checkpoint-300" in output for _, output in work), work
    # selecting fewer checkpoints moves the first one, whose tokenizer the run uses: nothing reruns
    config["local"]["mine"]["select"] = {"last": 2}
    path.write_text(yaml.safe_dump(config))
    assert all("checkpoint-300" in output for _, output in planned_work())


def test_a_local_schedule_can_decay_as_one_minus_sqrt(trainer_run):
    """Apertus-style cooldowns: the LR recorded for a local checkpoint follows the shape the entry declares."""
    entry = {"schedule": {"type": "wsd", "peak_lr": 1e-3, "total_steps": 100, "decay_start_step": 50,
                          "decay_shape": "1-sqrt"}}
    config = {"quantizations": {"q": {"method": "rtn", "bits": 4, "group_size": 32}},
              "local": {"mine": {"path": str(trainer_run), "pattern": "checkpoint-{step}", **entry}}}
    validate_config(config)
    [info] = [checkpoint_info("mine", config["local"]["mine"], r) for r in selected_checkpoints(config, "mine")
              if r.step == 100]
    from qtraj.families import Revision

    halfway = checkpoint_info("mine", config["local"]["mine"], Revision("halfway", 75, None, "pretraining"))
    assert halfway.lr == pytest.approx(1e-3 * (1 - 0.5 ** 0.5)) and info.lr == pytest.approx(0.0, abs=1e-12)
