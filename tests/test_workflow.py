"""The workflow itself: lint, the default DAG, and a real end-to-end run of the tiny config."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import REPO_ROOT

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile")]


def snakemake(*args: str, workdir: Path = REPO_ROOT, check: bool = True,
              env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def planned_jobs(dry_run_output: str) -> list[tuple[str, str]]:
    """(rule, output) of every job a dry run lists."""
    jobs = []
    for line in dry_run_output.splitlines():
        if match := re.match(r"^(?:local)?rule (\S+):$", line):
            jobs.append((match.group(1), ""))
        elif (match := re.match(r"^\s+output: (.*)$", line)) and jobs:
            jobs[-1] = (jobs[-1][0], match.group(1))
    return jobs


def write_config(path: Path, corpus: Path, results_dir: Path, extra_runs: dict | None = None) -> Path:
    config = yaml.safe_load((REPO_ROOT / "tests" / "configs" / "tiny.yaml").read_text())
    config["corpus"]["path"] = str(corpus)
    config["results_dir"] = str(results_dir)
    config["runs"].update(extra_runs or {})
    path.write_text(yaml.safe_dump(config))
    return path


def test_lint_is_clean():
    result = snakemake("--lint")
    assert "Lints for" not in result.stdout + result.stderr


def test_snakefmt_leaves_the_workflow_unchanged():
    result = subprocess.run([str(Path(sys.executable).parent / "snakefmt"), "--check", "Snakefile", "rules"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_config_dry_run_plans_the_whole_grid(tmp_path):
    config = yaml.safe_load((REPO_ROOT / "config" / "config.yaml").read_text())
    config["corpus"]["path"] = str(REPO_ROOT / config["corpus"]["path"])
    config["results_dir"] = str(tmp_path / "results")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake("--dry-run", "--cores", "2", "--configfile", str(tmp_path / "config.yaml"),
                                  workdir=tmp_path).stdout)
    rules = [rule for rule, _ in jobs]
    runs = ("wsd", "wsd-seed1", "wsd-seed2")
    assert [rules.count(f"train_{run}") for run in runs] == [1] * 3 and rules.count("train_constant") == 0
    # the constant-LR control of each seed: its WSD run continued from step 600 at the peak LR, to step 800
    assert rules.count("cooldown") == 3
    assert rules.count("average_checkpoints") == 3  # LAWA of steps 700 and 800, per WSD seed
    checkpoints = 3 * 8 + 3 * 1 + 3  # WSD at 8 checkpoints, its constant-LR control at its end, LAWA at its end
    assert rules.count("evaluate_fp") == checkpoints
    assert rules.count("sharpness") == 8 + 1 + 1  # along the first seed: wsd, constant, wsd-lawa
    # GPTQ and RTN at 3 and 4 bits: quantized and evaluated in one job (loss, layer errors, task accuracy)
    assert rules.count("quantize") == checkpoints * 4 and "evaluate_quantized" not in rules
    assert rules.count("build_task") == 2  # the two local accuracy tasks, built once
    assert {rule for rule in rules if rule.startswith("plot_") and rule != "plot_trajectory"} == {
        "plot_loss", "plot_lr", "plot_sharpness", "plot_averaging", "plot_accuracy"}
    # no quantized model is written unless packed models are asked for
    assert not any("/packed/" in output for _, output in jobs)
    config["packed_models"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    jobs = planned_jobs(snakemake("--dry-run", "--cores", "2", "--configfile", str(tmp_path / "config.yaml"),
                                  workdir=tmp_path).stdout)
    packed = [path for rule, output in jobs if rule == "quantize" for path in output.split(", ") if "/packed/" in path]
    assert len(packed) == checkpoints * 4 and all(
        path.startswith(f"{tmp_path}/results/packed/") for path in packed), packed[:2]


def experiment_config(name: str, tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO_ROOT / "config" / "experiments" / f"{name}.yaml").read_text())
    config["corpus"]["path"] = str(REPO_ROOT / "data" / "corpus" / "sotu.jsonl.xz")  # the 160M one brings its own
    config["results_dir"] = str(tmp_path / "results")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "config.yaml"


@pytest.mark.parametrize(("experiment", "checkpoints"), [
    ("lr-sweep", 10 * 4), ("schedules", 4 * 4), ("weight-decay", 3 * 4), ("methods", 4),
    ("science-longer", 2 * 4 + 2 * 3),
])
def test_experiment_configs_hold_their_grids(tmp_path, experiment, checkpoints):
    from qtraj.config import checkpoints_of, load_config, trajectories

    config = load_config(experiment_config(experiment, tmp_path))
    assert sum(len(checkpoints_of(config, run)) for run in trajectories(config)) == checkpoints


# the two whose DAGs use rules the default does not: cooldown jobs, and lm-eval tasks fetched on the submit host
@pytest.mark.parametrize(("experiment", "expected"), [
    ("cooldowns", {"train_constant": 1, "cooldown": 5, "evaluate_fp": 8 + 5}),
    pytest.param("lr-sweep-160m", {"train_lr3e-3": 1, "average_checkpoints": 16, "fetch_lm_eval_tasks": 1},
                 marks=pytest.mark.slow),  # fetch_lm_eval_tasks is also planned by the paper grid's dry run
])
def test_experiment_configs_plan_their_jobs(tmp_path, experiment, expected):
    config = experiment_config(experiment, tmp_path)
    rules = [rule for rule, _ in planned_jobs(snakemake("--dry-run", "--cores", "2", "--configfile", str(config),
                                                        workdir=tmp_path).stdout)]
    assert {rule: rules.count(rule) for rule in expected} == expected


def test_paper_grid_dry_runs_offline(tmp_path):
    """config/paper.yaml: the paper's families x revisions x GPTQ 3/4-bit, planned without network."""
    jobs = planned_jobs(snakemake("--dry-run", "--cores", "2", "--configfile", str(REPO_ROOT / "config" / "paper.yaml"),
                                  "--config", f"results_dir={tmp_path / 'results'}").stdout)
    rules = [rule for rule, _ in jobs]
    checkpoints = rules.count("download_checkpoint")
    assert checkpoints > 300 and rules.count("evaluate_fp") == checkpoints
    assert rules.count("quantize") == 2 * checkpoints
    assert rules.count("fetch_lm_eval_tasks") == 1  # the 12 lm-eval tasks, fetched once on the submit host
    assert not (tmp_path / "results").exists()


