"""Loading and validating the workflow configuration, and deriving what the DAG is made of.

Validation happens before any job runs, with messages that name the key, the bad value and what is
allowed — jsonschema's own messages do not say where in the file the problem is.
"""

from __future__ import annotations

from pathlib import Path

from qtraj.schedules import Schedule

# the validation basics live in qtraj.schema, which family and local-trajectory files use too (no import cycle);
# ConfigError and read_yaml are re-exported: they are part of this module's API
from qtraj.schema import SCHEMA_PATH, ConfigError, load_schema, read_yaml  # noqa: F401
from qtraj.schema import validate_against as _validate

# The summary figures and what a config needs to have data for each: the one list (qtraj.plotting.SUMMARY_FIGURES
# draws them under the same names). They sit beside the per-trajectory figures in results/figures/, so no
# trajectory may take their names.
SUMMARY_FIGURE_NEEDS = {
    "loss": lambda config: True,
    "lr": lambda config: True,
    "sharpness": lambda config: any(measures_sharpness(config, run) for run in trajectories(config)),
    "averaging": lambda config: bool(config["averages"]),
    "accuracy": lambda config: any(settings["local_tasks"] or settings["lm_eval_tasks"] for settings in
                                   (data_settings(config, run)["accuracy"] for run in trajectories(config))),
    "decay-map": lambda config: any(sweep["control"] for sweep in config.get("sweeps", {}).values()),
}
SUMMARY_FIGURE_NAMES = tuple(SUMMARY_FIGURE_NEEDS)


def summary_figures(config: dict) -> list[str]:
    """The summary figures a (validated) config has data for."""
    return [name for name, needs in SUMMARY_FIGURE_NEEDS.items() if needs(config)]


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate a config dict in place (filling defaults) and check what the schema alone cannot: each source of
    trajectories checks its own entries (qtraj.sources)."""
    from qtraj.methods import QuantSpec, discover
    from qtraj.sources import source_classes, sources
    from qtraj.sweeps import expand_sweeps

    schema = schema or load_schema()
    if not isinstance(config, dict):
        raise ConfigError("the configuration must be a mapping of keys to values")
    classes = source_classes(config)  # the plugin sources the config names bring their config keys
    for cls in classes:
        if cls.config_schema is not None:
            schema["properties"].setdefault(cls.key, cls.config_schema)
    _validate(config, schema)
    if config.get("sweeps"):  # the runs, branches and averages a grid names, then validated (and filled) like any
        expand_sweeps(config)
        _validate(config, schema)
    _check_finite_numbers(config)
    _check_folders(config)
    if not trajectories(config):
        keys = [f"`{cls.key}` ({cls.description})" for cls in classes if not cls.derived and cls.description]
        raise ConfigError(f"the config has neither {', '.join(keys[:-1])} nor {keys[-1]}; add at least one")
    _check_unique_names(config)
    reserved = set(SUMMARY_FIGURE_NAMES) & set(trajectories(config))
    if reserved:
        raise ConfigError(f"trajectory name {sorted(reserved)[0]!r} is reserved for a figure; rename it")
    sort_keys_in_place(config)
    for source in sources(config):
        source.check()
    _check_sharpness(config)
    methods = discover()
    for name, entry in config["quantizations"].items():
        where = f"quantizations.{name}"
        if entry["method"] not in methods:
            raise ConfigError(f"config key '{where}.method': unknown method {entry['method']!r}; "
                              f"known methods: {', '.join(sorted(methods))}")
        method = methods[entry["method"]]
        _validate(entry["options"], method.options_schema, ("quantizations", name, "options"))
        try:
            method().check(QuantSpec(**quant_spec(config, name)))
        except ValueError as error:
            raise ConfigError(f"config key '{where}': {error}") from error
    _check_architectures(config, methods)
    _check_name_lengths(config)
    return config


def _check_unique_names(config: dict) -> None:
    """Results are keyed by trajectory name (the `run` column): no two entries of any sources may share one."""
    from qtraj.sources import sources

    seen = {}
    for source in sources(config):
        for name in source.names():
            if name in seen:
                raise ConfigError(f"config key '{source.key}.{name}': {name!r} is both {seen[name].noun} and "
                                  f"{source.noun}; results are keyed by that name, so rename one of them")
            seen[name] = source


def _check_finite_numbers(config: dict, where: tuple = ()) -> None:
    """NaN and infinity pass JSON Schema's bounds (every comparison with NaN is false): refuse them by key."""
    import math

    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"config key '{'.'.join(map(str, (*where, key)))}': {value} is not a finite number")
        _check_finite_numbers(value, (*where, key))


