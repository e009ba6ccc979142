"""The paper's central effects, measured on a results dataset across seeds (`qtraj science-check`).

Per quantization and setting (a run's schedule, peak LR, weight decay, training tokens and model size: only seeds are
pooled), four comparisons, each as its mean over seeds with a 95% Student-t confidence interval:

1. control: a decayed run at its last checkpoint against the constant-LR run of the same seed, peak LR and weight
   decay at the same step, so after the same tokens (view `control_effect`): trained from scratch, or the decayed
   run's own `constant` branch from its decay start (the same run without the decay). The paper: the decay lowers the fp
   loss and raises ΔQ L beyond what training at a constant LR does.
2. stable: ΔQ L's change over the decayed run's stable phase (its first stable checkpoint → its last one before
   the decay): training progress alone at a constant LR, shown to compare the decay's effect with (no expected
   direction).
3. decay: the last checkpoint before the decay → the end of the decay, within each run (view `decay_effect`).
4. lawa: a LAWA average against the newest checkpoint it averages, at the average's last step
   (view `averaging_effect`). The paper: averaging lowers ΔQ L.

An effect is "supported" when its CI excludes zero in the paper's direction, "opposite" when it excludes zero the
other way, and "not resolved" otherwise, also when a single seed gives no CI. ΔQ L is shown in %, its differences
in percentage points (pp), the fp loss and its differences in nats. Everything is read through the canned views, so
the numbers are the ones `qtraj query` shows.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from statistics import fmean, stdev

import numpy as np

from qtraj.query import connect, is_control_of
from qtraj.texttable import text_table

DELTA_Q_LOSS, LOSS_FP = "ΔQ L", "fp loss"
FP = "fp"  # the quantization column of fp-loss effects: one fp model, whatever it is quantized with
SUPPORTED, NOT_RESOLVED, OPPOSITE, RISES, FALLS = "supported", "not resolved", "opposite", "rises", "falls"

# the 97.5% quantile of Student's t by degrees of freedom, for when scipy is not importable (it is installed with
# scikit-learn, which lm-eval needs); beyond the table, the Cornish-Fisher expansion (error < 1e-5 from 30 on)
T_975 = (12.706204736174705, 4.302652729749464, 3.182446305284263, 2.7764451051977987, 2.570581835636314,
         2.4469118511449692, 2.3646242515927844, 2.306004135204166, 2.2621571628540993, 2.2281388519649385,
         2.200985160082949, 2.1788128296634177, 2.1603686564610127, 2.1447866879169273, 2.131449545559323,
         2.1199052992210112, 2.1098155778331806, 2.10092204024096, 2.093024054408263, 2.0859634472658364,
         2.0796138447276626, 2.0738730679040147, 2.0686576104190406, 2.0638985616280205, 2.059538552753294,
         2.055529438642871, 2.0518305164802833, 2.048407141795244, 2.045229642132703, 2.0422724563012373)


def t_critical(degrees_of_freedom: int) -> float:
    """The two-sided 95% critical value of Student's t: the 97.5% quantile."""
    try:
        from scipy.stats import t
    except ImportError:
        if degrees_of_freedom <= len(T_975):
            return T_975[degrees_of_freedom - 1]
        z, nu = 1.959963984540054, degrees_of_freedom
        return (z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3))
    return float(t.ppf(0.975, degrees_of_freedom))


