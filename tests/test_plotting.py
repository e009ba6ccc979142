"""The figures, drawn from a small synthetic results dataset with known numbers: what each must show."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.colors
import matplotlib.pyplot as plt
import pytest
from matplotlib.container import ErrorbarContainer

from qtraj import plotting, results

PEAK_LR, TOKENS_PER_STEP = 0.003, 1000  # 1000 tokens per step: step 40 is 0.04 M tokens
STEPS = (10, 20, 30, 40)
QUANTIZATIONS = {"rtn-w3g16": ("rtn", 3), "gptq-w4g16": ("gptq", 4)}
EIGENVALUES = {10: 5.0, 20: 2.0, 30: 8.0, 40: 3.0}  # not in step order: the sharpness line must follow the steps
ACCURACY = {"t1": (0.60, 0.55), "t2": (0.70, 0.66)}  # task -> (fp, quantized) accuracy
STDERR = {"t1": (0.03, 0.04), "t2": (0.02, 0.05)}  # task -> (fp, quantized) standard error


def cosine_lr(step: int) -> float:
    """Warmup to step 4, then a cosine decay to 0 at step 40."""
    if step <= 4:
        return PEAK_LR * step / 4
    return PEAK_LR * 0.5 * (1 + math.cos(math.pi * (step - 4) / 36))


def wsd_lr(step: int) -> float:
    """Warmup to step 4, stable to step 30, then a linear decay to 0 at step 40."""
    if step <= 4:
        return PEAK_LR * step / 4
    return PEAK_LR if step <= 30 else PEAK_LR * (40 - step) / 10


def delta_q_loss(run: str, step: int, quantization: str) -> float:
    offset = {"cosine": 0.0, "wsd": 0.001, "wsd-lawa": -0.002, "constant": 0.003, "wsd-cooldown": 0.005,
              "fam": 0.0}[run]
    return (0.01 if quantization.startswith("rtn") else 0.002) * (1 + step / 40) + offset


def checkpoint(run: str, step: int, source: str = "trained", parent: tuple[str, int] | None = None,
               lr: float | None = None) -> dict:
    return {"run": run, "checkpoint": f"step{step:06d}", "step": step, "tokens": step * TOKENS_PER_STEP, "lr": lr,
            "phase": "stable", "source": source, "parent_run": parent[0] if parent else None,
            "parent_checkpoint": f"step{parent[1]:06d}" if parent else None}


def log_rows(run: str, schedule: str, steps, lr, parent_step: int | None = None) -> list[dict]:
    return [{"run": run, "schedule": schedule, "peak_lr": PEAK_LR, "seed": 0, "step": step,
             "tokens": step * TOKENS_PER_STEP, "lr": lr(step), "train_loss": 4.0,
             "parent_run": "wsd" if parent_step else None,
             "parent_checkpoint": f"step{parent_step:06d}" if parent_step else None} for step in steps]


def checkpoints() -> list[dict]:
    """cosine and wsd trained here; a LAWA average of wsd at its end; two cooldowns of wsd: `constant` (a constant-LR
    branch from step 20 to 30) and `wsd-cooldown` (decaying branches 10 → 15 and 20 → 25); a family `fam` trained
    elsewhere, whose LR is known only at its checkpoints (it falls after step 20)."""
    return ([checkpoint("cosine", step, lr=cosine_lr(step)) for step in STEPS]
            + [checkpoint("wsd", step, lr=wsd_lr(step)) for step in STEPS]
            + [checkpoint("wsd-lawa", 40, "averaged", ("wsd", 40)), checkpoint("constant", 30, "cooldown", ("wsd", 20)),
               checkpoint("wsd-cooldown", 15, "cooldown", ("wsd", 10)),
               checkpoint("wsd-cooldown", 25, "cooldown", ("wsd", 20))]
            + [checkpoint("fam", step, "hub", lr=lr) for step, lr in zip(STEPS, (3e-3, 3e-3, 2e-3, 1e-3), strict=True)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A results dataset as the workflow's aggregate step writes it."""
    directory = tmp_path_factory.mktemp("results")
    fp_rows = [{**row, "loss_fp": 5.0 - row["step"] / 40} for row in checkpoints()]
    quantized = [{**row, "quantization": name, "method": method, "bits": bits, "loss_q": row["loss_fp"] * 1.01,
                  "delta_q_loss": delta_q_loss(row["run"], row["step"], name)}
                 for row in fp_rows for name, (method, bits) in QUANTIZATIONS.items()]
    logs = (log_rows("cosine", "cosine", range(1, 41), cosine_lr) + log_rows("wsd", "wsd", range(1, 41), wsd_lr)
            + log_rows("constant", "constant", range(21, 31), lambda step: PEAK_LR, parent_step=20)
            + log_rows("wsd-cooldown", "cooldown-linear", range(11, 16), lambda step: PEAK_LR * (15 - step) / 5, 10)
            + log_rows("wsd-cooldown", "cooldown-linear", range(21, 26), lambda step: PEAK_LR * (25 - step) / 5, 20))
    sharpness = [{**row, "top_eigenvalue": EIGENVALUES[row["step"]]} for row in checkpoints() if row["run"] == "wsd"]
    accuracy = [{**row, "quantization": quantization, "method": method, "bits": bits, "task": task, "metric": "acc",
                 "filter": "none", "configured": True, "value": ACCURACY[task][index],
                 "stderr": STDERR[task][index]}
                for row in checkpoints() if row["run"] == "wsd" for task in ACCURACY
                for index, (quantization, method, bits) in enumerate([(None, None, None), ("rtn-w3g16", "rtn", 3)])]
    tables = {"fp_evals": (fp_rows, results.FP_EVAL_SCHEMA), "results": (quantized, results.QUANTIZED_EVAL_SCHEMA),
              "training_log": (logs, results.TRAINING_LOG_SCHEMA), "sharpness": (sharpness, results.SHARPNESS_SCHEMA),
              "accuracy": (accuracy, results.ACCURACY_SCHEMA)}
    inputs = {}
    for name, (rows, schema) in tables.items():
        results.write_rows(rows, schema, directory / "jobs" / f"{name}.parquet")
        inputs[name] = [str(directory / "jobs" / f"{name}.parquet")]
    results.aggregate(inputs, directory / "dataset")
    return directory


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def decay_spans(axis) -> list[tuple[float, float]]:
    return [(patch.get_x(), patch.get_x() + patch.get_width()) for patch in axis.patches
            if patch.get_gid() == plotting.DECAY_SPAN_ID]


