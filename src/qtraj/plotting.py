"""Figures, drawn from the results dataset's Parquet files only (never from a job's memory).

Each `*_figure` function returns a matplotlib Figure and `save_figure` writes it (qtraj.steps calls both), so that
tests can check what a figure shows, not only that a file appeared.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on compute nodes
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from qtraj.query import connect  # noqa: E402

# Quantization colours, one mapping for every figure: the method picks the hue, the bit width the shade (fewer bits
# darker), so a config keeps its colour in every panel and every figure of a dataset.
METHOD_COLORMAPS = {"gptq": "Blues", "rtn": "Oranges", "awq": "Greens", "bnb": "Purples"}
SPARE_COLORMAPS = ("Reds", "Greys", "YlOrBr", "PuRd", "BuGn")  # for methods added later, in name order
RUN_MARKERS = "osD^v<>P*X"  # one per trajectory where a panel mixes trajectories
LR_COLOR = "tab:brown"  # not a method's hue

# Averages and cooldown branches are drawn as marked points in their parent's trajectory figure, not in one of their
# own: kind -> markers, one per trajectory of that kind in the figure (in name order).
FOLDED_MARKERS = {
    "average": ("D", "P", "X", "d"),
    "constant-LR branch": ("s", "p", "h"),
    "cooldown": ("v", "^", "<", ">"),
}
DECAY_SPAN_ID, DECAY_SHADE = "lr-decay", "0.9"  # the gid and colour of the shaded spans where the LR falls


def save_figure(figure: Figure, out_file: str | Path) -> None:
    figure.savefig(out_file, dpi=120)
    plt.close(figure)


def _rows(connection, sql: str, parameters: list | None = None) -> list[dict]:
    relation = connection.execute(sql, parameters or [])
    columns = [column[0] for column in relation.description]
    return [dict(zip(columns, row, strict=True)) for row in relation.fetchall()]


def _tables(connection) -> set[str]:
    return {row[0] for row in connection.execute("SHOW TABLES").fetchall()}


def _message_figure(message: str) -> Figure:
    """What a figure shows when the dataset has nothing for it: a sentence saying why."""
    figure = plt.figure(figsize=(7, 2))
    figure.text(0.5, 0.5, message, ha="center")
    return figure


def quantization_colors(quantizations: Iterable[tuple[str, str | None, int | None]]) -> dict[str, tuple]:
    """quantization -> RGBA colour, from (quantization, method, bits) triples: every figure passes all of the
    dataset's, never a panel's subset, so that the same config has the same colour everywhere."""
    by_method = defaultdict(list)
    # by method, then bits: the shades below run from the fewest bits (darkest) up
    for name, method, _ in sorted(set(quantizations), key=lambda entry: (entry[1] or "", entry[2] or 0, entry[0])):
        by_method[method or ""].append(name)
    spare = itertools.cycle(SPARE_COLORMAPS)
    colors = {}
    for method in sorted(by_method):
        colormap = matplotlib.colormaps[METHOD_COLORMAPS.get(method) or next(spare)]
        names = by_method[method]
        # from 0.9 (dark) to 0.45 (light): the light end of a sequential colormap is too pale on white
        shades = [0.7] if len(names) == 1 else [0.9 - 0.45 * index / (len(names) - 1) for index in range(len(names))]
        colors.update({name: colormap(shade) for name, shade in zip(names, shades, strict=True)})
    return colors


def _dataset_colors(connection) -> dict[str, tuple]:
    return quantization_colors(connection.execute("SELECT DISTINCT quantization, method, bits FROM results").fetchall())


def token_unit(max_tokens: float) -> tuple[float, str]:
    """(divisor, unit) for a token axis: millions, or billions / trillions for real pretraining runs."""
    for divisor, unit in ((1e12, "T"), (1e9, "B")):
        if max_tokens >= divisor:
            return divisor, unit
    return 1e6, "M"


def _token_axis(axis, unit: str) -> None:
    axis.set_xlabel(f"tokens seen ({unit} tokens)")
    axis.ticklabel_format(axis="x", style="plain", useOffset=False)


def decreasing_spans(schedule: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(start, end) of each stretch of a (tokens, lr) schedule, in token order, over which the LR falls: from the last
    point before the fall to its last point. Warmup (rising) and constant stretches are not shaded."""
    spans = []
    for (start, lr_before), (end, lr_after) in itertools.pairwise(schedule):
        if lr_after < lr_before and not math.isclose(lr_after, lr_before, rel_tol=1e-9):
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
    return spans


