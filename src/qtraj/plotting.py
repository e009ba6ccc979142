"""Figures, drawn from the results dataset's Parquet files only (never from a job's memory)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on compute nodes
import matplotlib.pyplot as plt  # noqa: E402

from qtraj.query import connect  # noqa: E402

BITS_COLORS = {2: "tab:purple", 3: "tab:red", 4: "tab:blue", 8: "tab:green"}
METHOD_STYLES = ["-", "--", ":", "-."]


def _shade_decay(axis, checkpoints: list[dict]) -> None:
    """Shade the span of checkpoints saved while the LR was decaying."""
    decay_tokens = [row["tokens"] for row in checkpoints if row["phase"] == "decay"]
    if decay_tokens:
        earlier = [row["tokens"] for row in checkpoints if row["tokens"] < min(decay_tokens)]
        start = max(earlier) if earlier else 0
        axis.axvspan(start, max(decay_tokens), color="0.9", zorder=0, label="LR decay")


def plot_trajectory(results_dir: str | Path, run: str, out_file: str | Path) -> None:
    """The paper's Figure 1 for one run: ΔQ L vs tokens (top) over validation loss and LR (bottom).

    Checkpoints without a token count (a family's final `main` soup, say) have no place on the axis and are
    left out, which the title says.
    """
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = connection.execute(
        "SELECT method, bits, quantization, tokens, delta_q_loss FROM results WHERE run = ? AND tokens IS NOT NULL "
        "ORDER BY method, bits, tokens", [run]).fetchall()
    checkpoints = [dict(zip(("tokens", "loss_fp", "phase", "lr"), row, strict=True)) for row in connection.execute(
        "SELECT tokens, loss_fp, phase, lr FROM fp_evals WHERE run = ? AND tokens IS NOT NULL ORDER BY tokens",
        [run]).fetchall()]
    untimed = connection.execute("SELECT count(*) FROM fp_evals WHERE run = ? AND tokens IS NULL", [run]).fetchone()[0]
    # one LR line per branch: a cooldown trajectory's branches overlap in tokens
    logged = connection.execute(
        "SELECT coalesce(parent_checkpoint, ''), tokens, lr FROM training_log WHERE run = ? ORDER BY 1, tokens",
        [run]).fetchall() if "training_log" in _tables(connection) else []
    schedules = [[(row[1], row[2]) for row in logged if row[0] == branch] for branch in sorted({r[0] for r in logged})]
    if not schedules:  # a hub family: the LR its schedule gives at each checkpoint
        schedules = [[(c["tokens"], c["lr"]) for c in checkpoints if c["lr"] is not None]]
    if not rows:
        figure = plt.figure(figsize=(7, 2))
        figure.text(0.5, 0.5, f"{run}: no quantized checkpoint with a token count to plot", ha="center")
        figure.savefig(out_file, dpi=120)
        plt.close(figure)
        return

    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6.5), height_ratios=[3, 2])
    methods = sorted({row[0] for row in rows})
    for quantization in sorted({row[2] for row in rows}):
        series = [row for row in rows if row[2] == quantization]
        method, bits = series[0][0], series[0][1]
        top.plot([row[3] for row in series], [100 * row[4] for row in series], marker="o", markersize=3,
                 color=BITS_COLORS.get(bits, "black"), linestyle=METHOD_STYLES[methods.index(method) % 4],
                 label=quantization)
    top.set_ylabel("ΔQ L  (L_q / L_fp − 1, %)")
    left_out = f" ({untimed} checkpoint(s) without a token count not shown)" if untimed else ""
    top.set_title(f"{run}: quantization error along training{left_out}", fontsize=10)
    _shade_decay(top, checkpoints)
    top.legend(fontsize=8, ncol=2)
    top.grid(alpha=0.3)

    bottom.plot([c["tokens"] for c in checkpoints], [c["loss_fp"] for c in checkpoints], marker="o",
                markersize=3, color="black", label="validation loss (fp)")
    bottom.set_ylabel("validation loss (nats)")
    bottom.set_xlabel("tokens seen")
    _shade_decay(bottom, checkpoints)
    bottom.grid(alpha=0.3)
    if any(schedules):
        lr_axis = bottom.twinx()
        for schedule in schedules:
            lr_axis.plot([row[0] for row in schedule], [row[1] for row in schedule], color="tab:orange", alpha=0.7)
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)


def plot_sharpness(results_dir: str | Path, out_file: str | Path) -> None:
    """ΔQ L against the top Hessian eigenvalue of the checkpoint, one panel per bit width, colour per quantization
    config, marker per trajectory."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    tables = {row[0] for row in connection.execute("SHOW TABLES").fetchall()}
    rows = connection.execute(
        "SELECT r.run, r.quantization, r.bits, s.top_eigenvalue, r.delta_q_loss FROM results r "
        "JOIN sharpness s USING (run, checkpoint) ORDER BY r.bits, r.quantization, r.run, s.top_eigenvalue"
    ).fetchall() if "sharpness" in tables else []
    bits = sorted({row[2] for row in rows}) or [None]
    figure, axes = plt.subplots(1, len(bits), figsize=(4.2 * len(bits), 3.8), squeeze=False)
    runs = sorted({row[0] for row in rows})
    markers = "osD^v<>P*X"
    for axis, width in zip(axes[0], bits, strict=True):
        for index, quantization in enumerate(sorted({row[1] for row in rows if row[2] == width})):
            for run in runs:
                series = [row for row in rows if row[1] == quantization and row[0] == run]
                if series:
                    axis.plot([row[3] for row in series], [100 * row[4] for row in series],
                              marker=markers[runs.index(run) % len(markers)], linestyle="-", alpha=0.8,
                              color=f"C{index % 10}", label=f"{quantization} · {run}")
        axis.set_title(f"{width}-bit" if width else "no sharpness rows yet")
        axis.set_xlabel("top Hessian eigenvalue of the validation loss")
        axis.grid(alpha=0.3)
        if rows:
            axis.legend(fontsize=7)
    axes[0][0].set_ylabel("ΔQ L (%)")
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)