def two_sided_p(differences: list[float]) -> float | None:
    """The two-sided p-value of the one-sample t-test of `differences` against 0 (the same Student t the CI uses);
    None with fewer than two, or without scipy (the CI and verdict do not need it)."""
    if len(differences) < 2:
        return None
    spread = stdev(differences)
    if spread == 0:
        return 0.0 if fmean(differences) else 1.0
    try:
        from scipy.stats import t
    except ImportError:
        return None
    statistic = fmean(differences) / (spread / math.sqrt(len(differences)))
    return float(2 * t.sf(abs(statistic), len(differences) - 1))


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of `p_values` for testing them together (None stays None and is not counted):
    the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j)). Controls the chance of any false
    "supported" across the cells at the level the adjusted values are read against, whatever their dependence.
    Written here because it is eight lines and statsmodels (which has it) is not a dependency."""
    tested = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[index] = running
    return adjusted


# Resamples of the paired bootstrap over validation blocks: the percentile interval's ends move by ~1% of its
# width between seeds of the resampling at 2,000, well below what the science check prints.
BOOTSTRAP_RESAMPLES = 2000


def paired_bootstrap_interval(per_block: Mapping[str, np.ndarray],
                              difference: Callable[[Mapping[str, np.ndarray]], np.ndarray],
                              resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The 95% percentile interval of `difference` over bootstrap resamples of the validation blocks, the SAME
    resampled blocks for every model (paired: all were scored on the same blocks, so what the blocks share cancels).
    `per_block`: name -> each model's mean loss per block (equal lengths: every block has as many tokens, so the
    mean of a resample's block means is its loss); `difference` maps name -> the resamples' losses to the effect.
    The evaluation's own noise for one seed's comparison, apart from the seed-to-seed spread the t interval shows."""
    lengths = {len(values) for values in per_block.values()}
    if len(lengths) != 1:
        raise ValueError(f"the models were not scored on the same blocks (block counts {sorted(lengths)})")
    (blocks,) = lengths
    chosen = np.random.default_rng(seed).integers(0, blocks, size=(resamples, blocks))
    values = difference({name: np.asarray(losses, dtype=np.float64)[chosen].mean(axis=1)
                         for name, losses in per_block.items()})
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


ALPHA = 0.05  # the two-sided level of the intervals (95%) and of the Holm-corrected tests


def verdict(mean: float, half_width: float | None, expected: int) -> str:
    """Whether the CI excludes zero, read against the paper's direction (+1 rises, -1 falls, 0 none expected)."""
    if half_width is None or abs(mean) <= half_width:
        return NOT_RESOLVED
    if expected == 0:
        return RISES if mean > 0 else FALLS
    return SUPPORTED if (mean > 0) == (expected > 0) else OPPOSITE


@dataclass(frozen=True)
class Observation:
    """One seed's comparison, in the effect's unit: `compared` (at compared_step) against `baseline`."""

    run: str  # the decayed run, or the average
    seed: int | None  # None where the dataset has no training log (hub families)
    baseline_run: str  # the constant-LR run, the run itself, or the run the average is of
    baseline_step: int | None
    compared_step: int | None
    baseline: float
    compared: float

    @property
    def difference(self) -> float:
        return self.compared - self.baseline


@dataclass(frozen=True)
class Effect:
    section: str  # control / stable / decay / lawa
    quantity: str  # ΔQ L (in %, differences in pp) or fp loss (in nats)
    quantization: str  # "fp" for the fp loss: the same model whatever the quantization
    setting: str  # the runs' settings apart from the seed ("wsd lr=0.003 wd=0.1"), or the run without a log
    expected: int  # the paper's direction of the difference: +1, -1, or 0 where none is expected
    observations: tuple[Observation, ...]  # one per seed, ordered by seed
    # per observation, the paired bootstrap interval over validation blocks (None where the dataset has no
    # per-block losses for one of its models): the evaluation's noise, apart from the seeds' spread
    evaluation_intervals: tuple[tuple[float, float] | None, ...] = field(default=())

    @property
    def n(self) -> int:
        return len(self.observations)

    @property
    def differences(self) -> list[float]:
        return [observation.difference for observation in self.observations]

    @property
    def mean(self) -> float:
        return fmean(self.differences)

    @property
    def half_width(self) -> float | None:
        """Half the 95% CI of the mean (Student t, n - 1 degrees of freedom); None with one seed."""
        if self.n < 2:
            return None
        return t_critical(self.n - 1) * stdev(self.differences) / math.sqrt(self.n)

    @property
    def verdict(self) -> str:
        """What its CI alone says; the check's verdict (ScienceCheck.verdict) also corrects for testing many."""
        return verdict(self.mean, self.half_width, self.expected)

    @property
    def p_value(self) -> float | None:
        return two_sided_p(self.differences)

    @property
    def baseline_mean(self) -> float:
        return fmean(observation.baseline for observation in self.observations)

    @property
    def compared_mean(self) -> float:
        return fmean(observation.compared for observation in self.observations)

    @property
    def unit(self) -> str:
        return "%" if self.quantity == DELTA_Q_LOSS else "nats"

    @property
    def difference_unit(self) -> str:
        return "pp" if self.quantity == DELTA_Q_LOSS else "nats"

    @property
    def steps(self) -> str:
        """The steps compared, "600→800" (or one step for comparisons at equal tokens); "various" if seeds differ."""
        spans = {(o.baseline_step, o.compared_step) for o in self.observations}
        if len(spans) > 1:
            return "various"
        ((baseline, compared),) = spans
        return f"{compared}" if baseline == compared else f"{baseline}→{compared}"


