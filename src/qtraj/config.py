"""Loading and validating the workflow configuration, and deriving what the DAG is made of.

Validation happens before any job runs, with messages that name the key, the bad value and what is
allowed — jsonschema's own messages do not say where in the file the problem is.
"""

from __future__ import annotations

from pathlib import Path

from qtraj.checkpoints import checkpoint_name, evenly_spaced_steps
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
}
SUMMARY_FIGURE_NAMES = tuple(SUMMARY_FIGURE_NEEDS)


def summary_figures(config: dict) -> list[str]:
    """The summary figures a (validated) config has data for."""
    return [name for name, needs in SUMMARY_FIGURE_NEEDS.items() if needs(config)]


def validate_config(config: dict, schema: dict | None = None) -> dict:
    """Validate a config dict in place (filling defaults) and check what the schema alone cannot."""
    from qtraj.methods import QuantSpec, discover

    schema = schema or load_schema()
    if not isinstance(config, dict):
        raise ConfigError("the configuration must be a mapping of keys to values")
    _validate(config, schema)
    _check_finite_numbers(config)
    _check_folders(config)
    if not config["runs"] and not config["families"] and not config["local"]:
        raise ConfigError("the config has neither `runs` (models trained here), `families` (hub checkpoints) nor "
                          "`local` (checkpoint folders on disk); add at least one")
    _check_families(config)
    _check_local(config)
    _check_averages(config)
    reserved = set(SUMMARY_FIGURE_NAMES) & set(trajectories(config))
    if reserved:
        raise ConfigError(f"trajectory name {sorted(reserved)[0]!r} is reserved for a figure; rename it")
    sort_keys_in_place(config)
    for run in config["runs"]:
        _validate(run_settings(config, run), schema["$defs"]["training"], ("runs", run))
        settings = run_settings(config, run)
        if settings["checkpoints"] > settings["steps"]:
            key = "checkpoints" if "checkpoints" in config["runs"][run] else "training.checkpoints"
            where = f"runs.{run}.checkpoints" if key == "checkpoints" else key
            raise ConfigError(f"config key '{where}': {settings['checkpoints']} checkpoints cannot be saved in "
                              f"{settings['steps']} steps (run {run!r}); save at most one per step")
    _check_group_sizes(config, discover())
    _check_cooldowns(config)
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
    names = [(f"quantizations.{name}", name) for name in config["quantizations"]]
    names += [(f"gguf_models.{name}", name) for name in config["gguf_models"]]
    for trajectory in trajectories(config):
        names.append((trajectory, trajectory))
    for trajectory in [*config["families"], *config["local"]]:  # every other checkpoint name is made from these
        names += [(f"checkpoint of {trajectory!r}", checkpoint) for checkpoint in checkpoints_of(config, trajectory)]
    for where, name in names:
        if len(name.encode()) > MAX_NAME_LENGTH:
            raise ConfigError(f"{where}: the name {name[:40]!r}... is {len(name.encode())} bytes long; names become "
                              f"file names, so at most {MAX_NAME_LENGTH} bytes: choose a shorter one")


# The model class of the micro models trained here (qtraj.training builds a LlamaForCausalLM).
TRAINED_ARCHITECTURE = "LlamaForCausalLM"


def architecture_of(config: dict, source: str) -> str | None:
    """The model class of a run, family or local trajectory, as far as it is known before any job runs: trained
    runs are Llama; a family file says it; a local folder's first checkpoint says it in its config.json."""
    if source in config["runs"]:
        return TRAINED_ARCHITECTURE
    if is_family(config, source):
        from qtraj.families import configured_family

        return configured_family(config, source)["architecture"] or None
    if is_local(config, source):
        import json

        from qtraj.local import selected_checkpoints

        first = Path(config["local"][source]["path"]) / selected_checkpoints(config, source)[0].revision
        if (first / "config.json").is_file():
            return (json.loads((first / "config.json").read_text()).get("architectures") or [None])[0]
    return None


def _check_architectures(config: dict, methods: dict) -> None:
    """Refuse a quantization whose engine cannot run an architecture of the config, before any job starts."""
    from qtraj.methods import QuantSpec

    sources = list(config["runs"]) + list(config["families"]) + list(config["local"])
    for source in sources:
        architecture = architecture_of(config, source)
        if architecture is None:
            continue
        for name, entry in config["quantizations"].items():
            try:
                methods[entry["method"]]().check_architecture(QuantSpec(**quant_spec(config, name)), architecture)
            except ValueError as error:
                raise ConfigError(f"config key 'quantizations.{name}' on {source!r}: {error}") from error