def folded_points(axis, run: str) -> set[tuple[float, float]]:
    return {(round(x, 9), round(y, 9)) for collection in axis.collections if collection.get_gid() == f"folded:{run}"
            for x, y in collection.get_offsets()}


def test_decreasing_spans_skip_warmup_and_flat_stretches():
    schedule = [(0, 0.0), (1, 1.0), (2, 1.0), (3, 0.5), (4, 0.2), (5, 0.2), (6, 0.1), (7, 0.1 + 1e-15)]
    assert plotting.decreasing_spans(schedule) == [(2, 4), (5, 6)]
    assert plotting.decreasing_spans([(0, 1.0), (1, 1.0)]) == []


@pytest.mark.parametrize(("run", "start_step"), [("cosine", 4), ("wsd", 30), ("fam", 20)])
def test_trajectory_shades_only_where_the_lr_falls(dataset, run, start_step):
    """cosine: from its warmup's peak, not from the first checkpoint; wsd: its decay only; a family without a
    training log: between the checkpoints whose LR falls."""
    top, bottom = plotting.trajectory_figure(dataset, run).axes[:2]
    for axis in (top, bottom):
        (start, end), = decay_spans(axis)
        assert start == pytest.approx(start_step * TOKENS_PER_STEP / 1e6)
        assert end == pytest.approx(40 * TOKENS_PER_STEP / 1e6)