@dataclass(frozen=True)
class Section:
    key: str  # control / stable / decay / lawa
    title: str
    effects: tuple[Effect, ...]
    missing: tuple[str, ...]  # what is not in the section and why (a run, or the whole section)


@dataclass(frozen=True)
class ScienceCheck:
    sections: tuple[Section, ...]

    def section(self, key: str) -> Section:
        return next(section for section in self.sections if section.key == key)

    @property
    def effects(self) -> list[Effect]:
        return [effect for section in self.sections for effect in section.effects]

    @property
    def checked(self) -> bool:
        """Whether any effect could be computed."""
        return bool(self.effects)

    @property
    def tested(self) -> list[Effect]:
        """The effects with an expected direction: the cells Holm's correction counts."""
        return [effect for effect in self.effects if effect.expected]

    @cached_property  # the check is frozen: every verdict reads the same adjustment
    def holm_p(self) -> dict[int, float | None]:
        """id(effect) -> its p-value adjusted (holm) over every tested effect of the check."""
        tested = self.tested
        return dict(zip(map(id, tested), holm([effect.p_value for effect in tested]), strict=True))

    def verdict(self, effect: Effect) -> str:
        """An effect's verdict. With an expected direction, after Holm's correction over every such effect of the
        check (a grid tests many: each CI alone would find some by chance): supported / opposite where the adjusted
        p is below ALPHA. Without one (or without a p, n = 1): what its CI says."""
        adjusted = self.holm_p.get(id(effect))
        if not effect.expected or adjusted is None:
            return effect.verdict
        if adjusted >= ALPHA:
            return NOT_RESOLVED
        return SUPPORTED if (effect.mean > 0) == (effect.expected > 0) else OPPOSITE

    @property
    def unsupported(self) -> list[Effect]:
        """The effects with an expected direction that the data do not support (what `--strict` fails on)."""
        return [effect for effect in self.tested if self.verdict(effect) != SUPPORTED]


TITLES = {
    "control": "1. LR decay beyond a constant LR, at equal tokens (view control_effect): the constant-LR run of the "
               "same seed,\n   peak LR and weight decay → the decayed run, at the decayed run's last step. Paper: fp "
               "loss lower, ΔQ L higher.",
    "stable": "2. Stable-phase trend, for comparison (no expected direction; not counted by --strict): the decayed "
              "run's first\n   stable checkpoint → its last before the decay.",
    "decay": "3. LR decay within the run (view decay_effect): its last checkpoint before the decay → the end of the "
             "decay.\n   Paper: fp loss lower, ΔQ L higher.",
    "lawa": "4. LAWA (view averaging_effect): the newest checkpoint an average takes in → the average, at the "
            "average's last\n   step. Paper: ΔQ L lower.",
}
LEGEND = ("Mean over seeds ± 95% CI (Student t, n − 1 df). ΔQ L = L_q / L_fp − 1 in %, its differences in "
          "percentage\npoints (pp); fp loss in nats. Per seed, in brackets where the dataset has per-block losses: "
          "the paired\nbootstrap's 95% interval over the validation blocks (the evaluation's own noise; the ± is the "
          "seeds' spread).\np (Holm): the t-test's two-sided p, and in brackets adjusted by Holm's method over the "
          "{tested} effects\nwith an expected direction (sections 1, 3, 4). supported / opposite: the adjusted p is "
          "below 0.05, the mean\nin / against the paper's direction; rises / falls (section 2): the CI excludes 0.")

CHECKPOINTS_SQL = """
    SELECT run, quantization, step, phase, coalesce(source, '') AS source FROM results
    WHERE step IS NOT NULL ORDER BY run, quantization, step"""