def _check_folders(config: dict) -> None:
    """results_dir is rewritten at will (Snakemake deletes a job's outputs before rerunning it): never the
    filesystem root, a home folder or the working folder (rules/common.smk adds the workflow's own folder)."""
    from qtraj.ownership import results_dir_problem

    problem = results_dir_problem(config["results_dir"], {"the working folder": Path.cwd()})
    if problem:
        raise ConfigError(problem)
    if not config["models_dir"].strip():
        raise ConfigError("config key 'models_dir': it is empty; name a folder, e.g. models")


# Names become file names (`<checkpoint>.parquet`, a temporary `.<name>.parquet.XXXXXXXX.tmp` beside it) and most
# filesystems cap a file name at 255 bytes: refuse longer names here instead of in a job.
MAX_NAME_LENGTH = 100


def _check_name_lengths(config: dict) -> None:
    from qtraj.sources import sources

    names = [(f"quantizations.{name}", name) for name in config["quantizations"]]
    for source in sources(config):
        names += [(f"{source.key}.{name}", name) for name in source.names()]
        if source.external:  # checkpoint names that come from elsewhere; every other one is made from these
            names += [(f"checkpoint of {name!r}", checkpoint) for name in source.names()
                      for checkpoint in source.checkpoints(name)]
    for where, name in names:
        if len(name.encode()) > MAX_NAME_LENGTH:
            raise ConfigError(f"{where}: the name {name[:40]!r}... is {len(name.encode())} bytes long; names become "
                              f"file names, so at most {MAX_NAME_LENGTH} bytes: choose a shorter one")


def architecture_of(config: dict, run: str) -> str | None:
    """The model class of a trajectory as far as it is known before any job runs (qtraj.sources: trained runs are
    Llama, a family file says it, a folder's first checkpoint says it in its config.json); None for derived ones."""
    from qtraj.sources import source_of

    return source_of(config, run).architecture(run)


def _check_architectures(config: dict, methods: dict) -> None:
    """Refuse a quantization whose engine cannot run an architecture of the config, before any job starts."""
    from qtraj.methods import QuantSpec
    from qtraj.sources import sources

    for source in sources(config):
        for name in source.names():
            architecture = source.architecture(name)
            if architecture is None:
                continue
            for quantization, entry in config["quantizations"].items():
                try:
                    methods[entry["method"]]().check_architecture(QuantSpec(**quant_spec(config, quantization)),
                                                                  architecture)
                except ValueError as error:
                    raise ConfigError(f"config key 'quantizations.{quantization}' on {name!r}: {error}") from error


def _check_sharpness(config: dict) -> None:
    """Trajectories named under `sharpness.runs` / `sharpness.families` must exist and be of that kind."""
    for key, external in (("runs", False), ("families", True)):
        names = config["sharpness"][key]
        for name in names if isinstance(names, list) else ():
            if name not in trajectories(config) or is_external(config, data_source(config, name)) != external:
                kind = "hub families or local trajectories" if external else "trained runs, cooldowns or averages"
                raise ConfigError(f"config key 'sharpness.{key}': {name!r} is not one of the config's {kind}")


def measures_sharpness(config: dict, run: str) -> bool:
    """Whether trajectory `run` gets a sharpness job per checkpoint (`sharpness.runs` / `sharpness.families`)."""
    setting = config["sharpness"]["families" if is_external(config, data_source(config, run)) else "runs"]
    return run in setting if isinstance(setting, list) else setting


def sort_keys_in_place(config: dict) -> dict:
    """Order every mapping of the config by key, in place. Snakemake compares a job's params by their text, so
    without this, writing the same settings in another order (or adding a key spelled the same as its default)
    would rerun every job they reach, training included."""

    def sort(value):
        if isinstance(value, dict):
            return {key: sort(value[key]) for key in sorted(value, key=str)}
        if isinstance(value, list):
            return [sort(item) for item in value]
        return value

    ordered = sort(config)
    config.clear()
    config.update(ordered)
    return config


