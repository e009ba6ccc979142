"""`qtraj science-check` and the `control_effect` view on synthetic results datasets with known numbers."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from qtraj import results, science
from qtraj.query import query

T_975_2 = 4.302652729749464  # Student t, 97.5% quantile, 2 degrees of freedom (tables: 4.303)
PEAK_LR, WEIGHT_DECAY, TOKENS_PER_STEP = 0.003, 0.1, 2048
STEPS = tuple(range(100, 900, 100))  # wsd over 800 steps: warmup to 40, stable to 600, decay 700 and 800
SEEDS = (0, 1, 2)

# ΔQ L (as a fraction, as the views hold it) per quantization and seed at wsd's steps 100 (first stable), 600 (last
# before the decay) and 800 (end), of the constant-LR run at 800, and of the LAWA average at 800
DELTA_Q_LOSS = {
    "rtn-w3g32": {"wsd100": (0.0050, 0.0052, 0.0048), "wsd600": (0.0060, 0.0058, 0.0059),
                  "wsd800": (0.0080, 0.0085, 0.0079), "constant800": (0.0062, 0.0060, 0.0061),
                  "lawa800": (0.0070, 0.0072, 0.0069)},
    "gptq-w4g32": {"wsd100": (0.0010, 0.0010, 0.0010), "wsd600": (0.0011, 0.0009, 0.0010),
                   "wsd800": (0.0012, 0.0008, 0.0011), "constant800": (0.0010, 0.0010, 0.0010),
                   "lawa800": (0.0014, 0.00105, 0.0014)},
}
LOSS_FP = {"wsd600": (4.20, 4.24, 4.21), "wsd800": (3.90, 3.92, 3.91), "constant800": (4.10, 4.15, 4.11)}


def seeded(run: str, seed: int) -> str:
    return run if seed == 0 else f"{run}-seed{seed}"


def row(run, step, quantization, delta_q_loss, loss_fp, phase="stable", source="trained", **extra):
    return {"run": run, "checkpoint": f"step{step:06d}", "step": step, "tokens": step * TOKENS_PER_STEP,
            "phase": phase, "source": source, "quantization": quantization, "method": quantization.split("-")[0],
            "bits": int(quantization[quantization.index("w") + 1]), "loss_fp": loss_fp,
            "loss_q": loss_fp * (1 + delta_q_loss), "delta_q_loss": delta_q_loss, **extra}


def wsd_rows(seed: int, quantizations=tuple(DELTA_Q_LOSS)) -> list[dict]:
    rows = []
    for quantization in quantizations:
        known = {name: values[SEEDS.index(seed)] for name, values in DELTA_Q_LOSS[quantization].items()}
        for step in STEPS:
            # steps between the known ones: anything else, the check must not read them
            delta_q_loss = known.get(f"wsd{step}", 0.5)
            loss_fp = LOSS_FP.get(f"wsd{step}", (9.0, 9.0, 9.0))[SEEDS.index(seed)]
            rows.append(row(seeded("wsd", seed), step, quantization, delta_q_loss, loss_fp,
                            phase="stable" if step <= 600 else "decay", lr=PEAK_LR))
    return rows


def constant_rows(run: str, seed: int, steps=(800,), quantizations=tuple(DELTA_Q_LOSS)) -> list[dict]:
    return [row(run, step, quantization, DELTA_Q_LOSS[quantization]["constant800"][SEEDS.index(seed)] if step == 800
                else 0.7, LOSS_FP["constant800"][SEEDS.index(seed)] if step == 800 else 8.0)
            for quantization in quantizations for step in steps]


def lawa_rows(seed: int) -> list[dict]:
    run = seeded("wsd", seed)
    return [row(f"{run}-lawa", 800, quantization, values["lawa800"][SEEDS.index(seed)], 3.95, phase="decay",
                source="averaged", parent_run=run, parent_checkpoint="step000800")
            for quantization, values in DELTA_Q_LOSS.items()]


def log_rows(run: str, schedule: str, seed: int, peak_lr: float = PEAK_LR, parameters: int | None = None) -> list[dict]:
    return [{"run": run, "schedule": schedule, "peak_lr": peak_lr, "weight_decay": WEIGHT_DECAY, "seed": seed,
             "step": step, "tokens": step * TOKENS_PER_STEP, "lr": peak_lr, "train_loss": 4.0, "parameters": parameters}
            for step in (1, 800)]


def write_dataset(directory: Path, rows: list[dict], logs: list[dict] | None) -> Path:
    """A results dataset as the workflow's aggregate step writes it; logs None: no training_log table at all."""
    evals = directory / "evals" / "results.parquet"
    results.write_rows(rows, results.QUANTIZED_EVAL_SCHEMA, evals)
    inputs = {"results": [str(evals)]}
    if logs is not None:
        log = directory / "training" / "log.parquet"
        results.write_rows(logs, results.TRAINING_LOG_SCHEMA, log)
        inputs["training_log"] = [str(log)]
    results.aggregate(inputs, directory / "dataset")
    return directory