STABLE_SQL = """
    WITH stable AS (
        SELECT run, quantization, step, delta_q_loss,
               row_number() OVER (PARTITION BY run, quantization ORDER BY step) AS oldest,
               row_number() OVER (PARTITION BY run, quantization ORDER BY step DESC) AS newest
        FROM results WHERE phase = 'stable' AND step IS NOT NULL)
    SELECT first.run, first.quantization, first.step AS step_first, last.step AS step_last,
           first.delta_q_loss AS delta_q_loss_first, last.delta_q_loss AS delta_q_loss_last
    FROM stable AS first JOIN stable AS last USING (run, quantization)
    WHERE first.oldest = 1 AND last.newest = 1 AND first.step < last.step"""

DECAY_SQL = """
    SELECT e.*, before.step AS step_before, after.step AS step_after
    FROM decay_effect AS e
    JOIN results AS before ON before.run = e.run AND before.quantization = e.quantization
     AND before.checkpoint = e.checkpoint_before
    JOIN results AS after ON after.run = e.run AND after.quantization = e.quantization
     AND after.checkpoint = e.checkpoint_after"""

AVERAGING_SQL = """
    SELECT a.*, parent.step AS parent_step FROM averaging_effect AS a
    JOIN results AS avg ON avg.run = a.average AND avg.checkpoint = a.checkpoint AND avg.quantization = a.quantization
    JOIN results AS parent ON parent.run = avg.parent_run AND parent.checkpoint = avg.parent_checkpoint
     AND parent.quantization = a.quantization
    WHERE a.step = (SELECT max(step) FROM averaging_effect AS b WHERE b.average = a.average)"""


def _rows(connection, sql: str) -> list[dict]:
    relation = connection.sql(sql)
    return [dict(zip(relation.columns, row, strict=True)) for row in relation.fetchall()]


def _setting(settings: dict | None, run: str) -> str:
    """What pools runs into one effect: everything of the `runs` view but the seed, i.e. the schedule, peak LR,
    weight decay, training length (tokens) and model size (parameters, where the dataset records them), so that a
    grid's cells (qtraj.sweeps) are never pooled with each other."""
    if settings is None:
        return run  # no training log: the run is its own setting
    weight_decay = "?" if settings["weight_decay"] is None else f"{settings['weight_decay']:g}"
    size = "" if settings.get("parameters") is None else f" params={settings['parameters']:,}"
    return (f"{settings['schedule']} lr={settings['peak_lr']:g} wd={weight_decay} "
            f"tokens={settings['last_tokens']:,}{size}")


def _runs(connection, views: set[str]) -> dict[str, dict]:
    """run -> its row of the `runs` view, with `last_tokens` the tokens of its last evaluated checkpoint where it has
    one: a training log keeps every n-th step (the last one too only since qtraj logs it), a checkpoint's tokens
    are exact in every dataset, and a run's last checkpoint is its last step."""
    if "runs" not in views:
        return {}
    checkpoint_tokens = dict(connection.execute(
        "SELECT run, max(tokens) FROM results WHERE tokens IS NOT NULL GROUP BY run").fetchall())
    return {row["run"]: {**row, "last_tokens": checkpoint_tokens.get(row["run"], row["last_tokens"])}
            for row in _rows(connection, "SELECT * FROM runs")}


@dataclass(frozen=True)
class _Run:
    """What the sections need to know of a run with a decay phase."""

    name: str
    settings: dict | None  # its row of the `runs` view
    steps: dict[str, list[int]]  # quantization -> steps of its checkpoints, ascending
    phases: dict[int, str]  # step -> phase

    @property
    def seed(self) -> int | None:
        return None if self.settings is None else self.settings["seed"]

    @property
    def setting(self) -> str:
        return _setting(self.settings, self.name)

    @property
    def label(self) -> str:
        return self.name if self.seed is None else f"{self.name} (seed {self.seed})"


def _effects(section: str, quantity: str, expected: int,
             observations: list[tuple[str, str, Observation]]) -> list[Effect]:
    """(quantization, setting, observation) triples grouped into effects, each ordered by seed then run."""
    groups = defaultdict(list)
    for quantization, setting, observation in observations:
        groups[quantization, setting].append(observation)
    return [Effect(section, quantity, quantization, setting, expected,
                   tuple(sorted(group, key=lambda o: (o.seed is None, o.seed or 0, o.run))))
            for (quantization, setting), group in sorted(groups.items())]


