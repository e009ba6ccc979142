"""The paper's two central effects, measured on a results dataset across seeds (`qtraj science-check`).

1. LR decay: between the last checkpoint before the decay and the end of it, the fp validation loss falls while
   ΔQ L rises. The change over the stable stretch just before (same kind of checkpoint spacing, constant LR) is
   the control: training progress alone.
2. Weight averaging: LAWA lowers ΔQ L relative to the newest checkpoint it averages (at each run's end).

Everything is read through the canned views, so the numbers are the ones `qtraj query` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from statistics import mean

from qtraj.query import connect

DECAY_SQL = """
    SELECT e.run, e.quantization, e.bits, e.checkpoint_before, e.checkpoint_after, e.loss_fp_change,
           e.delta_q_loss_before, e.delta_q_loss_after, e.delta_q_loss_change,
           e.delta_q_loss_before - previous.delta_q_loss AS stable_change,
           printf('%s lr=%g wd=%g', trained.schedule, trained.peak_lr, trained.weight_decay) AS setting
    FROM decay_effect e JOIN runs trained ON trained.run = e.run
    JOIN results now ON now.run = e.run AND now.checkpoint = e.checkpoint_before
         AND now.quantization = e.quantization
    LEFT JOIN results previous ON previous.run = e.run AND previous.quantization = e.quantization
         AND previous.step = (SELECT max(step) FROM results p WHERE p.run = e.run AND p.quantization = e.quantization
                              AND p.step < now.step)
    ORDER BY e.quantization, e.run"""

AVERAGING_SQL = """
    SELECT average, a.run, quantization, bits, checkpoint, loss_fp_change, delta_q_loss_parent, delta_q_loss_average,
           delta_q_loss_change,
           coalesce(printf('%s lr=%g wd=%g', trained.schedule, trained.peak_lr, trained.weight_decay), a.run) AS setting
    FROM averaging_effect a LEFT JOIN runs trained ON trained.run = a.run
    WHERE step = (SELECT max(step) FROM averaging_effect b WHERE b.average = a.average)
    ORDER BY quantization, average"""


@dataclass(frozen=True)
class Effect:
    name: str
    quantization: str
    setting: str  # the runs' settings apart from the seed: effects are pooled over seeds only
    values: list[float]  # the effect per seed (run or average)
    holds: bool  # every seed shows it

    def summary(self) -> str:
        centre, half_range = mean(self.values), (max(self.values) - min(self.values)) / 2
        return f"{centre:+.4f} ± {half_range:.4f} (n={len(self.values)})"


def _rows(connection, sql: str) -> list[dict]:
    relation = connection.sql(sql)
    return [dict(zip(relation.columns, row, strict=True)) for row in relation.fetchall()]


def measure(results_dir: str | Path) -> tuple[list[dict], list[dict], list[Effect]]:
    """(decay rows, averaging rows, effects per quantization): an effect holds when every seed shows it."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    views = {row[0] for row in connection.execute("SHOW TABLES").fetchall()}
    decay = _rows(connection, DECAY_SQL) if {"decay_effect", "runs"} <= views else []
    averaging = _rows(connection, AVERAGING_SQL) if "averaging_effect" in views else []
    effects = []
    for quantization, setting in sorted({(row["quantization"], row["setting"]) for row in decay}):
        rows = [row for row in decay if (row["quantization"], row["setting"]) == (quantization, setting)]
        effects.append(Effect("decay: fp loss change", quantization, setting, [row["loss_fp_change"] for row in rows],
                              all(row["loss_fp_change"] < 0 for row in rows)))
        effects.append(Effect("decay: ΔQ L change", quantization, setting,
                              [row["delta_q_loss_change"] for row in rows],
                              all(row["delta_q_loss_change"] > 0 for row in rows)))
    for quantization, setting in sorted({(row["quantization"], row["setting"]) for row in averaging}):
        rows = [row for row in averaging if (row["quantization"], row["setting"]) == (quantization, setting)]
        effects.append(Effect("LAWA: ΔQ L change vs newest", quantization, setting,
                              [row["delta_q_loss_change"] for row in rows],
                              all(row["delta_q_loss_change"] < 0 for row in rows)))
    return decay, averaging, effects


def report(results_dir: str | Path) -> str:
    """The check as text: per-seed rows, then each effect with its mean ± half-range and whether it holds."""
    decay, averaging, effects = measure(results_dir)
    lines = ["LR decay (last checkpoint before it -> end of it); ΔQ L in %:",
             f"  {'run':<22}{'quantization':<14}{'loss change':>12}{'ΔQ L before':>13}{'ΔQ L after':>12}"
             f"{'stable-phase rise':>19}"]
    for row in decay:
        stable = "" if row["stable_change"] is None else f"{100 * row['stable_change']:+.3f}"
        lines.append(f"  {row['run']:<22}{row['quantization']:<14}{row['loss_fp_change']:>+12.4f}"
                     f"{100 * row['delta_q_loss_before']:>13.3f}{100 * row['delta_q_loss_after']:>12.3f}"
                     f"{stable:>19}")
    lines += ["Weight averaging (each average's last checkpoint vs the newest checkpoint it averages); ΔQ L in %:",
              f"  {'average':<22}{'quantization':<14}{'loss change':>12}{'ΔQ L newest':>13}{'ΔQ L average':>14}"]
    for row in averaging:
        lines.append(f"  {row['average']:<22}{row['quantization']:<14}{row['loss_fp_change']:>+12.4f}"
                     f"{100 * row['delta_q_loss_parent']:>13.3f}{100 * row['delta_q_loss_average']:>14.3f}")
    lines.append("Effects per setting (mean ± half-range over its seeds; holds = every seed shows it):")
    for effect in effects:
        lines.append(f"  {effect.name:<30}{effect.quantization:<14}{effect.setting:<26}{effect.summary():<32}"
                     f"{'holds' if effect.holds else 'DOES NOT HOLD'}")
    if not effects:
        lines.append("  nothing to check: the dataset has no run with a decay phase and no averages")
    return "\n".join(lines)