def paper_dataset(directory: Path, seeds=SEEDS, constant_steps=(800,), averages=True, constants=True) -> Path:
    """The default config's shape: wsd and constant runs per seed, a LAWA average at each wsd run's end, and a
    constant run of another peak LR (seed 0) that no wsd run may be paired with."""
    rows, logs = [], []
    for seed in seeds:
        rows += wsd_rows(seed)
        logs += log_rows(seeded("wsd", seed), "wsd", seed)
        if constants:
            rows += constant_rows(seeded("constant", seed), seed, constant_steps)
            logs += log_rows(seeded("constant", seed), "constant", seed)
        if averages:
            rows += lawa_rows(seed)
    if constants:
        rows += constant_rows("constant-lr1e-3", 0, STEPS)
        logs += log_rows("constant-lr1e-3", "constant", 0, peak_lr=0.001)
    return write_dataset(directory, rows, logs)


def effect(check, section, quantity, quantization):
    (found,) = [e for e in check.section(section).effects if (e.quantity, e.quantization) == (quantity, quantization)]
    return found


def test_t_critical_value_and_its_fallback_table():
    assert science.t_critical(2) == pytest.approx(T_975_2, rel=1e-12)
    assert science.T_975[1] == pytest.approx(T_975_2, rel=1e-12)
    scipy_stats = pytest.importorskip("scipy.stats")
    for degrees in (1, 5, 29, 30):
        assert science.T_975[degrees - 1] == pytest.approx(scipy_stats.t.ppf(0.975, degrees), rel=1e-12)


def test_t_critical_value_without_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # `from scipy.stats import t` raises ImportError
    assert science.t_critical(2) == T_975_2
    assert science.t_critical(40) == pytest.approx(2.0210753903062737, abs=1e-5)  # beyond the table
    assert science.t_critical(120) == pytest.approx(1.9799304050824413, abs=1e-6)


def test_verdicts_read_the_interval_against_the_papers_direction():
    assert science.verdict(0.3, 0.2, +1) == "supported"
    assert science.verdict(-0.3, 0.2, +1) == "opposite"
    assert science.verdict(0.3, 0.4, +1) == "not resolved"
    assert science.verdict(-0.3, 0.2, -1) == "supported"
    assert science.verdict(0.3, None, +1) == "not resolved"  # one seed: no interval
    assert science.verdict(0.3, 0.2, 0) == "rises" and science.verdict(-0.3, 0.2, 0) == "falls"
    assert science.verdict(0.3, 0.3, 0) == "not resolved"  # an interval touching zero does not exclude it


def test_control_view_pairs_same_seed_peak_lr_and_step_only(tmp_path):
    paper_dataset(tmp_path, constant_steps=STEPS)
    rows = query("SELECT * FROM control_effect ORDER BY decayed_run, quantization, step", tmp_path)
    assert {(row["decayed_run"], row["constant_run"]) for row in rows} == {
        ("wsd", "constant"), ("wsd-seed1", "constant-seed1"), ("wsd-seed2", "constant-seed2")}  # not constant-lr1e-3
    assert len(rows) == 3 * 2 * len(STEPS)  # every step both runs have, per quantization
    assert all(row["step"] * TOKENS_PER_STEP == row["tokens"] for row in rows)
    assert [row["step"] for row in rows if row["at_end"]] == [800] * 6
    end = next(row for row in rows if row["decayed_run"] == "wsd-seed1" and row["quantization"] == "rtn-w3g32"
               and row["at_end"])
    assert (end["seed"], end["schedule"], end["phase"]) == (1, "wsd", "decay")
    assert end["delta_q_loss_decayed"] == 0.0085 and end["delta_q_loss_constant"] == 0.0060
    assert end["delta_q_loss_difference"] == pytest.approx(0.0025)
    assert end["loss_fp_difference"] == pytest.approx(3.92 - 4.15)