def _fp_once(observations: list[tuple[str, str, Observation]]) -> list[tuple[str, str, Observation]]:
    """One fp-loss observation per run: the fp model is the same whatever quantization a row is of."""
    seen, kept = set(), []
    for _, setting, observation in observations:
        if observation.run not in seen:
            seen.add(observation.run)
            kept.append((FP, setting, observation))
    return kept


def _control(connection, decayed: list[_Run], runs: dict[str, dict],
             checkpoints: list[dict]) -> Section:
    trained = [run for run in decayed if run.settings is not None]
    constant = {name: settings for name, settings in runs.items() if settings["schedule"] == "constant"}
    missing = []
    if not runs:
        missing.append("no training log in the dataset (hub or local checkpoints): the runs' seeds and settings are "
                       "unknown")
    elif not trained:
        missing.append("no trained run with a decay phase")
    elif not constant:
        missing.append("no constant-LR run (schedule: constant) to compare the decayed runs with at equal tokens")
    if missing:
        return Section("control", TITLES["control"], (), tuple(missing))
    rows = _rows(connection, "SELECT * FROM control_effect WHERE at_end ORDER BY decayed_run, quantization, "
                             "constant_run")
    paired = {}  # (decayed run, quantization) -> the first constant run's row
    controls = defaultdict(set)
    for row in rows:
        paired.setdefault((row["decayed_run"], row["quantization"]), row)
        controls[row["decayed_run"]].add(row["constant_run"])
    steps_of = defaultdict(set)
    for row in checkpoints:
        steps_of[row["run"]].add(row["step"])
    loss, delta_q_loss = [], []
    for run in trained:
        candidates = sorted(name for name, settings in constant.items()
                            if is_control_of(settings, run.name, run.settings))
        unpaired = [quantization for quantization in run.steps if (run.name, quantization) not in paired]
        if not candidates:
            missing.append(f"{run.label}: no constant-LR run of the same seed, peak LR and weight decay "
                           f"(lr={run.settings['peak_lr']:g} wd={run.settings['weight_decay']:g})")
            continue
        if len(controls[run.name]) > 1:
            missing.append(f"{run.label}: {len(controls[run.name])} constant-LR controls "
                           f"({', '.join(sorted(controls[run.name]))}); compared with the first")
        if unpaired:
            end = max(max(steps) for steps in run.steps.values())
            absent = [name for name in candidates if end not in steps_of[name]]
            if len(absent) == len(candidates):
                held = ", ".join(f"{name} has steps {sorted(steps_of[name]) or 'none'}" for name in candidates)
                missing.append(f"{run.label}: no constant-LR checkpoint at its last step {end} ({held})")
            else:
                missing.append(f"{run.label}: no constant-LR result with equal tokens at its last step {end} for "
                               f"{', '.join(sorted(unpaired))}")
        for quantization in run.steps:
            row = paired.get((run.name, quantization))
            if row is None:
                continue
            common = dict(run=run.name, seed=run.seed, baseline_run=row["constant_run"], baseline_step=row["step"],
                          compared_step=row["step"])
            loss.append((quantization, run.setting, Observation(
                **common, baseline=row["loss_fp_constant"], compared=row["loss_fp_decayed"])))
            delta_q_loss.append((quantization, run.setting, Observation(
                **common, baseline=100 * row["delta_q_loss_constant"], compared=100 * row["delta_q_loss_decayed"])))
    effects = _effects("control", LOSS_FP, -1, _fp_once(loss)) + _effects("control", DELTA_Q_LOSS, 1, delta_q_loss)
    return Section("control", TITLES["control"], tuple(effects), tuple(missing))