def figure_owner(parents: dict[str, str], run: str) -> str:
    """The trajectory whose figure draws `run`: itself, or for an average or cooldown (`parents`: derived run -> the
    run it derives from) its parent's owner, so that an average of a cooldown lands in the trained run's figure."""
    seen = {run}
    while run in parents and parents[run] not in seen:
        run = parents[run]
        seen.add(run)
    return run


def folded_kind(source: str, schedule: str | None) -> str:
    """A derived trajectory's kind (FOLDED_MARKERS): an average, or a cooldown branch that decays or keeps the LR."""
    if source == "averaged":
        return "average"
    return "constant-LR branch" if schedule == "constant" else "cooldown"


def folded_markers(kinds: dict[str, str]) -> dict[str, str]:
    """run -> marker for the folded trajectories of one figure (run -> kind): each kind its own markers, the next one
    for each further trajectory of the same kind."""
    markers, used = {}, defaultdict(int)
    for run in sorted(kinds):
        choices = FOLDED_MARKERS[kinds[run]]
        markers[run] = choices[used[kinds[run]] % len(choices)]
        used[kinds[run]] += 1
    return markers


def _shade_decay(axis, spans: list[tuple[float, float]], divisor: float) -> None:
    for start, end in spans:
        axis.axvspan(start / divisor, end / divisor, color=DECAY_SHADE, zorder=0, gid=DECAY_SPAN_ID)


def _lr_schedules(connection, run: str, folded: list[str]) -> tuple[list, list]:
    """(the run's own (tokens, lr) schedule, one per cooldown branch folded in): from the training log, or for
    checkpoints trained elsewhere the LR their family's schedule gives at each checkpoint."""
    logged = _rows(connection, "SELECT run, coalesce(parent_checkpoint, '') AS branch, tokens, lr FROM training_log "
                   "WHERE run IN (SELECT unnest(?)) AND tokens IS NOT NULL AND lr IS NOT NULL ORDER BY run, branch, "
                   "tokens", [[run, *folded]]) if "training_log" in _tables(connection) else []
    own = [(row["tokens"], row["lr"]) for row in logged if row["run"] == run]
    if not own:
        own = [(row["tokens"], row["lr"]) for row in _rows(
            connection, "SELECT tokens, lr FROM fp_evals WHERE run = ? AND tokens IS NOT NULL AND lr IS NOT NULL "
            "ORDER BY tokens", [run])]
    branches = defaultdict(list)
    for row in logged:
        if row["run"] != run:
            branches[row["run"], row["branch"]].append((row["tokens"], row["lr"]))
    return own, [branches[key] for key in sorted(branches)]


def _folded_trajectories(connection, run: str) -> dict[str, str]:
    """run -> kind of every average and cooldown drawn in `run`'s figure."""
    derived = _rows(connection, "SELECT DISTINCT run, source, parent_run FROM results "
                    "WHERE source IN ('averaged', 'cooldown') AND parent_run IS NOT NULL")
    parents = {row["run"]: row["parent_run"] for row in derived}
    schedules = dict(connection.execute("SELECT run, any_value(schedule) FROM training_log GROUP BY run").fetchall()) \
        if "training_log" in _tables(connection) else {}
    return {row["run"]: folded_kind(row["source"], schedules.get(row["run"])) for row in derived
            if row["run"] != run and figure_owner(parents, row["run"]) == run}