def test_constant_branches_control_their_own_parent_only_and_measure_as_constant_runs(tmp_path):
    """The default's controls: each WSD run continued at a constant LR from its decay start (a cooldown branch of
    shape constant). A decayed run of the same seed and peak LR that is not the branch's parent gets no control."""
    rows, logs = [], []
    for seed in SEEDS:
        wsd, constant = seeded("wsd", seed), seeded("constant", seed)
        rows += wsd_rows(seed)
        logs += log_rows(wsd, "wsd", seed)
        rows += [{**one, "source": "cooldown", "parent_run": wsd, "parent_checkpoint": "step000600"}
                 for one in constant_rows(constant, seed)]
        logs += [{**one, "parent_run": wsd, "parent_checkpoint": "step000600"}
                 for one in log_rows(constant, "constant", seed)]
    rows += [{**one, "run": "cosine"} for one in wsd_rows(0)]  # seed 0, same peak LR, decayed: not the parent
    logs += log_rows("cosine", "cosine", 0)
    branched = science.measure(write_dataset(tmp_path / "branched", rows, logs))
    pairs = query("SELECT DISTINCT decayed_run, constant_run FROM control_effect ORDER BY ALL", tmp_path / "branched")
    assert [(pair["decayed_run"], pair["constant_run"]) for pair in pairs] == [
        ("wsd", "constant"), ("wsd-seed1", "constant-seed1"), ("wsd-seed2", "constant-seed2")]
    assert any("cosine" in line and "no constant-LR run" in line for line in branched.section("control").missing)
    scratch = science.measure(paper_dataset(tmp_path / "scratch"))
    for quantity, quantization in ((science.DELTA_Q_LOSS, "rtn-w3g32"), (science.LOSS_FP, science.FP)):
        found, expected = (effect(check, "control", quantity, quantization) for check in (branched, scratch))
        assert (found.mean, found.half_width) == pytest.approx((expected.mean, expected.half_width))


def test_control_view_marks_the_decayed_runs_end_even_without_a_control_there(tmp_path):
    rows = wsd_rows(0) + constant_rows("constant", 0, steps=(400,))
    write_dataset(tmp_path, rows, log_rows("wsd", "wsd", 0) + log_rows("constant", "constant", 0))
    paired = query("SELECT step, at_end FROM control_effect", tmp_path)
    assert paired == [{"step": 400, "at_end": False}] * 2