def _tables(connection) -> set[str]:
    return {row[0] for row in connection.execute("SHOW TABLES").fetchall()}


def _save(figure, out_file: str | Path) -> None:
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)


def _empty(out_file: str | Path, message: str) -> None:
    figure = plt.figure(figsize=(7, 2))
    figure.text(0.5, 0.5, message, ha="center")
    figure.savefig(out_file, dpi=120)
    plt.close(figure)


def _bits_panels(rows: list[tuple], bits_index: int, width: float = 4.2, height: float = 3.8):
    bits = sorted({row[bits_index] for row in rows})
    figure, axes = plt.subplots(1, len(bits), figsize=(width * len(bits), height), squeeze=False)
    return figure, list(zip(axes[0], bits, strict=True))


def _finish_bits_panels(figure, panels, xlabel: str, out_file: str | Path) -> None:
    """Titles, x labels, grids and legends of per-bit-width ΔQ L panels (from _bits_panels), then save."""
    for axis, width in panels:
        axis.set_title(f"{width}-bit")
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    panels[0][0].set_ylabel("ΔQ L (%)")
    _save(figure, out_file)


def plot_loss(results_dir: str | Path, out_file: str | Path) -> None:
    """Full-precision validation loss against tokens seen, one line per trajectory (averages dashed)."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = connection.execute(
        "SELECT run, source, tokens, loss_fp FROM fp_evals WHERE tokens IS NOT NULL ORDER BY run, tokens").fetchall()
    if not rows:
        _empty(out_file, "no checkpoint with a token count to plot")
        return
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for index, run in enumerate(sorted({row[0] for row in rows})):
        series = [row for row in rows if row[0] == run]
        styles = {"averaged": "--", "cooldown": ":"}
        # a trajectory of one checkpoint (an average at the end only) is a point: draw it large enough to see
        axis.plot([row[2] for row in series], [row[3] for row in series], marker="o" if len(series) > 1 else "D",
                  markersize=3 if len(series) > 1 else 7, linestyle=styles.get(series[0][1], "-"),
                  color=f"C{index % 10}", label=run)
    axis.set_xlabel("tokens seen")
    axis.set_ylabel("validation loss, full precision (nats)")
    axis.set_title("Validation loss along training", fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    _save(figure, out_file)


def plot_lr(results_dir: str | Path, out_file: str | Path) -> None:
    """ΔQ L against the learning rate at the checkpoint (the paper: quantization error grows as the LR is decayed),
    one panel per bit width, colour per method, marker per trajectory."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = connection.execute(
        "SELECT run, method, bits, lr, delta_q_loss FROM results WHERE lr IS NOT NULL "
        "ORDER BY bits, method, run, lr").fetchall()
    if not rows:
        _empty(out_file, "no checkpoint with a known learning rate")
        return
    figure, panels = _bits_panels(rows, 2)
    runs = sorted({row[0] for row in rows})
    markers = "osD^v<>P*X"
    for axis, width in panels:
        methods = sorted({row[1] for row in rows if row[2] == width})
        for method in methods:
            for run in runs:
                series = [row for row in rows if row[2] == width and row[1] == method and row[0] == run]
                if series:
                    axis.scatter([row[3] for row in series], [100 * row[4] for row in series], s=22, alpha=0.8,
                                 marker=markers[runs.index(run) % len(markers)], color=f"C{methods.index(method)}",
                                 label=f"{method} · {run}")
    _finish_bits_panels(figure, panels, "learning rate at the checkpoint", out_file)