def _stable(connection, decayed: list[_Run]) -> Section:
    by_run = {run.name: run for run in decayed}
    observations, covered = [], set()
    for row in _rows(connection, STABLE_SQL + " ORDER BY run, quantization"):
        run = by_run.get(row["run"])
        if run is None:
            continue
        covered.add(run.name)
        observations.append((row["quantization"], run.setting, Observation(
            run.name, run.seed, run.name, row["step_first"], row["step_last"],
            100 * row["delta_q_loss_first"], 100 * row["delta_q_loss_last"])))
    missing = [f"{run.label}: fewer than two stable checkpoints "
               f"({sum(phase == 'stable' for phase in run.phases.values())})"
               for run in decayed if run.name not in covered]
    if not decayed:
        missing.append("no run with a decay phase")
    return Section("stable", TITLES["stable"], tuple(_effects("stable", DELTA_Q_LOSS, 0, observations)),
                   tuple(missing))


def _decay(connection, decayed: list[_Run]) -> Section:
    by_run = {run.name: run for run in decayed}
    loss, delta_q_loss, covered = [], [], set()
    for row in _rows(connection, DECAY_SQL + " ORDER BY run, quantization"):
        run = by_run.get(row["run"])
        if run is None:
            continue
        covered.add(run.name)
        common = dict(run=run.name, seed=run.seed, baseline_run=run.name, baseline_step=row["step_before"],
                      compared_step=row["step_after"])
        loss.append((row["quantization"], run.setting, Observation(
            **common, baseline=row["loss_fp_before"], compared=row["loss_fp_after"])))
        delta_q_loss.append((row["quantization"], run.setting, Observation(
            **common, baseline=100 * row["delta_q_loss_before"], compared=100 * row["delta_q_loss_after"])))
    missing = [f"{run.label}: no checkpoint before the decay" for run in decayed if run.name not in covered]
    if not decayed:
        missing.append("no run with a decay phase")
    effects = _effects("decay", LOSS_FP, -1, _fp_once(loss)) + _effects("decay", DELTA_Q_LOSS, 1, delta_q_loss)
    return Section("decay", TITLES["decay"], tuple(effects), tuple(missing))


def _averaging(connection, views: set[str], runs: dict[str, dict]) -> Section:
    rows = _rows(connection, AVERAGING_SQL + " ORDER BY quantization, average") if "averaging_effect" in views else []
    if not rows:
        return Section("lawa", TITLES["lawa"], (), ("no weight averages in the dataset",))
    observations = []
    for row in rows:
        settings = runs.get(row["run"])
        observations.append((row["quantization"], _setting(settings, row["run"]), Observation(
            row["average"], None if settings is None else settings["seed"], row["run"], row["parent_step"],
            row["step"], 100 * row["delta_q_loss_parent"], 100 * row["delta_q_loss_average"])))
    return Section("lawa", TITLES["lawa"], tuple(_effects("lawa", DELTA_Q_LOSS, -1, observations)), ())


def _block_losses(connection) -> dict[tuple, np.ndarray]:
    """(run, step, quantization or FP) -> the model's mean loss per validation block, for the datasets that have
    them (`block_losses`; older datasets do not) and for steps that name one model of a run."""
    found: dict[tuple, np.ndarray] = {}
    ambiguous = set()
    queries = (f"SELECT run, step, '{FP}' AS quantization, block_losses FROM fp_evals",
               "SELECT run, step, quantization, block_losses FROM results")
    for sql in queries:
        try:
            rows = connection.execute(sql + " WHERE step IS NOT NULL AND block_losses IS NOT NULL").fetchall()
        except Exception:  # noqa: BLE001 - duckdb's binder error for a dataset written before the column existed
            continue
        for run, step, quantization, losses in rows:
            key = (run, step, quantization)
            if key in found:
                ambiguous.add(key)
            found[key] = np.asarray(losses, dtype=np.float64)
    return {key: losses for key, losses in found.items() if key not in ambiguous}


def _percent_change(quantized: np.ndarray, fp: np.ndarray) -> np.ndarray:
    return 100 * (quantized / fp - 1)


def evaluation_interval(effect: Effect, observation: Observation,
                        blocks: Mapping[tuple, np.ndarray]) -> tuple[float, float] | None:
    """The paired bootstrap interval of one observation's difference (paired_bootstrap_interval), None when a model
    it compares has no per-block losses."""
    compared, baseline = (observation.run, observation.compared_step), (observation.baseline_run,
                                                                        observation.baseline_step)
    if effect.quantity == LOSS_FP:
        keys = {"compared": (*compared, FP), "baseline": (*baseline, FP)}

        def difference(means):
            return means["compared"] - means["baseline"]
    else:
        keys = {"compared_q": (*compared, effect.quantization), "compared_fp": (*compared, FP),
                "baseline_q": (*baseline, effect.quantization), "baseline_fp": (*baseline, FP)}

        def difference(means):
            return (_percent_change(means["compared_q"], means["compared_fp"])
                    - _percent_change(means["baseline_q"], means["baseline_fp"]))
    if any(key not in blocks for key in keys.values()):
        return None
    return paired_bootstrap_interval({name: blocks[key] for name, key in keys.items()}, difference)


