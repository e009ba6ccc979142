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
    connection = connect(results_dir)
    rows = connection.execute(
        "SELECT method, bits, quantization, tokens, delta_q_loss FROM results WHERE run = ? AND tokens IS NOT NULL "
        "ORDER BY method, bits, tokens", [run]).fetchall()
    checkpoints = [dict(zip(("tokens", "loss_fp", "phase", "lr"), row, strict=True)) for row in connection.execute(
        "SELECT tokens, loss_fp, phase, lr FROM fp_evals WHERE run = ? AND tokens IS NOT NULL ORDER BY tokens",
        [run]).fetchall()]
    untimed = connection.execute("SELECT count(*) FROM fp_evals WHERE run = ? AND tokens IS NULL", [run]).fetchone()[0]
    schedule = connection.execute(
        "SELECT tokens, lr FROM training_log WHERE run = ? ORDER BY tokens", [run]).fetchall() \
        if "training_log" in {row[0] for row in connection.execute("SHOW TABLES").fetchall()} else []
    if not schedule:  # a hub family: the LR its schedule gives at each checkpoint
        schedule = [(c["tokens"], c["lr"]) for c in checkpoints if c["lr"] is not None]
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
    if schedule:
        lr_axis = bottom.twinx()
        lr_axis.plot([row[0] for row in schedule], [row[1] for row in schedule], color="tab:orange", alpha=0.7)
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)


def plot_sharpness(results_dir: str | Path, out_file: str | Path) -> None:
    """ΔQ L against the top Hessian eigenvalue of the checkpoint, one panel per bit width, every trajectory."""
    connection = connect(results_dir)
    tables = {row[0] for row in connection.execute("SHOW TABLES").fetchall()}
    rows = connection.execute(
        "SELECT r.run, r.method, r.bits, s.top_eigenvalue, r.delta_q_loss FROM results r "
        "JOIN sharpness s USING (run, checkpoint) ORDER BY r.bits, r.method, r.run, s.top_eigenvalue"
    ).fetchall() if "sharpness" in tables else []
    bits = sorted({row[2] for row in rows}) or [None]
    figure, axes = plt.subplots(1, len(bits), figsize=(4.2 * len(bits), 3.8), squeeze=False)
    runs = sorted({row[0] for row in rows})
    markers = "osD^v<>P*X"
    for axis, width in zip(axes[0], bits, strict=True):
        for index, method in enumerate(sorted({row[1] for row in rows if row[2] == width})):
            for run in runs:
                series = [row for row in rows if row[2] == width and row[1] == method and row[0] == run]
                if series:
                    axis.plot([row[3] for row in series], [100 * row[4] for row in series],
                              marker=markers[runs.index(run) % len(markers)], linestyle="-", alpha=0.8,
                              color=f"C{index}", label=f"{method} · {run}")
        axis.set_title(f"{width}-bit" if width else "no sharpness rows yet")
        axis.set_xlabel("top Hessian eigenvalue of the validation loss")
        axis.grid(alpha=0.3)
        if rows:
            axis.legend(fontsize=7)
    axes[0][0].set_ylabel("ΔQ L (%)")
    figure.tight_layout()
    figure.savefig(out_file, dpi=120)
    plt.close(figure)