def trajectory_figure(results_dir: str | Path, run: str) -> Figure:
    """The paper's Figure 1 for one trajectory: ΔQ L against tokens (top) over the validation loss and the LR
    (bottom), the stretches where the LR falls shaded. Its averages and cooldown branches are marked points (a
    dotted line joins a branch to the checkpoint it branched from).

    Checkpoints without a token count (a family's final `main` soup, say) have no place on the axis and are
    left out, which the title says.
    """
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    kinds = _folded_trajectories(connection, run)
    members = [run, *sorted(kinds)]
    rows = _rows(connection, "SELECT run, checkpoint, tokens, quantization, delta_q_loss, parent_run, "
                 "parent_checkpoint FROM results WHERE run IN (SELECT unnest(?)) AND tokens IS NOT NULL "
                 "ORDER BY run, quantization, tokens", [members])
    if not rows:
        return _message_figure(f"{run}: no quantized checkpoint with a token count to plot")
    checkpoints = _rows(connection, "SELECT run, checkpoint, tokens, loss_fp, parent_run, parent_checkpoint "
                        "FROM fp_evals WHERE run IN (SELECT unnest(?)) AND tokens IS NOT NULL ORDER BY run, tokens",
                        [members])
    untimed = connection.execute("SELECT count(*) FROM fp_evals WHERE run IN (SELECT unnest(?)) AND tokens IS NULL",
                                 [members]).fetchone()[0]
    schedule, branch_schedules = _lr_schedules(connection, run, sorted(kinds))
    divisor, unit = token_unit(max(row["tokens"] for row in rows))
    spans = decreasing_spans(schedule)
    markers = folded_markers(kinds)

    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7.5, 6.5), height_ratios=[3, 2])
    colors = _dataset_colors(connection)
    handles = _draw_quantization_error(top, run, rows, colors, divisor)
    _draw_folded(top, rows, kinds, markers, divisor, lambda row: 100 * row["delta_q_loss"],
                 lambda row: colors[row["quantization"]], match_on=("quantization",))
    _draw_loss_and_lr(bottom, [row for row in checkpoints if row["run"] == run], schedule, branch_schedules, divisor)
    _draw_folded(bottom, checkpoints, kinds, markers, divisor, lambda row: row["loss_fp"], lambda row: "black",
                 match_on=())
    for axis in (top, bottom):
        _shade_decay(axis, spans, divisor)
    handles += [Line2D([], [], color="black", marker=markers[name], linestyle="none", markerfacecolor="white",
                       label=f"{name}: {kinds[name]}") for name in sorted(kinds)]
    handles += [Patch(color=DECAY_SHADE, label="LR decay")] if spans else []
    top.legend(handles=handles, fontsize=7, ncol=2)
    left_out = f" ({untimed} checkpoint(s) without a token count not shown)" if untimed else ""
    top.set_title(f"{run}: quantization error along training{left_out}", fontsize=10)
    _token_axis(bottom, unit)
    figure.tight_layout()
    return figure


def _draw_quantization_error(axis, run: str, rows: list[dict], colors: dict[str, tuple], divisor: float) -> list:
    """One ΔQ L line per quantization config of `run` (rows: the figure's); returns their legend entries."""
    handles = []
    for quantization in sorted({row["quantization"] for row in rows}, key=list(colors).index):
        own = [row for row in rows if row["quantization"] == quantization and row["run"] == run]
        axis.plot([row["tokens"] / divisor for row in own], [100 * row["delta_q_loss"] for row in own], marker="o",
                  markersize=3, color=colors[quantization])
        handles.append(Line2D([], [], color=colors[quantization], marker="o", markersize=3, label=quantization))
    axis.set_ylabel("ΔQ L  (L_q / L_fp − 1, %)")
    axis.grid(alpha=0.3)
    return handles


def _draw_loss_and_lr(axis, checkpoints: list[dict], schedule: list, branch_schedules: list[list],
                      divisor: float) -> None:
    """The run's full-precision validation loss, and on a second y axis its LR and each cooldown branch's."""
    axis.plot([row["tokens"] / divisor for row in checkpoints], [row["loss_fp"] for row in checkpoints],
              marker="o", markersize=3, color="black", label="validation loss (fp)")
    axis.set_ylabel("validation loss (nats)")
    axis.grid(alpha=0.3)
    if not schedule and not any(branch_schedules):
        return
    lr_axis = axis.twinx()
    lr_axis.plot([tokens / divisor for tokens, _ in schedule], [lr for _, lr in schedule], color=LR_COLOR, alpha=0.8)
    for branch in branch_schedules:
        lr_axis.plot([tokens / divisor for tokens, _ in branch], [lr for _, lr in branch], color=LR_COLOR, alpha=0.8,
                     linestyle="--", linewidth=1)
    lr_axis.set_ylim(bottom=0)  # an LR is never negative; a single constant value would otherwise centre on it
    lr_axis.set_ylabel("learning rate", color=LR_COLOR)