def with_evaluation_intervals(section: Section, blocks: Mapping[tuple, np.ndarray]) -> Section:
    effects = tuple(replace(effect, evaluation_intervals=tuple(
        evaluation_interval(effect, observation, blocks) for observation in effect.observations))
        for effect in section.effects)
    return replace(section, effects=effects)


def measure(results_dir: str | Path) -> ScienceCheck:
    """The four comparisons of the module docstring, per quantization and setting, pooled over seeds."""
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    views = {row[0] for row in connection.execute("SHOW TABLES").fetchall()}
    runs = _runs(connection, views)
    checkpoints = _rows(connection, CHECKPOINTS_SQL)
    steps, phases = defaultdict(lambda: defaultdict(list)), defaultdict(dict)
    excluded = set()  # averages and cooldowns: compared in their own views, not decayed runs of their own
    for row in checkpoints:
        steps[row["run"]][row["quantization"]].append(row["step"])
        phases[row["run"]][row["step"]] = row["phase"]
        if row["source"] in ("averaged", "cooldown"):
            excluded.add(row["run"])
    decayed = [_Run(name, runs.get(name), dict(steps[name]), phases[name]) for name in sorted(steps)
               if name not in excluded and "decay" in phases[name].values()
               and (runs.get(name) or {}).get("schedule") != "constant"]
    sections = (_control(connection, decayed, runs, checkpoints), _stable(connection, decayed),
                _decay(connection, decayed), _averaging(connection, views, runs))
    blocks = _block_losses(connection)
    return ScienceCheck(tuple(with_evaluation_intervals(section, blocks) for section in sections))


def decay_map_cells(results_dir: str | Path, check: ScienceCheck | None = None) -> list[dict]:
    """The cells of a grid (a `sweeps:` decay map), from section 1 (control): per (model size, training length,
    quantization), the decayed run minus its constant-LR control at equal tokens, mean ± 95% CI over seeds, tokens
    per parameter (the run's last checkpoint's tokens over its parameter count from the training log), the
    Holm-adjusted p and the check's verdict, and the evaluation's own noise: the median half width of the seeds'
    paired bootstrap intervals (None without per-block losses). Effects whose runs' size the dataset lacks are left
    out."""
    check = check or measure(results_dir)
    connection = connect(results_dir, read_only=False)  # qtraj's own SQL
    runs = _runs(connection, {"runs"})
    bits = dict(connection.execute("SELECT DISTINCT quantization, bits FROM results").fetchall())
    points = []
    for effect in check.section("control").effects:
        run = runs.get(effect.observations[0].run, {})
        if not run.get("parameters") or effect.half_width is None:
            continue
        points.append({"quantization": effect.quantization, "quantity": effect.quantity,
                       "bits": bits.get(effect.quantization) if effect.quantity == DELTA_Q_LOSS else None,
                       "parameters": run["parameters"], "tokens_per_parameter": run["last_tokens"] / run["parameters"],
                       "mean": effect.mean, "half_width": effect.half_width, "n": effect.n,
                       "holm_p": check.holm_p.get(id(effect)), "verdict": check.verdict(effect),
                       "unit": effect.difference_unit, "evaluation_half_width": _median_half_width(effect)})
    return sorted(points, key=lambda point: (point["quantization"], point["parameters"], point["tokens_per_parameter"]))


def _median_half_width(effect: Effect) -> float | None:
    widths = [(high - low) / 2 for interval in effect.evaluation_intervals if interval is not None
              for low, high in [interval]]
    return float(np.median(widths)) if widths else None


CELL_HEADER = ["parameters", "tokens/param", "quantization", "quantity", "decayed − constant: mean ± 95% CI", "n",
               "eval. noise ±", "p (Holm)", "verdict"]