def _check_families(config: dict) -> None:
    from qtraj.families import selected_revisions

    for slug in config["families"]:
        if slug in config["runs"]:
            raise ConfigError(f"'{slug}' is both a trained run and a family; results are keyed by that name, so "
                              "rename one of them")
        selected_revisions(config, slug)  # loads and validates the family file, resolves the selector


def _check_group_sizes(config: dict, methods: dict) -> None:
    """The trained models' sizes are in the config: a group size that does not divide a linear layer's input
    features fails here rather than in the first quantize job."""
    if not config["runs"]:
        return
    widths = {"model.hidden_size": config["model"]["hidden_size"],
              "model.intermediate_size": config["model"]["intermediate_size"]}
    for name, entry in config["quantizations"].items():
        group = entry["group_size"]
        if entry["method"] in methods and not methods[entry["method"]].groups_along_inputs:
            continue
        for key, width in widths.items():
            if group is not None and width % group:
                raise ConfigError(f"config key 'quantizations.{name}.group_size': {group} does not divide the "
                                  f"trained models' {key} {width}, which a linear layer takes as input features; "
                                  "choose a divisor (or null for one scale per output channel)")


def _check_local(config: dict) -> None:
    from qtraj.local import selected_checkpoints

    for name in config["local"]:
        if name in config["runs"] or name in config["families"]:
            raise ConfigError(f"config key 'local.{name}': '{name}' is also a run or family; results are keyed by "
                              "that name, so rename one of them")
        selected_checkpoints(config, name)  # finds the folders, resolves the selector


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


def _check_cooldowns(config: dict) -> None:
    taken = set(config["runs"]) | set(config["families"]) | set(config["local"]) | set(config["averages"])
    for name, spec in config["cooldowns"].items():
        where = f"config key 'cooldowns.{name}"
        if name in taken:
            raise ConfigError(f"{where}': '{name}' is also a run, family or average; cooldowns need their own name")
        if spec["from"] not in config["runs"]:
            raise ConfigError(f"{where}.from': {spec['from']!r} is not a trained run of this config; cooldowns "
                              f"resume runs trained here (known: {', '.join(sorted(config['runs'])) or 'none'})")
        schedule = make_schedule(run_settings(config, spec["from"]))
        for step in spec["at"]:
            if step > schedule.decay_start:
                raise ConfigError(f"{where}.at': step {step} is past the stable phase of {spec['from']!r} (its "
                                  f"decay starts after step {schedule.decay_start}); branch at or before it")


def _check_averages(config: dict) -> None:
    sources = set(config["runs"]) | set(config["families"]) | set(config["local"]) | set(config["cooldowns"])
    for name, spec in config["averages"].items():
        where = f"config key 'averages.{name}"
        if name in sources:
            raise ConfigError(f"{where}': '{name}' is also a run or family; averages need their own name")
        if spec["kind"] == "soup":
            if isinstance(spec["of"], str):
                raise ConfigError(f"{where}.of': a soup lists trajectory/checkpoint entries, e.g. [a/step000800, "
                                  "b/step000800]")
            for entry in spec["of"]:
                trajectory, checkpoint = entry.split("/", 1)
                if trajectory not in sources or checkpoint not in checkpoints_of(config, trajectory):
                    raise ConfigError(f"{where}.of': {entry!r} is not a checkpoint of a run or family of this "
                                      "config")
            continue
        if not isinstance(spec["of"], str) or spec["of"] not in sources:
            raise ConfigError(f"{where}.of': {spec['of']!r} is not a run or family of this config; known: "
                              f"{', '.join(sorted(sources))}")
        available = averaged_checkpoints_of(config, spec["of"])
        if spec["window"] > len(available):
            raise ConfigError(f"{where}.window': {spec['window']} is more than the {len(available)} checkpoints of "
                              f"{spec['of']!r}")
        ends = available[spec["window"] - 1 :]
        for name in spec["at"] or []:
            if name not in ends:
                raise ConfigError(f"{where}.at': {name!r} is not a checkpoint of {spec['of']!r} that a window of "
                                  f"{spec['window']} can end at; those are: {', '.join(ends)}")


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
    return {**config["training"], **config["runs"][run]}