def test_three_seeds_give_means_intervals_and_verdicts_in_percent(tmp_path):
    check = science.measure(paper_dataset(tmp_path))

    control = effect(check, "control", "ΔQ L", "rtn-w3g32")
    # per seed, in percentage points: (0.80 - 0.62, 0.85 - 0.60, 0.79 - 0.61) = (0.18, 0.25, 0.18)
    assert control.differences == pytest.approx([0.18, 0.25, 0.18])
    assert control.mean == pytest.approx(0.61 / 3)
    # deviations (-0.07, 0.14, -0.07) / 3: sample variance 0.0294 / 18; half width t * sd / sqrt(3)
    assert control.half_width == pytest.approx(T_975_2 * math.sqrt(0.0294 / 18) / math.sqrt(3))
    assert (control.baseline_mean, control.compared_mean) == pytest.approx((1.83 / 3, 2.44 / 3))
    assert (control.n, control.steps, control.verdict) == (3, "800", "supported")
    assert [(o.run, o.seed, o.baseline_run) for o in control.observations] == [
        ("wsd", 0, "constant"), ("wsd-seed1", 1, "constant-seed1"), ("wsd-seed2", 2, "constant-seed2")]

    loss = effect(check, "control", "fp loss", "fp")  # once per setting: the fp model is one for all quantizations
    assert loss.differences == pytest.approx([-0.20, -0.23, -0.20])  # nats, not scaled
    assert loss.half_width == pytest.approx(T_975_2 * math.sqrt(0.0006 / 2) / math.sqrt(3))
    assert (loss.verdict, loss.setting, loss.difference_unit) == ("supported", "wsd lr=0.003 wd=0.1 tokens=1,638,400",
                                                                  "nats")

    stable = effect(check, "stable", "ΔQ L", "rtn-w3g32")
    assert stable.differences == pytest.approx([0.10, 0.06, 0.11]) and stable.steps == "100→600"
    assert (stable.expected, stable.verdict) == (0, "rises")

    decay = effect(check, "decay", "ΔQ L", "rtn-w3g32")
    assert decay.differences == pytest.approx([0.20, 0.27, 0.20]) and decay.steps == "600→800"
    assert decay.verdict == "supported"
    assert effect(check, "decay", "fp loss", "fp").differences == pytest.approx([-0.30, -0.32, -0.30])

    lawa = effect(check, "lawa", "ΔQ L", "rtn-w3g32")
    assert lawa.differences == pytest.approx([-0.10, -0.13, -0.10]) and lawa.verdict == "supported"
    assert [o.run for o in lawa.observations] == ["wsd-lawa", "wsd-seed1-lawa", "wsd-seed2-lawa"]

    # 4 bit: seeds disagree (not resolved), and LAWA raises ΔQ L on every seed (opposite)
    small = effect(check, "control", "ΔQ L", "gptq-w4g32")
    assert small.differences == pytest.approx([0.02, -0.02, 0.01]) and small.verdict == "not resolved"
    assert effect(check, "stable", "ΔQ L", "gptq-w4g32").verdict == "not resolved"
    assert effect(check, "decay", "ΔQ L", "gptq-w4g32").verdict == "not resolved"
    opposite = effect(check, "lawa", "ΔQ L", "gptq-w4g32")
    assert opposite.differences == pytest.approx([0.02, 0.025, 0.03]) and opposite.verdict == "opposite"
    assert opposite.half_width == pytest.approx(T_975_2 * 0.005 / math.sqrt(3))

    assert all(not section.missing for section in check.sections)
    assert len(check.effects) == 1 + 2 + 2 + 1 + 2 + 2  # fp loss in 1 and 3, ΔQ L per quantization in all four
    # each CI alone: rtn-w3g32's control and decay effects are supported; after Holm's correction over the 8 tested
    # effects they are not (p 0.013 and 0.016 become 0.054 and 0.054), while the fp loss effects survive
    assert check.holm_p[id(control)] == pytest.approx(0.054, abs=1e-3)
    assert (check.verdict(control), check.verdict(decay), check.verdict(loss)) == (
        "not resolved", "not resolved", "supported")
    assert check.verdict(opposite) == "not resolved" and check.verdict(stable) == "rises"  # section 2: its CI
    assert {(e.section, e.quantization) for e in check.unsupported} == {
        ("control", "gptq-w4g32"), ("decay", "gptq-w4g32"), ("lawa", "gptq-w4g32"), ("control", "rtn-w3g32"),
        ("decay", "rtn-w3g32")}


def test_report_is_aligned_and_labels_its_units(tmp_path):
    text = science.report(paper_dataset(tmp_path))
    lines = text.splitlines()
    control = next(line for line in lines if line.lstrip().startswith("rtn-w3g32") and "ΔQ L" in line)
    assert "0.610% → 0.813%" in control and "+0.203 ± 0.100 pp" in control
    assert "0.013 (0.054)  not resolved" in control  # the CI excludes 0; Holm's correction does not keep it
    assert "0:+0.180 1:+0.250 2:+0.180" in control
    assert "fp loss" in text and "4.1200 → 3.9100" in text and "-0.2100 ± 0.0430 nats" in text
    headers = [line for line in lines if line.lstrip().startswith("quantization")]
    assert len(headers) == 4 and len(set(headers)) == 1
    column = headers[0].index("verdict")  # every effect line has its verdict under the header's
    effect_lines = [line for line in lines if line.split()[:1] in (["fp"], *([q] for q in DELTA_Q_LOSS))]
    assert len(effect_lines) == 10
    assert all(line[column:].split("  ")[0].strip() in ("supported", "not resolved", "opposite", "rises", "falls")
               for line in effect_lines)


def test_a_missing_control_step_drops_that_seed_and_says_why(tmp_path):
    rows, logs = [], []
    for seed in SEEDS:
        rows += wsd_rows(seed) + constant_rows(seeded("constant", seed), seed, (400,) if seed == 2 else (800,))
        logs += log_rows(seeded("wsd", seed), "wsd", seed) + log_rows(seeded("constant", seed), "constant", seed)
    check = science.measure(write_dataset(tmp_path, rows, logs))
    control = effect(check, "control", "ΔQ L", "rtn-w3g32")
    assert control.n == 2 and control.differences == pytest.approx([0.18, 0.25])
    assert control.half_width == pytest.approx(science.t_critical(1) * math.sqrt(0.07**2 / 2) / math.sqrt(2))
    assert check.section("control").missing == (
        "wsd-seed2 (seed 2): no constant-LR checkpoint at its last step 800 (constant-seed2 has steps [400])",)
    assert check.section("lawa").missing == ("no weight averages in the dataset",)