def test_bad_config_fails_before_any_job_naming_the_key(tmp_path, small_corpus):
    config = write_config(tmp_path / "bad.yaml", small_corpus, tmp_path / "results")
    data = yaml.safe_load(config.read_text())
    data["quantizations"]["rtn-w3g16"]["method"] = "rnt"
    config.write_text(yaml.safe_dump(data))
    result = snakemake("--cores", "1", "--configfile", str(config), workdir=tmp_path, check=False)
    assert result.returncode != 0
    assert "quantizations.rtn-w3g16.method" in result.stderr and "known methods: awq, bnb, gptq, rtn" in result.stderr
    assert not (tmp_path / "results").exists()


def test_every_checkpoint_has_finite_rows_for_each_method_and_bits(tiny_run):
    _, _, results_dir = tiny_run
    table = pq.read_table(results_dir / "dataset" / "results.parquet").to_pylist()
    # (runs x checkpoints + the LAWA average + the cooldown) x quantizations
    assert len(table) == (2 * 2 + 1 + 1) * 5
    cells = {(row["run"], row["checkpoint"], row["method"], row["bits"]) for row in table}
    assert len(cells) == 30
    for row in table:
        assert row["loss_q"] > 0 and abs(row["delta_q_loss"] - (row["loss_q"] / row["loss_fp"] - 1)) < 1e-12
        assert row["phase"] in {"warmup", "stable", "decay"} and row["tokens"] == row["step"] * 8 * 64
        assert row["source"] == {"wsd-lawa2": "averaged", "wsd-cooldown": "cooldown"}.get(row["run"], "trained")
        assert row["engine"] == ("bitsandbytes" if row["method"] == "bnb" else "llmcompressor")
        assert row["engine_version"] and row["config_hash"] and row["torch_version"]
    assert len(pq.read_table(results_dir / "dataset" / "fp_evals.parquet")) == 6
    layers = pq.read_table(results_dir / "dataset" / "layer_errors.parquet").to_pylist()
    assert len(layers) == 30 * 2 * 7  # quantized models x blocks x linear layers per block
    assert all(row["recon_error"] > 0 and 0 < row["weight_error"] < 1 for row in layers)
    # one figure per trained run (its average and cooldown drawn in wsd.png), then the summaries
    assert {path.name for path in (results_dir / "figures").iterdir()} == {
        "cosine.png", "wsd.png", "sharpness.png", "loss.png", "lr.png", "averaging.png", "accuracy.png"}
    sharpness = pq.read_table(results_dir / "dataset" / "sharpness.parquet").to_pylist()
    # the largest (algebraic) eigenvalue, also where the one of largest magnitude is negative (near initialisation)
    assert len(sharpness) == 6 and all(row["top_eigenvalue"] > 0 and row["iterations"] >= 1 for row in sharpness)
    assert not (results_dir / "quantized").exists() or not any((results_dir / "quantized").rglob("*.safetensors"))


