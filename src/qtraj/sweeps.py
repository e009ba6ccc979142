"""Sweeps: a grid of trained runs described once (`sweeps:` in the config), expanded into named `runs`, each with
its constant-LR control branch from the decay start (`cooldowns`) and, if asked, its LAWA average (`averages`).

One grid point is a model (keys of `model` it overrides), a training length in tokens per parameter, a peak LR
and a seed. A run trains for its length in tokens divided by the tokens of a step, rounded up to a multiple of its
checkpoint count (its checkpoints then fall on exact fractions of training); its control branches at the schedule's
decay start, which the run saves as a checkpoint because a cooldown branches there (qtraj.sources.trained).
"""

from __future__ import annotations

import copy
import itertools
import math

from qtraj.checkpoints import checkpoint_name
from qtraj.resources import llama_parameters
from qtraj.schema import ConfigError

DEFAULT_MODEL_LABEL = "model"  # a sweep without `models` trains the config's `model` under this label
SECTIONS = ("runs", "cooldowns", "averages")  # what a sweep adds to, in the order expand_sweep returns them
FIXED_BY_THE_GRID = ("steps", "seed", "peak_lr")  # a sweep's `training` may not set what its grid does


def run_name(sweep: str, model: str, tokens_per_parameter: float, peak_lr: float, seed: int) -> str:
    """`<sweep>-<model>-tpp<t>-lr<lr>-s<seed>`: every grid coordinate readable in the name, hence in SQL."""
    return f"{sweep}-{model}-tpp{tokens_per_parameter:g}-lr{peak_lr:g}-s{seed}"


def steps_for(tokens_per_parameter: float, parameters: int, tokens_per_step: int, multiple: int) -> int:
    """The steps that train `parameters` on `tokens_per_parameter` tokens each, rounded up to `multiple`."""
    steps = math.ceil(tokens_per_parameter * parameters / tokens_per_step)
    return multiple * math.ceil(steps / multiple)


def expand_sweep(config: dict, name: str, sweep: dict) -> tuple[dict, dict, dict]:
    """The (runs, cooldowns, averages) entries of one sweep of a validated config."""
    from qtraj.config import make_schedule

    fixed = sorted(set(FIXED_BY_THE_GRID) & set(sweep["training"]))
    if fixed:
        raise ConfigError(f"config key 'sweeps.{name}.training': {', '.join(fixed)} come from the grid "
                          "(tokens_per_parameter, seeds, peak_lr); remove them there")
    training = {**config["training"], **sweep["training"]}
    if sweep["control"] and training["schedule"] != "wsd":
        raise ConfigError(f"config key 'sweeps.{name}.control': a constant-LR control branches at the decay start "
                          f"of a wsd schedule, and this grid's schedule is {training['schedule']!r}; set "
                          "`control: false` or `training: {schedule: wsd}`")
    models = sweep["models"] or {DEFAULT_MODEL_LABEL: {}}
    runs, cooldowns, averages = {}, {}, {}
    for (label, overrides), tokens_per_parameter, peak_lr, seed in itertools.product(
            models.items(), sweep["tokens_per_parameter"], sweep["peak_lr"] or [training["peak_lr"]], sweep["seeds"]):
        parameters = llama_parameters({**config["model"], **overrides}, config["tokenizer"]["vocab_size"])
        steps = steps_for(tokens_per_parameter, parameters, training["batch_size"] * training["seq_len"],
                          training["checkpoints"])
        run = run_name(name, label, tokens_per_parameter, peak_lr, seed)
        runs[run] = {**copy.deepcopy(sweep["training"]), "steps": steps, "peak_lr": peak_lr, "seed": seed,
                     **({"model": copy.deepcopy(overrides)} if overrides else {})}
        if sweep["control"]:
            decay_start = make_schedule({**training, "steps": steps, "peak_lr": peak_lr}).decay_start
            cooldowns[f"{run}-constant"] = {"from": run, "at": [decay_start], "length": steps - decay_start,
                                            "shape": "constant"}
        if sweep["lawa"]:
            averages[f"{run}-lawa"] = {"kind": "lawa", "of": run, "window": sweep["lawa"],
                                       "at": [checkpoint_name(steps)]}
    return runs, cooldowns, averages


def expand_sweeps(config: dict) -> dict:
    """`config` (validated) with every sweep's runs, controls and averages added to `runs`, `cooldowns` and
    `averages`. A name the config already has is refused unless it holds what the sweep would write (a config
    validated twice expands to itself): a sweep never overrides an entry written by hand."""
    for name, sweep in config.get("sweeps", {}).items():
        for section, entries in zip(SECTIONS, expand_sweep(config, name, sweep), strict=True):
            for entry_name, entry in entries.items():
                existing = config[section].get(entry_name)
                if existing is not None and any(existing.get(key) != value for key, value in entry.items()):
                    raise ConfigError(f"config key '{section}.{entry_name}': sweep {name!r} makes an entry of that "
                                      "name; rename the entry or the sweep")
                config[section].setdefault(entry_name, entry)
    return config