def test_averages_and_branches_are_marked_points_of_their_parents_figure(dataset):
    figure = plotting.trajectory_figure(dataset, "wsd")
    top, bottom, lr_axis = figure.axes
    labels = [text.get_text() for text in top.get_legend().get_texts()]
    assert {"wsd-lawa: average", "constant: constant-LR branch", "wsd-cooldown: cooldown", "LR decay"} <= set(labels)
    markers = plotting.folded_markers({"wsd-lawa": "average", "constant": "constant-LR branch",
                                       "wsd-cooldown": "cooldown"})
    assert len(set(markers.values())) == 3
    for quantization in QUANTIZATIONS:
        assert (0.04, round(100 * delta_q_loss("wsd-lawa", 40, quantization), 9)) in folded_points(top, "wsd-lawa")
        assert (0.03, round(100 * delta_q_loss("constant", 30, quantization), 9)) in folded_points(top, "constant")
    assert {x for x, _ in folded_points(top, "wsd-cooldown")} == {0.015, 0.025}
    assert {point for point in folded_points(bottom, "constant")} == {(0.03, 5.0 - 30 / 40)}
    # a dotted line from the constant branch's end back to its branch point, wsd at step 20
    branch_point = 100 * delta_q_loss("wsd", 20, "rtn-w3g16")
    assert any(list(line.get_xdata()) == pytest.approx([0.02, 0.03]) and line.get_ydata()[0] == pytest.approx(
        branch_point) and line.get_linestyle() == ":" for line in top.get_lines())
    # the LR axis: the run's schedule and each branch's, from zero up (never the -0.04..0.04 of a lone value)
    assert len(lr_axis.get_lines()) == 1 + 3 and lr_axis.get_ylim()[0] == 0


def test_a_parentless_run_folds_nothing_and_every_derived_run_has_an_owner():
    assert plotting.figure_owner({"wsd-lawa": "wsd"}, "cosine") == "cosine"
    # an average of a cooldown lands in the trained run's figure; a cycle in broken data does not hang
    assert plotting.figure_owner({"lawa": "cool", "cool": "wsd"}, "lawa") == "wsd"
    assert plotting.figure_owner({"a": "b", "b": "a"}, "a") == "b"
    assert plotting.folded_kind("averaged", None) == "average"
    assert plotting.folded_kind("cooldown", "constant") == "constant-LR branch"
    assert plotting.folded_kind("cooldown", "cooldown-linear") == "cooldown"


def test_cosine_figure_has_no_folded_points(dataset):
    top = plotting.trajectory_figure(dataset, "cosine").axes[0]
    assert not [collection for collection in top.collections if str(collection.get_gid()).startswith("folded:")]
    assert "LR decay" in [text.get_text() for text in top.get_legend().get_texts()]


def test_token_axes_read_in_millions_without_an_offset(dataset):
    for figure in (plotting.trajectory_figure(dataset, "wsd"), plotting.loss_figure(dataset)):
        figure.canvas.draw()
        axis = figure.axes[1] if len(figure.axes) > 1 else figure.axes[0]
        assert "M tokens" in axis.get_xlabel()
        assert axis.xaxis.get_offset_text().get_text() == ""
        assert max(line.get_xdata().max() for line in axis.get_lines() if len(line.get_xdata())) == pytest.approx(
            0.04)
    assert plotting.token_unit(4e12) == (1e12, "T") and plotting.token_unit(2e9) == (1e9, "B")


def test_sharpness_lines_follow_training_order(dataset):
    figure = plotting.sharpness_figure(dataset)
    (line,) = [line for axis in figure.axes for line in axis.get_lines() if line.get_gid() == "rtn-w3g16|wsd"]
    assert list(line.get_xdata()) == [EIGENVALUES[step] for step in STEPS]  # by step, not sorted by value
    assert list(line.get_ydata()) == pytest.approx([100 * delta_q_loss("wsd", step, "rtn-w3g16") for step in STEPS])


