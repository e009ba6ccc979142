"""The `qtraj` command line: --version, a handler per subcommand and one way to refuse an input (exit status 2),
families, plan, status, and query / science-check reading results_dir from a config. Offline, on the default config,
the carried family files and tiny synthetic results trees."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qtraj
from qtraj import results
from qtraj.catalog import describe_schedule, format_parameters
from qtraj.cli import COMMANDS, build_parser, main
from qtraj.config import checkpoints_of, load_config, trajectories, validate_config
from qtraj.families import expand_revisions, load_family
from qtraj.plan import RULE_STEP, Job, checkpoint_jobs, plan, planned_jobs, step_resources, totals_by_rule
from qtraj.status import results_dir_of, workflow_status
from tests.conftest import REPO_ROOT

DEFAULT_CONFIG = REPO_ROOT / "config" / "config.yaml"
FAMILIES_DIR = REPO_ROOT / "config" / "families"


@pytest.fixture(scope="module")
def default_config() -> dict:
    return load_config(DEFAULT_CONFIG)


def gpu_config(results_dir: Path) -> dict:
    """The default config run on a cluster: trained models on GPUs, plus two revisions of a hub family, with every
    path absolute (Snakemake runs it in another folder)."""
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["corpus"]["path"] = str(REPO_ROOT / config["corpus"]["path"])
    config["families_dir"] = str(FAMILIES_DIR)
    config["results_dir"] = str(results_dir)
    config["families"] = {"pythia-70m": {"select": {"revisions": ["step1000", "step143000"]}}}
    config["resources"] = {"gpu_memory_gb": 16, "trained_on_gpu": True}
    return config


# --- --version -----------------------------------------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["--version"])
    assert exit_status.value.code == 0
    assert capsys.readouterr().out.strip() == f"qtraj {qtraj.__version__}"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(action.choices for action in parser._actions if isinstance(action, argparse._SubParsersAction))


def test_help_texts_print_percent_signs_once():
    """argparse formats help with %: a literal % must be written %% in the source and printed once."""
    parser = build_parser()
    commands = subcommands(parser)
    for name, command in {"qtraj": parser, **commands}.items():
        assert "%%" not in command.format_help(), name
    assert "95% CI" in commands["science-check"].format_help()


def test_a_reader_that_stops_reading_ends_the_command_quietly():
    """`qtraj query … | head -1`: no BrokenPipeError traceback, the status of a process that SIGPIPE ends."""
    command = [sys.executable, "-c", "import sys; from qtraj.cli import main; sys.exit(main())", "query",
               "--results-dir", str(REPO_ROOT / "docs" / "measured" / "default"), "--format", "csv",
               "SELECT * FROM range(1000000)"]  # megabytes: more than a pipe holds
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().strip() == b"range"
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait() == 141, stderr
    assert stderr == ""


def test_every_subcommand_has_a_handler():
    """A subcommand added to the parser without a handler (or a handler left for a removed one) fails here, not in
    the hands of the first user who types it."""
    assert sorted(COMMANDS) == sorted(subcommands(build_parser()))


def user_error_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Per subcommand: a command line whose input is refused, and what the message must name."""
    missing_config = str(tmp_path / "missing.yaml")
    duplicate_key = tmp_path / "duplicate.yaml"
    duplicate_key.write_text("results_dir: a\nresults_dir: b\n")
    not_a_folder_name = tmp_path / "not-a-folder-name.yaml"
    not_a_folder_name.write_text("results_dir: [a, b]\n")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("the user's, not qtraj's")
    return {
        "query": (["query", "SELECT 1", "--configfile", missing_config], "missing.yaml cannot be read"),
        "science-check": (["science-check", "--configfile", str(not_a_folder_name)], "'results_dir'"),
        "check-config": (["check-config", str(duplicate_key)], "'results_dir' is written twice"),
        "status": (["status", "--configfile", missing_config], "missing.yaml cannot be read"),
        "plan": (["plan", "--configfile", str(duplicate_key)], "'results_dir' is written twice"),
        "families": (["families", "--families-dir", str(tmp_path / "nowhere")], "no family folder"),
        "adopt-results": (["adopt-results", str(foreign)], "notes.txt"),
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_refused_input_is_one_line_and_exit_status_2(command, tmp_path, capsys):
    """Every subcommand reports a config, folder or statement it cannot use the same way: `qtraj: <message>` naming
    the input, nothing on stdout, status 2."""
    argv, named = user_error_cases(tmp_path)[command]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("qtraj: ") and captured.err.count("\n") == 1, captured.err
    assert named in captured.err


def test_a_dataset_the_science_check_cannot_read_is_status_2_with_the_cause(tmp_path, capsys):
    """Unlike a failing query (status 1), a science check that could not be computed is status 2, as its help says."""
    from qtraj.query import DATASET_FILES

    unreadable = tmp_path / "results"
    (unreadable / "dataset").mkdir(parents=True)
    (unreadable / "dataset" / DATASET_FILES["results"]).write_bytes(b"PAR1")  # a truncated copy
    assert main(["science-check", "--results-dir", str(unreadable)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("qtraj: the science check could not be computed: ")
    assert DATASET_FILES["results"] in captured.err


# --- families ------------------------------------------------------------------------------------------------------

def test_families_lists_every_family_file(capsys):
    assert main(["families", "--families-dir", str(FAMILIES_DIR)]) == 0
    lines = capsys.readouterr().out.splitlines()
    slugs = sorted(path.stem for path in FAMILIES_DIR.glob("*.yaml"))
    assert [line.split()[0] for line in lines[1:]] == slugs
    pythia = load_family(FAMILIES_DIR / "pythia-70m.yaml")
    line = next(line for line in lines if line.startswith("pythia-70m "))
    assert line.split()[1:4] == ["EleutherAI/pythia-70m", str(len(expand_revisions(pythia))), "70.4M"]
    assert "cosine 0.001→0.0001, 143,000 steps" in line


def test_families_json_and_a_broken_file(tmp_path, capsys):
    (tmp_path / "pythia-70m.yaml").write_text((FAMILIES_DIR / "pythia-70m.yaml").read_text())
    (tmp_path / "broken.yaml").write_text("name: Broken\nrepo: someone/broken\nrevisions: []\n")  # no parameters
    assert main(["families", "--families-dir", str(tmp_path), "--format", "json"]) == 1
    captured = capsys.readouterr()
    [entry] = json.loads(captured.out)  # the valid family is still listed
    assert entry["slug"] == "pythia-70m" and entry["revisions"] == 154 and entry["gated"] is False
    assert "broken.yaml" in captured.err and "parameters" in captured.err
    assert main(["families", "--families-dir", str(tmp_path / "nowhere")]) == 2
    assert "no family folder" in capsys.readouterr().err


def test_families_reads_families_dir_from_the_config(tmp_path, capsys):
    """--families-dir, else the --configfile's families_dir, else config/families."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "pythia-70m.yaml").write_text((FAMILIES_DIR / "pythia-70m.yaml").read_text())
    config = tmp_path / "config.yaml"
    config.write_text(f"families_dir: {tmp_path / 'mine'}\nquantizations: {{}}\n")
    assert main(["families", "--configfile", str(config), "--format", "json"]) == 0
    assert [entry["slug"] for entry in json.loads(capsys.readouterr().out)] == ["pythia-70m"]
    assert main(["families", "--configfile", str(config), "--families-dir", str(FAMILIES_DIR), "--format",
                 "json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(list(FAMILIES_DIR.glob("*.yaml")))
    config.write_text("quantizations: {}\n")  # no families_dir: the schema's default, read from the working folder
    assert main(["families", "--configfile", str(config)]) in (0, 1)  # 1: a family with a caveat is fine
    assert "pythia-70m" in capsys.readouterr().out
    config.write_text("families_dir: [a, b]\n")
    assert main(["families", "--configfile", str(config)]) == 2
    assert "families_dir" in capsys.readouterr().err


def test_schedule_and_parameter_descriptions():
    assert describe_schedule(None) == "unknown"
    assert describe_schedule({"type": "wsd", "peak_lr": 3e-4, "final_lr": 0.0, "total_steps": 10_000,
                              "decay_start_step": 9_000}) == "wsd 0.0003→0, 10,000 steps, decay from 9,000"
    assert [format_parameters(count) for count in (7.04e10, 1.18e9, 7.04e7, 512)] == ["70.4B", "1.18B", "70.4M", "512"]


# --- plan ----------------------------------------------------------------------------------------------------------

def test_plan_counts_the_default_grid(default_config, capsys):
    checkpoints = sum(len(checkpoints_of(default_config, run)) for run in trajectories(default_config))
    totals = totals_by_rule(plan(default_config))
    assert totals["train"]["jobs"] == len(default_config["runs"])
    assert totals["evaluate_fp"]["jobs"] == checkpoints
    assert totals["quantize"]["jobs"] == checkpoints * len(default_config["quantizations"])
    assert totals["total"]["gpu_hours"] == 0  # micro models trained here ask for no GPU
    assert main(["plan", "--configfile", str(DEFAULT_CONFIG)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"^total\s+{totals['total']['jobs']}\s", out, re.MULTILINE), out


def test_plan_sizes_gpu_jobs_from_the_model(tmp_path, capsys):
    config = validate_config(gpu_config(tmp_path / "results"))
    rows = {(row.run, row.rule): row for row in plan(config)}
    quantize = rows[("pythia-70m", "quantize")]
    assert quantize.jobs == 2 * len(config["quantizations"]) and quantize.gpus == 1
    assert quantize.gpu_hours == pytest.approx(quantize.jobs * quantize.runtime_min / 60)
    assert rows[("wsd", "train")].gpus == 1 and rows[("wsd", "train")].jobs == 1
    assert rows[("wsd", "train")].runtime_min > rows[("wsd", "evaluate_fp")].runtime_min
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(gpu_config(tmp_path / "results")))
    assert main(["plan", "--configfile", str(path), "--format", "json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["totals"]["total"]["gpu_hours"] == pytest.approx(sum(row.gpu_hours for row in rows.values()))
    assert not (tmp_path / "results").exists()  # planning writes nothing


def dry_run_jobs(output: str) -> list[dict]:
    """Every job a Snakemake dry run prints: its rule and fields (wildcards and resources parsed)."""
    jobs = []
    for line in output.splitlines():
        if match := re.match(r"^(?:local)?rule (\S+):$", line):
            jobs.append({"rule": match.group(1)})
        elif jobs and (match := re.match(r"^    (\w+): (.*)$", line)):
            key, value = match.groups()
            if key in ("wildcards", "resources"):
                value = dict(item.split("=", 1) for item in value.split(", "))
            jobs[-1][key] = value
    return jobs


def test_plan_matches_the_workflows_dag(tmp_path):
    """The jobs, per-job files, logs and resources `qtraj plan` and `qtraj status` assume are those of the DAG
    Snakemake builds for the same config (a dry run: nothing is computed). The config has a sweep too: a grid
    point of another width is a training rule of its own, sized as its own model, with its constant-LR branch and
    its LAWA evaluated like any trajectory."""
    raw = {**gpu_config(tmp_path / "results"), "sweeps": {"g": {
        "models": {"w64": {"hidden_size": 64, "intermediate_size": 192}}, "tokens_per_parameter": [0.5],
        "seeds": [0, 1], "lawa": 2}}}
    config_path = tmp_path / "gpu.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"),
                             "--directory", str(tmp_path), "--dry-run", "--cores", "2", "--configfile",
                             str(config_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    config = validate_config(raw)
    grid = ["g-w64-tpp0.5-lr0.003-s0", "g-w64-tpp0.5-lr0.003-s1"]
    rules = [job["rule"] for job in dry_run_jobs(result.stdout)]
    assert sorted(rule for rule in rules if rule.startswith("train_g-")) == [f"train_{run}" for run in grid]
    assert {job.run for job in planned_jobs(config)} >= {*grid, *(f"{run}-constant" for run in grid),
                                                        *(f"{run}-lawa" for run in grid)}
    training_rules = {f"train_{run}": run for run in config["runs"]}  # one rule per trained run
    dag = {}
    for job in dry_run_jobs(result.stdout):
        wildcards = job.get("wildcards", {})
        if job["rule"] in training_rules:
            dag[Job("train", training_rules[job["rule"]])] = job
        elif job["rule"] in RULE_STEP:
            dag[Job(job["rule"], wildcards["run"], wildcards.get("checkpoint"), wildcards.get("quantization"))] = job
    planned = planned_jobs(config)
    assert sorted(planned, key=repr) == sorted(dag, key=repr)
    results_dir = tmp_path / "results"
    for job in planned:
        printed = dag[job]
        assert printed["log"] == str(results_dir / job.log())
        assert {str(results_dir / path) for path in job.outputs()} <= set(printed["output"].split(", "))
        resources = step_resources(config, RULE_STEP[job.rule], job.run)
        for key in ("gpu", "runtime", "mem_mb"):
            assert int(printed["resources"][key]) == resources[key], (job, key)


# --- status --------------------------------------------------------------------------------------------------------

def write_outputs(results_dir: Path, job: Job) -> None:
    for path in job.outputs():
        results.write_parquet_atomically(results.TABLES["results"].schema.empty_table(), results_dir / path)


def write_failed_log(path: Path) -> None:
    """A job log as qtraj.joblog leaves it when the step raises (written by it, in a process of its own)."""
    code = ("import sys\nfrom qtraj.joblog import job_logging\ntry:\n    with job_logging(sys.argv[1]):\n"
            "        raise MemoryError('CUDA out of memory')\nexcept MemoryError:\n    pass\n")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True)


@pytest.fixture
def results_tree(tmp_path, default_config) -> Path:
    """wsd: step000100 measured, step000200 with a failed quantize job, step000300 with a truncated result file,
    step000400 with a job running (its log open, no failure); wsd-seed1's training failed; the rest not started."""
    results_dir = tmp_path / "results"
    for job in checkpoint_jobs(default_config, "wsd", "step000100"):
        write_outputs(results_dir, job)
    failed, *others = [job for job in checkpoint_jobs(default_config, "wsd", "step000200") if job.rule == "quantize"]
    for job in others:
        write_outputs(results_dir, job)
    write_failed_log(results_dir / failed.log())
    evaluate = checkpoint_jobs(default_config, "wsd", "step000300")[0]
    write_outputs(results_dir, evaluate)
    (results_dir / evaluate.outputs()[0]).write_bytes(b"PAR1")  # a killed copy, or an overwrite
    running = checkpoint_jobs(default_config, "wsd", "step000400")[0]
    (results_dir / running.log()).parent.mkdir(parents=True)
    (results_dir / running.log()).write_text("2026-01-01 00:00:00,000 INFO qtraj: step evaluate_fp in its own "
                                             "process\n")
    write_failed_log(results_dir / "logs" / "train" / "wsd-seed1.log")
    return results_dir


def test_status_per_trajectory(default_config, results_tree):
    statuses = {status.run: status for status in workflow_status(default_config, results_tree)}
    assert set(statuses) == set(trajectories(default_config))
    wsd = statuses["wsd"]
    assert wsd.kind == "trained" and wsd.done == ["step000100"]
    assert wsd.failed == ["step000200", "step000300"]
    assert "step000400" in wsd.pending and len(wsd.pending) == len(checkpoints_of(default_config, "wsd")) - 3
    failed_quantize = next(job for job in checkpoint_jobs(default_config, "wsd", "step000200")
                           if job.rule == "quantize")
    assert wsd.failed_logs == [str(results_tree / failed_quantize.log()),
                               str(results_tree / "evals/fp/wsd/step000300.parquet")]
    # step000100 whole, step000200 the other quantizations; step000300's evaluation wrote a broken file
    quantizations = len(default_config["quantizations"])
    assert wsd.jobs_done == len(checkpoint_jobs(default_config, "wsd", "step000100")) + quantizations - 1
    seed1 = statuses["wsd-seed1"]  # its training failed: every checkpoint with it
    assert seed1.failed == checkpoints_of(default_config, "wsd-seed1") and not seed1.pending
    assert seed1.failed_logs == [str(results_tree / "logs/train/wsd-seed1.log")]
    assert statuses["constant"].kind == "cooldown" and statuses["wsd-lawa"].kind == "average"
    assert statuses["constant"].pending == checkpoints_of(default_config, "constant")


def test_status_command(results_tree, capsys):
    assert main(["status", "--configfile", str(DEFAULT_CONFIG), "--results-dir", str(results_tree)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^wsd\s+trained\s+8\s+1\s+5\s+2\s+\d+/48$", out, re.MULTILINE), out
    assert str(results_tree / "logs/train/wsd-seed1.log") in out
    assert main(["status", "--configfile", str(DEFAULT_CONFIG), "--results-dir", str(results_tree),
                 "--format", "json"]) == 0
    answer = {entry["run"]: entry for entry in json.loads(capsys.readouterr().out)}
    assert answer["wsd"]["done"] == ["step000100"] and answer["wsd"]["checkpoints"] == 8


def test_status_reads_results_dir_from_the_config(tmp_path, results_tree, capsys):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["results_dir"] = str(results_tree)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["status", "--configfile", str(path), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["done"] == ["step000100"]
    assert main(["status", "--configfile", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml cannot be read" in capsys.readouterr().err


# --- query and science-check: results_dir from a config ------------------------------------------------------------

@pytest.fixture
def dataset(tmp_path) -> Path:
    """A results dataset of two quantized checkpoints, as the aggregate writes it."""
    directory = tmp_path / "elsewhere"
    files = []
    for step in (100, 200):
        path = directory / "evals" / f"{step}.parquet"
        results.write_rows([{"run": "wsd", "checkpoint": f"step{step:06d}", "step": step, "quantization": "rtn-w3g32",
                             "loss_fp": 2.0, "loss_q": 2.2, "delta_q_loss": 0.1}], results.QUANTIZED_EVAL_SCHEMA, path)
        files.append(str(path))
    results.aggregate({"results": files}, directory / "dataset")
    return directory


def test_query_reads_results_dir_from_the_config(tmp_path, dataset, capsys, monkeypatch):
    monkeypatch.delenv("QTRAJ_RESULTS_DIR", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(f"results_dir: {dataset}\nquantizations: {{}}\n")
    assert main(["query", "SELECT step FROM results ORDER BY step", "--configfile", str(config),
                 "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["step", "100", "200"]
    # --results-dir wins over the config
    assert main(["query", "SELECT 1", "--configfile", str(config), "--results-dir", str(tmp_path / "nowhere")]) == 2
    assert str(tmp_path / "nowhere") in capsys.readouterr().err
    # and the config over $QTRAJ_RESULTS_DIR
    monkeypatch.setenv("QTRAJ_RESULTS_DIR", str(tmp_path / "nowhere"))
    assert main(["query", "SELECT count(*) AS n FROM results", "--configfile", str(config), "--format", "csv"]) == 0
    assert capsys.readouterr().out.split() == ["n", "2"]
    assert main(["science-check", "--configfile", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml cannot be read" in capsys.readouterr().err


def test_results_dir_of_a_config(tmp_path):
    assert results_dir_of(DEFAULT_CONFIG) == yaml.safe_load(DEFAULT_CONFIG.read_text())["results_dir"]
    bare = tmp_path / "bare.yaml"
    bare.write_text("quantizations: {}\n")
    assert results_dir_of(bare) == "results"  # the schema's default
    bad = tmp_path / "bad.yaml"
    bad.write_text("results_dir: [a, b]\n")
    with pytest.raises(ValueError, match="results_dir"):
        results_dir_of(bad)