def branch_steps(config: dict, run: str) -> list[int]:
    """Steps of a trained run that cooldowns branch from: saved as checkpoints, with training state."""
    return sorted({step for spec in config["cooldowns"].values() if spec["from"] == run for step in spec["at"]})


def checkpoint_steps(config: dict, run: str) -> list[int]:
    """The steps a trained run saves: `checkpoints` evenly spaced ones plus its cooldowns' branch points."""
    settings = run_settings(config, run)
    return sorted(set(evenly_spaced_steps(settings["steps"], settings["checkpoints"])) | set(branch_steps(config, run)))


def cooldown_branches(config: dict, name: str) -> dict[str, int]:
    """Checkpoint name of each branch's end -> the step of the run it branched from."""
    spec = config["cooldowns"][name]
    return {checkpoint_name(step + spec["length"]): step for step in sorted(spec["at"])}


def trajectories(config: dict) -> list[str]:
    """Every trajectory of the config: trained runs, hub families, local folders, cooldowns, then averages (the
    `run` column of every table)."""
    return (list(config["runs"]) + list(config["families"]) + list(config["local"]) + list(config["cooldowns"])
            + list(config["averages"]))


def is_family(config: dict, name: str) -> bool:
    return name in config["families"]


def is_local(config: dict, name: str) -> bool:
    return name in config["local"]


def is_external(config: dict, name: str) -> bool:
    """Checkpoints made elsewhere (hub families, local folders): their own tokenizer, no training here."""
    return is_family(config, name) or is_local(config, name)


def data_source(config: dict, run: str) -> str:
    """The run or family whose text (and model size) a trajectory uses: itself, a cooldown's run, or an average's
    source's."""
    if run in config["cooldowns"]:
        return config["cooldowns"][run]["from"]
    if run not in config["averages"]:
        return run
    of = config["averages"][run]["of"]
    return data_source(config, of if isinstance(of, str) else of[0].split("/", 1)[0])


def averaging_plan_of(config: dict, name: str) -> dict:
    from qtraj.averaging import averaging_plan

    spec = config["averages"][name]
    sources = averaged_checkpoints_of(config, spec["of"]) if isinstance(spec["of"], str) else []
    return averaging_plan(spec, sources)


def averaged_checkpoints_of(config: dict, trajectory: str) -> list[str]:
    """The checkpoints LAWA / EMA windows run over: a trained run's evenly spaced ones (a cooldown's branch point
    in between would otherwise change what a window averages), any other trajectory's all."""
    if trajectory in config["runs"]:
        settings = run_settings(config, trajectory)
        return [checkpoint_name(step) for step in evenly_spaced_steps(settings["steps"], settings["checkpoints"])]
    return checkpoints_of(config, trajectory)


def checkpoints_of(config: dict, run: str) -> list[str]:
    """Checkpoint names of a trained run (step000800), of a family's selected revisions (the revision), of a
    cooldown (the step its branch ends at), or of an average (named after its newest source checkpoint, or `soup`)."""
    if run in config["averages"]:
        return list(averaging_plan_of(config, run))
    if is_family(config, run):
        from qtraj.families import selected_revisions

        return [revision.revision for revision in selected_revisions(config, run)]
    if is_local(config, run):
        from qtraj.local import selected_checkpoints

        return [revision.revision for revision in selected_checkpoints(config, run)]
    if run in config["cooldowns"]:
        return list(cooldown_branches(config, run))
    return [checkpoint_name(step) for step in checkpoint_steps(config, run)]


def data_settings(config: dict, run: str) -> dict:
    """The calibration, evaluation and accuracy settings of a trajectory: the carried corpus's for trained runs
    and local folders, the hub text's for families."""
    source = config["hub_data"] if is_family(config, data_source(config, run)) else config
    return {kind: source[kind] for kind in ("calibration", "evaluation", "accuracy")}


def validation_text(config: dict, run: str) -> str:
    """Which validation text a trajectory is evaluated on: `corpus` (trained runs) or `hub` (families)."""
    return "hub" if is_family(config, data_source(config, run)) else "corpus"


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
    from qtraj.methods import get_method

    entry = config["quantizations"][name]
    engine = entry["engine"] or get_method(entry["method"]).engines[0]
    return {"name": name, "method": entry["method"], "bits": entry["bits"], "group_size": entry["group_size"],
            "symmetric": entry["symmetric"], "options": dict(entry["options"]), "engine": engine}