def plot_averaging(results_dir: str | Path, out_file: str | Path) -> None:
    """Weight averaging against none: ΔQ L of each averaged checkpoint and of the newest checkpoint it averages,
    against tokens; one panel per bit width, colour per quantization config, solid line / filled marker = no
    averaging, dashed / hollow = averaged, marker shape per average."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = connection.execute(
        "SELECT average, run, quantization, bits, tokens, delta_q_loss_parent, delta_q_loss_average "
        "FROM averaging_effect WHERE tokens IS NOT NULL ORDER BY bits, quantization, average, tokens").fetchall() \
        if "averaging_effect" in _tables(connection) else []
    if not rows:
        _empty(out_file, "no averaged checkpoint (config `averages`) to compare")
        return
    figure, panels = _bits_panels(rows, 3)
    for axis, width in panels:
        quantizations = sorted({row[2] for row in rows if row[3] == width})
        averages = sorted({row[0] for row in rows if row[3] == width})
        for quantization in quantizations:
            for number, average in enumerate(averages):
                series = [row for row in rows if row[2] == quantization and row[0] == average]
                if not series:
                    continue
                color, marker = f"C{quantizations.index(quantization) % 10}", "osD^v"[number % 5]
                tokens, size = [row[4] for row in series], 3 if len(series) > 1 else 7
                axis.plot(tokens, [100 * row[5] for row in series], color=color, marker=marker, markersize=size,
                          linestyle="-", label=f"{quantization} · {series[0][1]}")
                axis.plot(tokens, [100 * row[6] for row in series], color=color, marker=marker, markersize=size,
                          linestyle="--", markerfacecolor="none", label=f"{quantization} · {average}")
    _finish_bits_panels(figure, panels, "tokens seen (newest checkpoint averaged)", out_file)


def plot_accuracy(results_dir: str | Path, out_file: str | Path) -> None:
    """Loss degradation (ΔQ L) against accuracy degradation (relative increase of the task error rate, averaged
    over tasks), one point per quantized model; colour = bits, marker = method."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    rows = connection.execute(
        "SELECT r.method, r.bits, r.delta_q_loss, a.mean_rel_drop, a.mean_abs_drop FROM results r "
        "JOIN accuracy_summary a USING (run, checkpoint, quantization) WHERE a.mean_rel_drop IS NOT NULL "
        "ORDER BY r.bits, r.method").fetchall() \
        if "accuracy_summary" in _tables(connection) else []
    if not rows:
        _empty(out_file, "no task accuracy (config `accuracy`) to compare")
        return
    figure, (relative, absolute) = plt.subplots(1, 2, figsize=(9.5, 4))
    methods = sorted({row[0] for row in rows})
    for method in methods:
        for width in sorted({row[1] for row in rows}):
            series = [row for row in rows if row[0] == method and row[1] == width]
            if not series:
                continue
            style = {"marker": "osD^v"[methods.index(method) % 5], "color": BITS_COLORS.get(width, "black"),
                     "alpha": 0.75, "s": 22, "label": f"{method} {width}-bit"}
            relative.scatter([100 * row[2] for row in series], [100 * row[3] for row in series], **style)
            absolute.scatter([100 * row[2] for row in series], [100 * row[4] for row in series], **style)
    relative.set_ylabel("relative accuracy drop (%)\n(acc_fp − acc_q) / (1 − acc_fp)")
    absolute.set_ylabel("absolute accuracy drop (points)")
    for axis in (relative, absolute):
        axis.set_xlabel("ΔQ L (%)")
        axis.axhline(0, color="0.6", linewidth=0.8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    _save(figure, out_file)


# name (qtraj.config.SUMMARY_FIGURE_NEEDS: the list, and when a config has data for each) -> function drawing
# results/figures/<name>.png from the whole dataset, besides one trajectory figure per run
SUMMARY_FIGURES = {"loss": plot_loss, "lr": plot_lr, "sharpness": plot_sharpness, "averaging": plot_averaging,
                   "accuracy": plot_accuracy}