def test_a_constant_run_of_another_peak_lr_is_no_control(tmp_path):
    rows = wsd_rows(0) + constant_rows("constant-lr1e-3", 0, STEPS)
    check = science.measure(write_dataset(tmp_path, rows, log_rows("wsd", "wsd", 0)
                                          + log_rows("constant-lr1e-3", "constant", 0, peak_lr=0.001)))
    assert query("SELECT * FROM control_effect", tmp_path) == []
    assert check.section("control").effects == ()
    assert check.section("control").missing == (
        "wsd (seed 0): no constant-LR run of the same seed, peak LR and weight decay (lr=0.003 wd=0.1)",)


def test_without_constant_runs_or_averages_the_sections_say_so(tmp_path):
    check = science.measure(paper_dataset(tmp_path, constants=False, averages=False))
    assert check.section("control").effects == ()
    assert check.section("control").missing == (
        "no constant-LR run (schedule: constant) to compare the decayed runs with at equal tokens",)
    assert check.section("lawa").missing == ("no weight averages in the dataset",)
    assert check.checked and effect(check, "decay", "ΔQ L", "rtn-w3g32").n == 3
    text = science.render(check)
    assert "missing: no constant-LR run" in text and "missing: no weight averages" in text


def test_a_single_seed_has_no_interval_and_says_so(tmp_path):
    check = science.measure(paper_dataset(tmp_path, seeds=(0,)))
    control = effect(check, "control", "ΔQ L", "rtn-w3g32")
    assert control.n == 1 and control.half_width is None and control.verdict == "not resolved"
    assert control.mean == pytest.approx(0.18)
    assert "+0.180 pp, no CI (n=1)" in science.render(check)


def test_hub_families_without_a_training_log(tmp_path):
    rows = [{**r, "run": "olmo2-1b", "source": "hub"} for r in wsd_rows(0)]
    check = science.measure(write_dataset(tmp_path, rows, logs=None))
    assert check.section("control").missing == (
        "no training log in the dataset (hub or local checkpoints): the runs' seeds and settings are unknown",)
    decay = effect(check, "decay", "ΔQ L", "rtn-w3g32")
    assert (decay.setting, decay.n, decay.observations[0].seed) == ("olmo2-1b", 1, None)
    assert decay.differences == pytest.approx([0.20])


def read_rows(directory: Path, table: str = "results") -> list[dict]:
    return [{key: value for key, value in r.items() if value is not None}
            for r in pq.read_table(directory / "dataset" / f"{table}.parquet").to_pylist()]


def qtraj(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "qtraj"), "science-check", *args],
                          capture_output=True, text=True)


def test_cli_exit_status(tmp_path, capsys):
    from qtraj.cli import main

    dataset = str(paper_dataset(tmp_path / "paper"))
    computed = qtraj("--results-dir", dataset)  # through the installed entry point
    assert computed.returncode == 0, computed.stderr  # computed: 0, whatever the verdicts
    assert "1. LR decay beyond a constant LR" in computed.stdout and "opposite" in computed.stdout
    strict = qtraj("--results-dir", dataset, "--strict")
    assert strict.returncode == 1 and strict.stdout == computed.stdout
    assert "5 effects with an expected direction are not supported" in strict.stderr

    supported_only = tmp_path / "rtn"  # 3-bit RTN alone: every effect with a direction is supported
    rows = [r for r in read_rows(Path(dataset)) if r["quantization"] == "rtn-w3g32"]
    write_dataset(supported_only, rows, read_rows(Path(dataset), "training_log"))
    assert main(["science-check", "--results-dir", str(supported_only), "--strict"]) == 0

    nothing = write_dataset(tmp_path / "constant-only", constant_rows("constant", 0),
                            log_rows("constant", "constant", 0))
    capsys.readouterr()
    assert main(["science-check", "--results-dir", str(nothing)]) == 2
    assert "Nothing could be checked" in capsys.readouterr().out
    assert main(["science-check", "--results-dir", str(tmp_path / "nowhere")]) == 2
    assert "run the workflow first" in capsys.readouterr().err