def _draw_folded(axis, rows: list[dict], kinds: dict[str, str], markers: dict[str, str], divisor: float,
                 value, color, match_on: tuple[str, ...]) -> None:
    """The folded trajectories' points (`value` of each row) on `axis`, and a dotted line from each cooldown branch's
    end back to the checkpoint it branched from (rows: the figure's; a branch point also matches on `match_on`)."""
    by_checkpoint = {(row["run"], row["checkpoint"], *(row[column] for column in match_on)): row for row in rows}
    for row in rows:
        if row["run"] not in kinds:
            continue
        branch_point = by_checkpoint.get((row["parent_run"], row["parent_checkpoint"],
                                          *(row[column] for column in match_on)))
        if kinds[row["run"]] != "average" and branch_point is not None:
            axis.plot([branch_point["tokens"] / divisor, row["tokens"] / divisor], [value(branch_point), value(row)],
                      color=color(row), linestyle=":", linewidth=1, alpha=0.7)
        axis.scatter([row["tokens"] / divisor], [value(row)], marker=markers[row["run"]], s=36, color=color(row),
                     edgecolors="black", linewidths=0.6, zorder=3, gid=f"folded:{row['run']}")


def sharpness_figure(results_dir: str | Path) -> Figure:
    """ΔQ L against the top Hessian eigenvalue of the checkpoint, one panel per bit width, colour per quantization
    config, marker per trajectory; a trajectory's points are joined in training order (by step), its first hollow."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = _rows(connection, "SELECT r.run, r.quantization, r.bits, r.step, s.top_eigenvalue, r.delta_q_loss "
                 "FROM results r JOIN sharpness s USING (run, checkpoint) ORDER BY r.bits, r.quantization, r.run, "
                 "r.step") if "sharpness" in _tables(connection) else []
    if not rows:
        return _message_figure("no sharpness rows yet (config `sharpness`)")
    colors = _dataset_colors(connection)
    figure, panels = _bits_panels(rows)
    for axis, quantization, run, marker, series in _panel_series(rows, panels):
        axis.plot([row["top_eigenvalue"] for row in series], [100 * row["delta_q_loss"] for row in series],
                  marker=marker, linestyle="-", alpha=0.8, color=colors[quantization],
                  label=f"{quantization} · {run}", gid=f"{quantization}|{run}")
        # the first checkpoint hollow: where the line starts, so its direction reads
        axis.plot([series[0]["top_eigenvalue"]], [100 * series[0]["delta_q_loss"]], marker=marker,
                  markerfacecolor="white", color=colors[quantization], zorder=3)
    return _finish_bits_panels(figure, panels, "top Hessian eigenvalue of the validation loss")


def _bits_panels(rows: list[dict], width: float = 4.2, height: float = 3.8):
    """A figure with one panel per bit width of `rows`: (figure, [(axis, bits)])."""
    bits = sorted({row["bits"] for row in rows})
    figure, axes = plt.subplots(1, len(bits), figsize=(width * len(bits), height), squeeze=False)
    return figure, list(zip(axes[0], bits, strict=True))


def _panel_series(rows: list[dict], panels):
    """(axis, quantization, run, marker, rows in their order) of every series in per-bit-width panels: one per
    quantization of the panel's bit width and trajectory that has rows; markers by trajectory, alike in all panels."""
    runs = sorted({row["run"] for row in rows})
    for axis, width in panels:
        for quantization in sorted({row["quantization"] for row in rows if row["bits"] == width}):
            for run in runs:
                series = [row for row in rows if row["quantization"] == quantization and row["run"] == run]
                if series:
                    yield axis, quantization, run, RUN_MARKERS[runs.index(run) % len(RUN_MARKERS)], series


def _finish_bits_panels(figure: Figure, panels, xlabel: str | None) -> Figure:
    """Titles, x labels, grids and legends of per-bit-width ΔQ L panels (from _bits_panels)."""
    for axis, width in panels:
        axis.set_title(f"{width}-bit")
        if xlabel:
            axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    panels[0][0].set_ylabel("ΔQ L (%)")
    figure.tight_layout()
    return figure