def load_config(path: str | Path) -> dict:
    return validate_config(read_yaml(path) or {})


def run_settings(config: dict, run: str) -> dict:
    """The training settings of one run: the `training` defaults with the run's overrides on top."""
    return {**config["training"], **{key: value for key, value in config["runs"][run].items() if key != "model"}}


def run_model(config: dict, run: str) -> dict:
    """The model of one trained run: `model` with the run's `model` overrides on top (a sweep over sizes)."""
    return {**config["model"], **config["runs"][run].get("model", {})}


def training_params(config: dict, run: str) -> dict:
    """What a trained run's training job gets (and a cooldown of it resumes with): its settings and its model."""
    return {**run_settings(config, run), "model": run_model(config, run)}


def trajectories(config: dict) -> list[str]:
    """Every trajectory of the config, source by source (qtraj.sources: trained runs, hub families, local folders,
    cooldowns, then averages; the `run` column of every table)."""
    from qtraj.sources import trajectory_names

    return trajectory_names(config)


def is_external(config: dict, name: str) -> bool:
    """Checkpoints made elsewhere (hub families, local folders): their own tokenizer, no training here."""
    from qtraj.sources import source_of

    return source_of(config, name).external


def data_source(config: dict, run: str) -> str:
    """The trajectory whose text (and model size) a trajectory uses: itself, a cooldown's run, or an average's
    source's."""
    from qtraj.sources import source_of

    return source_of(config, run).data_source(run)


def checkpoints_of(config: dict, run: str) -> list[str]:
    """Checkpoint names of a trajectory, in training order: a trained run's (step000800), a family's selected
    revisions, a cooldown's branch ends, an average's (named after its newest source checkpoint, or `soup`)."""
    from qtraj.sources import source_of

    return source_of(config, run).checkpoints(run)


def data_settings(config: dict, run: str) -> dict:
    """The calibration, evaluation and accuracy settings of a trajectory: the carried corpus's, or the hub text's
    (`hub_data`) for trajectories evaluated on it (families)."""
    source = config["hub_data"] if validation_text(config, run) == "hub" else config
    return {kind: source[kind] for kind in ("calibration", "evaluation", "accuracy")}


def validation_text(config: dict, run: str) -> str:
    """Which validation text a trajectory is evaluated on: `corpus` (trained runs, local folders) or `hub`
    (families): its data source's."""
    from qtraj.sources import source_of

    base = data_source(config, run)
    return source_of(config, base).text(base)


def make_schedule(settings: dict) -> Schedule:
    return Schedule(
        kind=settings["schedule"],
        peak_lr=settings["peak_lr"],
        total_steps=settings["steps"],
        warmup_steps=round(settings["warmup_fraction"] * settings["steps"]),
        decay_fraction=settings["decay_fraction"],
        final_lr_fraction=settings["final_lr_fraction"],
    )


def training_spec(run: str, settings: dict):
    """Everything `qtraj.training.train` needs for one run; `settings` holds the model under 'model'."""
    from qtraj.training import TrainingSpec

    return TrainingSpec(
        run=run, model=settings["model"], schedule=make_schedule(settings), seq_len=settings["seq_len"],
        batch_size=settings["batch_size"], weight_decay=settings["weight_decay"],
        grad_clip=settings["grad_clip"], seed=settings["seed"],
    )


def quant_spec(config: dict, name: str) -> dict:
    """A quantization entry as the plain dict `qtraj.methods.QuantSpec` takes."""
    from qtraj.methods import QuantSpec, get_method

    entry = config["quantizations"][name]
    spec = {"name": name, "method": entry["method"], "bits": entry["bits"], "group_size": entry["group_size"],
            "symmetric": entry["symmetric"], "options": dict(entry["options"]), "engine": entry["engine"]}
    # null: the method's default engine, which the method names (QuantizationMethod.engine_of)
    spec["engine"] = get_method(entry["method"]).engine_of(QuantSpec(**spec))
    return spec