def test_qtraj_query_answers_over_the_run(tiny_run):
    _, _, results_dir = tiny_run
    result = subprocess.run(
        [str(Path(sys.executable).parent / "qtraj"), "query",
         "SELECT run, count(*) AS n FROM results GROUP BY run ORDER BY run", "--results-dir", str(results_dir),
         "--format", "csv"], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["run,n", "cosine,10", "wsd,10", "wsd-cooldown,5", "wsd-lawa2,5"]
    from qtraj.query import query

    joined = query("SELECT r.bits, avg(l.recon_error_rel) AS recon FROM layer_errors l JOIN results r "
                   "USING (run, checkpoint, quantization) GROUP BY r.bits ORDER BY r.bits", results_dir)
    assert [row["bits"] for row in joined] == [3, 4, 8]
    assert joined[0]["recon"] > joined[1]["recon"] > joined[2]["recon"]
    by_method = query("SELECT method, bits, count(*) AS n FROM layer_errors GROUP BY ALL ORDER BY ALL", results_dir)
    assert [(row["method"], row["bits"], row["n"]) for row in by_method] == [
        ("bnb", 8, 84), ("gptq", 3, 84), ("gptq", 4, 84), ("rtn", 3, 84), ("rtn", 4, 84)]


def readme_view_queries() -> list[str]:
    """The SQL examples of README.md's "Canned views" section."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Canned views", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.DOTALL)


def test_readme_view_examples_answer_over_the_run(tiny_run):
    from qtraj.query import query

    _, _, results_dir = tiny_run
    examples = readme_view_queries()
    assert len(examples) == 6
    for sql in examples:
        assert query(sql, results_dir), sql


def test_canned_views_agree_with_the_tables_they_summarise(tiny_run):
    from qtraj.query import query

    _, _, results_dir = tiny_run
    rows = {(row["run"], row["checkpoint"], row["quantization"]): row
            for row in query("SELECT * FROM results", results_dir)}

    # tiny wsd: step 20 is stable, step 40 ends the decay; cosine decays from step 2, so it has no row
    decay = query("SELECT * FROM decay_effect ORDER BY run, quantization", results_dir)
    assert {row["run"] for row in decay} == {"wsd"} and len(decay) == 5
    for row in decay:
        before, after = rows["wsd", "step000020", row["quantization"]], rows["wsd", "step000040", row["quantization"]]
        assert (row["checkpoint_before"], row["checkpoint_after"]) == ("step000020", "step000040")
        assert row["delta_q_loss_change"] == pytest.approx(after["delta_q_loss"] - before["delta_q_loss"])
        assert row["loss_fp_change"] == pytest.approx(after["loss_fp"] - before["loss_fp"])

    averaging = query("SELECT * FROM averaging_effect", results_dir)
    assert len(averaging) == 5
    for row in averaging:
        assert (row["average"], row["run"], row["checkpoint"]) == ("wsd-lawa2", "wsd", "step000040")
        parent, average = rows["wsd", "step000040", row["quantization"]], rows["wsd-lawa2", "step000040",
                                                                              row["quantization"]]
        assert row["delta_q_loss_change"] == pytest.approx(average["delta_q_loss"] - parent["delta_q_loss"])

    runs = {row["run"]: row for row in query("SELECT * FROM runs", results_dir)}
    assert set(runs) == {"cosine", "wsd", "wsd-cooldown"}
    assert (runs["cosine"]["schedule"], runs["wsd"]["schedule"]) == ("cosine", "wsd")
    assert runs["wsd-cooldown"]["parent_run"] == "wsd" and runs["wsd-cooldown"]["last_step"] == 28
    cooled = rows["wsd-cooldown", "step000028", "rtn-w4g16"]
    assert (cooled["parent_run"], cooled["parent_checkpoint"], cooled["phase"]) == ("wsd", "step000020", "decay")

    cooled_rows = query("SELECT * FROM cooldown_effect", results_dir)
    assert len(cooled_rows) == 5
    for row in cooled_rows:
        branch, end = rows["wsd", "step000020", row["quantization"]], rows["wsd-cooldown", "step000028",
                                                                         row["quantization"]]
        assert (row["branch"], row["branch_step"], row["step"]) == ("step000020", 20, 28)
        assert row["delta_q_loss_change"] == pytest.approx(end["delta_q_loss"] - branch["delta_q_loss"])
        assert row["delta_q_loss_undecayed"] is None  # wsd saved nothing at step 28

    phases = query("SELECT * FROM error_by_phase WHERE run = 'wsd' AND quantization = 'gptq-w3g16'", results_dir)
    assert {(row["phase"], row["checkpoints"]) for row in phases} == {("stable", 1), ("decay", 1)}
    correlations = query("SELECT * FROM error_correlations", results_dir)
    assert all(row["corr_lr"] is None for row in correlations)  # two checkpoints per trajectory: no correlation


def test_science_check_reads_every_effect_and_says_what_it_cannot_check(tiny_run):
    """One seed, no constant-LR run: every effect has n = 1 (no CI, not resolved) and the control section names
    what is missing; the check still exits 0 (it was computed), and 1 only with --strict."""
    from qtraj.science import measure

    _, _, results_dir = tiny_run
    check = measure(results_dir)
    assert check.section("control").missing == (
        "no constant-LR run (schedule: constant) to compare the decayed runs with at equal tokens",)
    assert not check.section("stable").effects
    decay = check.section("decay")
    assert len(decay.effects) == 1 + 5  # the fp loss once, then ΔQ L per quantization; the cooldown is not a run
    assert all(effect.n == 1 and effect.half_width is None and effect.verdict == "not resolved"
               and effect.steps == "20→40" for effect in decay.effects)
    assert decay.missing == ("cosine (seed 0): no checkpoint before the decay",)
    lawa = check.section("lawa")
    assert len(lawa.effects) == 5
    assert all(observation.run == "wsd-lawa2" and effect.steps == "40"
               for effect in lawa.effects for observation in effect.observations)
    command = [str(Path(sys.executable).parent / "qtraj"), "science-check", "--results-dir", str(results_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3. LR decay within the run" in result.stdout and "no CI (n=1)" in result.stdout
    assert subprocess.run([*command, "--strict"], capture_output=True, text=True).returncode == 1


def test_accuracy_rows_and_drops(tiny_run):
    from qtraj.query import query

    _, _, results_dir = tiny_run
    accuracy = query("SELECT * FROM accuracy", results_dir)
    # (6 fp + 30 quantized models) x 2 tasks x (acc, acc_norm)
    assert len(accuracy) == 36 * 2 * 2
    assert {row["task"] for row in accuracy} == {"continuation", "word-order"}
    assert all(0 <= row["value"] <= 1 and row["samples"] == 40 and row["filter"] == "none" for row in accuracy)
    value = {(row["run"], row["checkpoint"], row["quantization"], row["task"], row["metric"]): row["value"]
             for row in accuracy}
    drops = query("SELECT * FROM accuracy_drop", results_dir)
    assert len(drops) == 30 * 2 * 2
    for row in drops:
        acc_fp = value[row["run"], row["checkpoint"], None, row["task"], row["metric"]]
        acc_q = value[row["run"], row["checkpoint"], row["quantization"], row["task"], row["metric"]]
        assert row["abs_drop"] == pytest.approx(acc_fp - acc_q)
        assert row["rel_drop"] == pytest.approx((acc_fp - acc_q) / (1 - acc_fp))
    summary = query("SELECT * FROM accuracy_summary", results_dir)
    assert len(summary) == 30 and all(row["tasks"] == 2 for row in summary)


def test_report_opens_with_the_science_check(tiny_run):
    """`make report`: the science check's text on the report's first page (report/workflow.rst), above the figures."""
    workdir, config, results_dir = tiny_run
    science_check = (results_dir / "science_check.txt").read_text()
    assert "3. LR decay within the run" in science_check
    snakemake("--cores", "2", "--configfile", str(config), "--report", str(workdir / "report.html"), workdir=workdir)
    report = (workdir / "report.html").read_text()
    # the description is embedded as HTML in a script: the science check's lines are in its literal block
    assert "Headline numbers" in report and "LR decay within the run" in report
    assert "no science check in this report" not in report


def test_second_run_does_nothing_even_with_the_keys_reordered(tiny_run):
    workdir, config, _ = tiny_run
    result = snakemake("--cores", "2", "--configfile", str(config), "--dry-run", workdir=workdir)
    assert "Nothing to be done" in result.stdout + result.stderr

    def reverse(value):
        return {key: reverse(value[key]) for key in reversed(list(value))} if isinstance(value, dict) else value

    reordered = workdir / "reordered.yaml"
    reordered.write_text(yaml.safe_dump(reverse(yaml.safe_load(config.read_text())), sort_keys=False))
    result = snakemake("--cores", "2", "--configfile", str(reordered), "--dry-run", workdir=workdir)
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow  # a minute; only-new-jobs is also guarded fast by test_hub_workflow's added family file
def test_adding_a_schedule_runs_only_its_jobs(tiny_run, small_corpus):
    workdir, _, results_dir = tiny_run
    config = write_config(workdir / "config3.yaml", small_corpus, results_dir, {"linear": {"schedule": "linear"}})
    before = {path: path.stat().st_mtime_ns for path in (results_dir / "evals").rglob("*.parquet")}
    jobs = planned_jobs(snakemake("--cores", "2", "--configfile", str(config), "--dry-run", workdir=workdir).stdout)
    per_checkpoint = [(rule, output) for rule, output in jobs
                      if rule not in ("aggregate", "plot_trajectory", "science_check", "all")
                      and not rule.startswith("plot_")]
    # training, then per checkpoint: fp eval, sharpness, and a quantize job (quantize + evaluate) per quantization
    assert len(per_checkpoint) == 1 + 2 * (1 + 1 + 5)
    assert all("/linear/" in output or rule == "train_linear" for rule, output in per_checkpoint)

    snakemake("--cores", "2", "--configfile", str(config), workdir=workdir)
    after = {path: path.stat().st_mtime_ns for path in (results_dir / "evals").rglob("*.parquet")}
    assert all(after[path] == mtime for path, mtime in before.items())
    # fp evals and their accuracy, sharpness, quantized evals, layer errors and accuracy
    assert len(after) - len(before) == 2 * (2 + 1 + 5 * 3)
    rows = pq.read_table(results_dir / "dataset" / "results.parquet").to_pylist()
    assert {row["run"] for row in rows} == {"cosine", "wsd", "wsd-lawa2", "wsd-cooldown", "linear"}
    assert len(rows) == 40


def test_python_code_is_ruff_clean():
    result = subprocess.run([str(Path(sys.executable).parent / "ruff"), "check", "src", "scripts", "tests", "bench"],
                            cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_a_lost_per_job_result_is_computed_again(tiny_run):
    """Per-job files are the durable record: one deleted (or never copied along) is planned again, with the dataset
    built on it, while every other result stays."""
    workdir, config, results_dir = tiny_run
    lost = results_dir / "evals" / "quantized" / "wsd" / "step000040" / "gptq-w3g16.parquet"
    saved, times = lost.read_bytes(), lost.stat()
    lost.unlink()
    try:
        jobs = planned_jobs(snakemake("--cores", "2", "--configfile", str(config), "--dry-run", workdir=workdir).stdout)
        work = {(rule, output) for rule, output in jobs if rule in ("quantize", "evaluate_fp")}
        assert any(rule == "quantize" and str(lost) in output for rule, output in work), work
        assert all("gptq-w3g16" in output for _, output in work), work
    finally:  # as it was, for the tests after this one
        lost.write_bytes(saved)
        os.utime(lost, ns=(times.st_atime_ns, times.st_mtime_ns))


def test_an_unreadable_result_is_named_or_rebuilt_before_any_job(tiny_run):
    """A truncated per-job file stops the workflow naming it and the fix (nothing deleted); a broken dataset file is
    derived data: it is removed and the aggregate planned again. Last in this module: it leaves the dataset to be
    rebuilt."""
    workdir, config, results_dir = tiny_run
    job_file = results_dir / "evals" / "fp" / "wsd" / "step000020.parquet"
    saved, times = job_file.read_bytes(), job_file.stat()
    job_file.write_bytes(saved[: len(saved) // 2])
    try:
        result = snakemake("--cores", "2", "--configfile", str(config), "--dry-run", workdir=workdir, check=False)
        output = result.stdout + result.stderr  # Snakemake prints errors raised in the Snakefile on stdout
        assert result.returncode != 0 and f"rm '{job_file}'" in output, output[-2000:]
        assert (results_dir / "dataset" / "results.parquet").is_file()
    finally:
        job_file.write_bytes(saved)
        os.utime(job_file, ns=(times.st_atime_ns, times.st_mtime_ns))

    dataset_file = results_dir / "dataset" / "results.parquet"
    dataset_file.write_bytes(b"garbage")
    result = snakemake("--cores", "2", "--configfile", str(config), "--dry-run", workdir=workdir)
    assert "unreadable; moved to" in result.stderr
    assert dataset_file.with_name("results.parquet.unreadable").exists()
    assert [rule for rule, _ in planned_jobs(result.stdout) if rule == "aggregate"] == ["aggregate"]