def test_holm_adjusts_known_p_values_step_down():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04; running maximum: 0.02 0.03 0.06 0.06
    assert science.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert science.holm([0.5, None, 0.4]) == [0.8, None, 0.8]  # None is not a test: m = 2
    assert science.holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1


def test_two_sided_p_is_the_one_sample_t_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    differences = [0.199, -0.113, -0.040]
    assert science.two_sided_p(differences) == pytest.approx(scipy_stats.ttest_1samp(differences, 0).pvalue, rel=1e-12)
    assert science.two_sided_p([0.5]) is None


def test_the_report_adjusts_every_tested_effect_together(tmp_path):
    check = science.measure(paper_dataset(tmp_path))
    tested = [effect for effect in check.effects if effect.expected]
    assert len(tested) == len(check.effects) - 2  # all but the stable phase's trend, which expects no direction
    adjusted = check.holm_p
    assert list(adjusted) == [id(effect) for effect in tested]
    assert list(adjusted.values()) == science.holm([effect.p_value for effect in tested])
    assert f"over the {len(tested)} effects" in science.render(check)


def test_the_paired_bootstrap_recovers_a_known_difference_and_covers_it():
    """Two models scored on the same blocks: the second's loss is the first's + 0.05 + noise of sd 0.02 per block,
    while the blocks themselves vary by sd 1. Paired, the interval is about the noise (±0.004 for 100 blocks), not
    the blocks' spread (±0.2 unpaired), and over 200 such datasets it covers the true difference ~95% of the time."""
    def difference(means):
        return means["b"] - means["a"]

    rng = np.random.default_rng(1)
    covered, widths = 0, []
    for trial in range(200):
        a = 3.0 + rng.normal(0, 1.0, 100)
        b = a + 0.05 + rng.normal(0, 0.02, 100)
        low, high = science.paired_bootstrap_interval({"a": a, "b": b}, difference, resamples=1000, seed=trial)
        true_mean = 0.05  # the expected difference; the sample's own is 0.05 + mean(noise)
        covered += low <= true_mean <= high
        widths.append(high - low)
    assert 0.90 <= covered / 200 <= 0.99
    assert np.mean(widths) == pytest.approx(2 * 1.96 * 0.02 / 10, rel=0.15)


def test_the_paired_bootstrap_refuses_models_scored_on_other_blocks():
    with pytest.raises(ValueError, match="same blocks"):
        science.paired_bootstrap_interval({"a": np.ones(4), "b": np.ones(5)}, lambda means: means["a"])


def test_evaluation_intervals_of_a_delta_q_loss_comparison():
    """A control comparison's interval is computed from the four models' block losses with ΔQ L's own formula:
    with every block alike (no noise) it collapses onto the observed difference."""
    effect = science.Effect("control", science.DELTA_Q_LOSS, "rtn-w3g32", "wsd", 1, (science.Observation(
        "wsd", 0, "constant", 800, 800, baseline=1.0, compared=2.0),))
    blocks = {("wsd", 800, "fp"): np.full(8, 3.0), ("wsd", 800, "rtn-w3g32"): np.full(8, 3.06),
              ("constant", 800, "fp"): np.full(8, 3.2), ("constant", 800, "rtn-w3g32"): np.full(8, 3.232)}
    low, high = science.evaluation_interval(effect, effect.observations[0], blocks)
    assert low == pytest.approx(high) == pytest.approx(2.0 - 1.0)  # 100 (3.06 / 3 - 1) - 100 (3.232 / 3.2 - 1)
    del blocks[("constant", 800, "fp")]
    assert science.evaluation_interval(effect, effect.observations[0], blocks) is None


def two_sizes_dataset(directory: Path) -> Path:
    """The paper dataset's wsd and constant runs twice, as models of two sizes (the larger with every ΔQ L 1 pp
    higher, on both arms): a grid of qtraj.sweeps in miniature."""
    rows, logs = [], []
    for prefix, parameters, shift in (("small-", 92_320, 0.0), ("large-", 237_888, 0.01)):
        for seed in SEEDS:
            constant = constant_rows(seeded("constant", seed), seed)
            for made, schedule in ((wsd_rows(seed), "wsd"), (constant, "constant")):
                rows += [{**item, "run": prefix + item["run"], "delta_q_loss": item["delta_q_loss"] + shift}
                         for item in made]
                logs += log_rows(prefix + made[0]["run"], schedule, seed, parameters=parameters)
    return write_dataset(directory, rows, logs)