def loss_figure(results_dir: str | Path) -> Figure:
    """Full-precision validation loss against tokens seen, one line per trajectory (averages dashed)."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = _rows(connection, "SELECT run, source, tokens, loss_fp FROM fp_evals WHERE tokens IS NOT NULL "
                 "ORDER BY run, tokens")
    if not rows:
        return _message_figure("no checkpoint with a token count to plot")
    divisor, unit = token_unit(max(row["tokens"] for row in rows))
    figure, axis = plt.subplots(figsize=(7, 4.2))
    styles = {"averaged": "--", "cooldown": ":"}
    for index, run in enumerate(sorted({row["run"] for row in rows})):
        series = [row for row in rows if row["run"] == run]
        # a trajectory of one checkpoint (an average at the end only) is a point: draw it large enough to see
        axis.plot([row["tokens"] / divisor for row in series], [row["loss_fp"] for row in series],
                  marker="o" if len(series) > 1 else "D", markersize=3 if len(series) > 1 else 7,
                  linestyle=styles.get(series[0]["source"], "-"), color=f"C{index % 10}", label=run)
    _token_axis(axis, unit)
    axis.set_ylabel("validation loss, full precision (nats)")
    axis.set_title("Validation loss along training", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    return figure


def lr_figure(results_dir: str | Path) -> Figure:
    """ΔQ L against the learning rate at the checkpoint (the paper: quantization error grows as the LR is decayed),
    one panel per bit width, colour per quantization config, marker per trajectory."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = _rows(connection, "SELECT run, quantization, bits, lr, delta_q_loss FROM results WHERE lr IS NOT NULL "
                 "ORDER BY bits, quantization, run, lr")
    if not rows:
        return _message_figure("no checkpoint with a known learning rate")
    colors = _dataset_colors(connection)
    figure, panels = _bits_panels(rows)
    for axis, quantization, run, marker, series in _panel_series(rows, panels):
        axis.scatter([row["lr"] for row in series], [100 * row["delta_q_loss"] for row in series], s=22,
                     alpha=0.8, marker=marker, color=colors[quantization], label=f"{quantization} · {run}")
    return _finish_bits_panels(figure, panels, "learning rate at the checkpoint")