def render_cells(cells: list[dict]) -> str:
    """decay_map_cells as an aligned table, by model size, training length and quantization (the fp loss first)."""
    if not cells:
        return ("No cells: no decayed run with a constant-LR control whose training log records its model size "
                "(parameters: a `sweeps:` grid trained by this qtraj).")
    rows = []
    for cell in sorted(cells, key=lambda c: (c["parameters"], c["tokens_per_parameter"], c["bits"] or 0,
                                             c["quantization"])):
        digits = _digits(cell["unit"])
        noise = cell["evaluation_half_width"]
        rows.append([f"{cell['parameters']:,}", f"{cell['tokens_per_parameter']:.1f}", cell["quantization"],
                     cell["quantity"], f"{_number(cell['mean'], digits, sign=True)} ± "
                     f"{_number(cell['half_width'], digits)} {cell['unit']}", str(cell["n"]),
                     "-" if noise is None else _number(noise, digits), _p_cell(cell["holm_p"], None), cell["verdict"]])
    return text_table(CELL_HEADER, rows, right={0, 1, 4, 5, 6, 7})


def _number(value: float, digits: int, sign: bool = False) -> str:
    """`value` rounded to `digits`, never as "-0.000"."""
    return f"{value if round(value, digits) else 0.0:{'+' if sign else ''}.{digits}f}"


def _digits(unit: str) -> int:
    return 3 if unit in ("%", "pp") else 4  # ΔQ L in % to a thousandth of a percent; loss to 1e-4 nats


def _p_cell(p: float | None, adjusted: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.3f}" + ("" if adjusted is None else f" ({adjusted:.3f})")


def _cells(effect: Effect, adjusted: float | None, verdict: str) -> list[str]:
    unit, difference_unit = effect.unit, effect.difference_unit
    levels = " → ".join(_number(value, _digits(unit)) + ("%" if unit == "%" else "")
                        for value in (effect.baseline_mean, effect.compared_mean))
    digits = _digits(difference_unit)
    centre = _number(effect.mean, digits, sign=True)
    if effect.half_width is None:
        interval = f"{centre} {difference_unit}, no CI (n=1)"
    else:
        interval = f"{centre} ± {_number(effect.half_width, digits)} {difference_unit}"
    intervals = effect.evaluation_intervals or (None,) * effect.n
    per_seed = " ".join(("" if o.seed is None else f"{o.seed}:") + _number(o.difference, digits, sign=True)
                        + ("" if interval is None else
                           f" [{_number(interval[0], digits, sign=True)}, {_number(interval[1], digits, sign=True)}]")
                        for o, interval in zip(effect.observations, intervals, strict=True))
    return [effect.quantization, effect.setting, effect.quantity, effect.steps, levels, interval, str(effect.n),
            _p_cell(effect.p_value, adjusted), verdict, per_seed]


HEADER = ["quantization", "setting", "quantity", "steps", "mean levels", "difference: mean ± 95% CI", "n",
          "p (Holm)", "verdict", "per seed (seed:difference)"]


def render(check: ScienceCheck) -> str:
    """The check as text: one aligned line per effect, under its section, and what each section lacks."""
    adjusted = check.holm_p
    cells = {id(effect): _cells(effect, adjusted.get(id(effect)), check.verdict(effect)) for effect in check.effects}
    widths = [max([len(title)] + [len(row[column]) for row in cells.values()]) for column, title in enumerate(HEADER)]
    right = {3, 5, 6, 7}  # numbers (and the steps) right-aligned

    def line(row: list[str]) -> str:
        return "   " + "  ".join(cell.rjust(width) if column in right else cell.ljust(width)
                                for column, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()

    lines = [LEGEND.format(tested=len(check.tested))]
    for section in check.sections:
        lines += ["", section.title]
        if section.effects:
            lines.append(line(HEADER))
            lines += [line(cells[id(effect)]) for effect in section.effects]
        lines += [f"   missing: {reason}" for reason in section.missing]
    if not check.checked:
        lines += ["", "Nothing could be checked: the dataset has no run with a decay phase and no averages."]
    return "\n".join(lines)


def report(results_dir: str | Path) -> str:
    return render(measure(results_dir))