def test_models_of_two_sizes_are_two_cells_never_pooled(tmp_path):
    """A grid (qtraj.sweeps) trains models of several sizes for the same tokens with the same schedule: each size is
    its own setting, so each effect pools the seeds of one size only; the constant run of the other size is no
    control (qtraj.query.CONTROL_KEYS)."""
    check = science.measure(two_sizes_dataset(tmp_path))
    cells = [e for e in check.section("control").effects if e.quantization == "rtn-w3g32"]
    assert [(e.setting.split()[-1], e.n) for e in cells] == [("params=237,888", 3), ("params=92,320", 3)]
    assert {e.observations[0].run for e in cells} == {"large-wsd", "small-wsd"}
    assert cells[0].mean == pytest.approx(cells[1].mean)  # the same shift on both arms: the same difference


def test_the_decay_map_draws_the_control_effects_per_size_and_tokens_per_parameter(tmp_path):
    from qtraj import plotting

    directory = two_sizes_dataset(tmp_path)
    check = science.measure(directory)
    points = science.decay_map_cells(directory)
    effects = check.section("control").effects
    assert len(points) == len(effects) == 2 * (1 + 2)  # per size: the fp loss and two quantizations
    point = next(p for p in points if (p["quantization"], p["parameters"]) == ("rtn-w3g32", 92_320))
    assert point["tokens_per_parameter"] == pytest.approx(800 * TOKENS_PER_STEP / 92_320)
    assert point["bits"] == 3 and point["n"] == 3
    (same,) = [e for e in effects if e.quantization == "rtn-w3g32" and e.setting.endswith("params=92,320")]
    assert (point["mean"], point["half_width"], point["holm_p"]) == (same.mean, same.half_width, check.holm_p[id(same)])
    table = science.render_cells(points).splitlines()
    assert len(table) == 1 + 6 and table[1].split()[:4] == ["92,320", "17.7", "fp", "fp"]
    assert "   -  " in table[1]  # no per-block losses in this dataset: no evaluation noise to show
    figure = plotting.decay_map_figure(directory)
    assert [axis.get_title() for axis in figure.axes] == ["fp loss", "3-bit", "4-bit"]


def test_the_checks_verdict_reads_the_holm_adjusted_p_against_the_papers_direction():
    def tested(differences, expected=1):
        observations = tuple(science.Observation(f"run{seed}", seed, "control", 800, 800, 0.0, difference)
                             for seed, difference in enumerate(differences))
        return science.Effect("control", "ΔQ L", "rtn-w3g32", "wsd", expected, observations)

    clear_rise, clear_fall, noisy = tested([1.0, 1.1, 0.9, 1.05]), tested([-1.0, -1.1, -0.9, -1.05]), tested([1, -1, 2])
    untested = tested([0.5, 0.6, 0.55], expected=0)
    check = science.ScienceCheck((science.Section("control", "", (clear_rise, clear_fall, noisy, untested), ()),))
    assert [check.verdict(effect) for effect in (clear_rise, clear_fall, noisy, untested)] == [
        "supported", "opposite", "not resolved", "rises"]
    assert check.tested == [clear_rise, clear_fall, noisy] and check.unsupported == [clear_fall, noisy]


def test_a_runs_tokens_are_its_last_checkpoints_when_its_log_stops_short(tmp_path):
    """A training log written before qtraj logged the last step ends a few steps early (here at 792 of 800): the
    setting (and a grid's tokens per parameter) takes the tokens of the run's last checkpoint, which are exact."""
    rows, logs = [], []
    for seed in SEEDS:
        rows += wsd_rows(seed) + constant_rows(seeded("constant", seed), seed)
        for run, schedule in ((seeded("wsd", seed), "wsd"), (seeded("constant", seed), "constant")):
            logs += [{**row, "step": 792, "tokens": 792 * TOKENS_PER_STEP} if row["step"] == 800 else row
                     for row in log_rows(run, schedule, seed)]
    check = science.measure(write_dataset(tmp_path, rows, logs))
    assert effect(check, "control", "fp loss", "fp").setting.endswith(f"tokens={800 * TOKENS_PER_STEP:,}")