def averaging_figure(results_dir: str | Path) -> Figure:
    """Weight averaging against none, as a slope chart: per bit width, one line per averaged checkpoint and
    quantization config from the ΔQ L of the newest checkpoint it averages (left) to the average's own (right);
    colour per quantization config, marker per trajectory averaged (a seed)."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = _rows(connection, "SELECT average, checkpoint, run, quantization, bits, delta_q_loss_parent, "
                 "delta_q_loss_average FROM averaging_effect ORDER BY bits, quantization, run, average, checkpoint") \
        if "averaging_effect" in _tables(connection) else []
    if not rows:
        return _message_figure("no averaged checkpoint (config `averages`) to compare")
    colors = _dataset_colors(connection)
    runs = sorted({row["run"] for row in rows})
    figure, panels = _bits_panels(rows, width=3.6)
    for axis, width in panels:
        labelled = set()
        for row in (row for row in rows if row["bits"] == width):
            label = f"{row['quantization']} · {row['run']}"
            axis.plot([0, 1], [100 * row["delta_q_loss_parent"], 100 * row["delta_q_loss_average"]],
                      color=colors[row["quantization"]], marker=RUN_MARKERS[runs.index(row["run"]) % len(RUN_MARKERS)],
                      markersize=5, alpha=0.8, label=None if label in labelled else label)
            labelled.add(label)
        axis.set_xticks([0, 1], ["newest checkpoint\naveraged", "its average"])
        axis.set_xlim(-0.35, 1.35)
    return _finish_bits_panels(figure, panels, None)


# One point per quantized model: view accuracy_summary (its headline metric per task and its standard errors) beside
# the model's ΔQ L
ACCURACY_SQL = """
    SELECT s.run, s.checkpoint, s.quantization, s.bits, r.delta_q_loss, s.mean_rel_drop, s.mean_abs_drop,
           s.mean_abs_drop_stderr, s.mean_rel_drop_stderr
    FROM accuracy_summary AS s JOIN results AS r USING (run, checkpoint, quantization)
    WHERE s.mean_rel_drop IS NOT NULL
    ORDER BY s.bits, s.quantization, s.run, s.checkpoint"""


def accuracy_figure(results_dir: str | Path) -> Figure:
    """Loss degradation (ΔQ L) against accuracy degradation (the relative increase of the task error rate, and the
    absolute drop, averaged over tasks), one point per quantized model with ±1 standard error; colour per
    quantization config."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = _rows(connection, ACCURACY_SQL) if "accuracy_summary" in _tables(connection) else []
    if not rows:
        return _message_figure("no task accuracy (config `accuracy`) to compare")
    colors = _dataset_colors(connection)
    figure, (relative, absolute) = plt.subplots(1, 2, figsize=(9.5, 4))
    for quantization in sorted({row["quantization"] for row in rows}, key=list(colors).index):
        series = [row for row in rows if row["quantization"] == quantization]
        style = {"fmt": "o", "markersize": 4, "color": colors[quantization], "alpha": 0.8, "elinewidth": 0.8,
                 "capsize": 2, "label": quantization}
        x = [100 * row["delta_q_loss"] for row in series]
        relative.errorbar(x, [100 * row["mean_rel_drop"] for row in series],
                          yerr=[100 * _or_nan(row["mean_rel_drop_stderr"]) for row in series], **style)
        absolute.errorbar(x, [100 * row["mean_abs_drop"] for row in series],
                          yerr=[100 * _or_nan(row["mean_abs_drop_stderr"]) for row in series], **style)
    relative.set_ylabel("relative accuracy drop (%)\n(acc_fp − acc_q) / (1 − acc_fp)")
    absolute.set_ylabel("absolute accuracy drop (points)")
    for axis in (relative, absolute):
        axis.set_xlabel("ΔQ L (%)")
        axis.axhline(0, color="0.6", linewidth=0.8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return figure


def _or_nan(value: float | None) -> float:
    """A missing standard error (a task lm-eval gives none for) as NaN: that point is drawn without a bar."""
    return math.nan if value is None else value


SIZE_MARKERS = "os^D"  # one per model size in the decay map


def decay_map_figure(results_dir: str | Path) -> Figure:
    """The decay map (config/experiments/decay-map.yaml): the LR decay's effect beyond a constant LR at equal tokens
    against tokens per parameter (log scale), one panel for the fp loss and one per bit width, colour per
    quantization, marker per model size; filled where Holm's correction keeps the effect (adjusted p < 0.05)."""
    from qtraj.science import OPPOSITE, SUPPORTED, decay_map_cells

    points = decay_map_cells(results_dir)
    if not points:
        return _message_figure("no decayed run with a constant-LR control and a known model size (a `sweeps:` grid)")
    connection = connect(results_dir, read_only=False)
    colors = {**_dataset_colors(connection), "fp": (0.2, 0.2, 0.2, 1.0)}
    sizes = sorted({point["parameters"] for point in points})
    widths = sorted({point["bits"] for point in points if point["bits"] is not None})
    panels = [("fp loss", None)] + [(f"{width}-bit", width) for width in widths]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4), squeeze=False)
    for axis, (title, bits) in zip(axes[0], panels, strict=True):
        shown = [point for point in points if point["bits"] == bits]  # bits None: the fp loss
        for (quantization, parameters), group in itertools.groupby(
                shown, key=lambda point: (point["quantization"], point["parameters"])):
            series = list(group)
            marker = SIZE_MARKERS[sizes.index(parameters) % len(SIZE_MARKERS)]
            color = colors.get(quantization, (0.5, 0.5, 0.5, 1.0))
            axis.errorbar([p["tokens_per_parameter"] for p in series], [p["mean"] for p in series],
                          yerr=[p["half_width"] for p in series], color=color, marker=marker, markerfacecolor="white",
                          capsize=2, linewidth=1, alpha=0.8, label=f"{quantization}, {parameters:,} params")
            for point in series:
                kept = point["verdict"] in (SUPPORTED, OPPOSITE)  # the check's rule: Holm-adjusted p below ALPHA
                axis.plot(point["tokens_per_parameter"], point["mean"], marker=marker, color=color, markersize=6,
                          markerfacecolor=color if kept else "white", zorder=3)
        axis.axhline(0, color="0.5", linewidth=0.8)
        axis.set_xscale("log")
        # the grid's lengths as plain ticks (2, 10, 40), not log decades with their crowded minor labels
        axis.set_xticks(sorted({float(f"{point['tokens_per_parameter']:.2g}") for point in points}))
        axis.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_title(title)
        axis.set_xlabel("tokens per parameter")
        axis.set_ylabel("decayed − constant LR (nats)" if bits is None else "decayed − constant LR, ΔQ L (pp)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    figure.suptitle("LR decay beyond a constant LR at equal tokens: mean ± 95% CI over seeds "
                    "(filled: Holm-adjusted p < 0.05)", fontsize=9)
    figure.tight_layout()
    return figure


# name (qtraj.config.SUMMARY_FIGURE_NEEDS: the list, and when a config has data for each) -> function drawing
# results/figures/<name>.png from the whole dataset, besides one trajectory figure per trained run, family or local
# folder (its averages and cooldowns drawn in it)
SUMMARY_FIGURES = {"loss": loss_figure, "lr": lr_figure, "sharpness": sharpness_figure,
                   "averaging": averaging_figure, "accuracy": accuracy_figure, "decay-map": decay_map_figure}