def test_averaging_is_a_slope_chart_from_the_newest_checkpoint_to_its_average(dataset):
    figure = plotting.averaging_figure(dataset)
    assert len(figure.axes) == 2  # 3-bit and 4-bit
    for axis, quantization in zip(figure.axes, ("rtn-w3g16", "gptq-w4g16"), strict=True):
        assert list(axis.get_xticks()) == [0, 1]
        (line,) = axis.get_lines()
        assert list(line.get_xdata()) == [0, 1]
        assert list(line.get_ydata()) == pytest.approx(
            [100 * delta_q_loss("wsd", 40, quantization), 100 * delta_q_loss("wsd-lawa", 40, quantization)])


def test_accuracy_points_carry_standard_error_bars(dataset):
    relative, absolute = plotting.accuracy_figure(dataset).axes
    variances = [STDERR[task][0] ** 2 + STDERR[task][1] ** 2 for task in ACCURACY]
    expected_absolute = 100 * math.sqrt(sum(variances)) / 2
    expected_relative = 100 * math.sqrt(sum(variance / (1 - ACCURACY[task][0]) ** 2
                                            for variance, task in zip(variances, ACCURACY, strict=True))) / 2
    for axis, half_width in ((absolute, expected_absolute), (relative, expected_relative)):
        (container,) = [item for item in axis.containers if isinstance(item, ErrorbarContainer)]
        assert container.has_yerr
        bars = container.lines[2][0].get_segments()
        assert len(bars) == len(STEPS)  # one quantized model per wsd checkpoint
        assert all((bar[1][1] - bar[0][1]) / 2 == pytest.approx(half_width) for bar in bars)


def test_each_quantization_has_one_colour_in_every_figure(dataset):
    colors = plotting.quantization_colors([("rtn-w3g16", "rtn", 3), ("gptq-w4g16", "gptq", 4)])
    trajectory = {line.get_label(): line.get_color() for line in plotting.trajectory_figure(dataset, "wsd").axes[0]
                  .get_legend().get_lines()}
    sharpness = [line for axis in plotting.sharpness_figure(dataset).axes for line in axis.get_lines()]
    averaging = [line for axis in plotting.averaging_figure(dataset).axes for line in axis.get_lines()]
    accuracy = plotting.accuracy_figure(dataset).axes[0].containers[0].lines[0]
    for quantization, color in colors.items():
        assert matplotlib.colors.same_color(trajectory[quantization], color)
        assert all(matplotlib.colors.same_color(line.get_color(), color) for line in sharpness + averaging
                   if line.get_gid() and line.get_gid().startswith(quantization)
                   or line.get_label().startswith(quantization))
    assert matplotlib.colors.same_color(accuracy.get_color(), colors["rtn-w3g16"])


def test_quantization_colours_take_the_hue_from_the_method_and_the_shade_from_the_bits():
    colors = plotting.quantization_colors([("gptq-w4g32", "gptq", 4), ("gptq-w3g32", "gptq", 3),
                                           ("rtn-w3g32", "rtn", 3), ("new-w4", "newmethod", 4)])
    red, green, blue, _ = colors["gptq-w3g32"]
    assert blue > red and colors["rtn-w3g32"][0] > colors["rtn-w3g32"][2]  # GPTQ blue, RTN orange
    assert sum(colors["gptq-w3g32"][:3]) < sum(colors["gptq-w4g32"][:3])  # fewer bits darker
    assert len({tuple(color) for color in colors.values()}) == 4
    # a panel's subset never shifts a colour: the mapping depends on the whole list only
    assert plotting.quantization_colors([("gptq-w3g32", "gptq", 3), ("gptq-w4g32", "gptq", 4)]) == {
        name: colors[name] for name in ("gptq-w3g32", "gptq-w4g32")}


def test_every_figure_saves_and_an_empty_one_says_why(dataset, tmp_path):
    for name, draw in plotting.SUMMARY_FIGURES.items():
        plotting.save_figure(draw(dataset), tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    empty = plotting.trajectory_figure(dataset, "no-such-run")
    assert [text.get_text() for text in empty.texts] == ["no-such-run: no quantized checkpoint with a token count "
                                                         "to plot"]
