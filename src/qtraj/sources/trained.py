"""Runs trained here (config `runs`): one training job per run saves all its checkpoints (rules/train.smk)."""

from __future__ import annotations

from qtraj.checkpoints import checkpoint_name, evenly_spaced_steps
from qtraj.config import ConfigError, run_model, run_settings
from qtraj.jobs import Job
from qtraj.resources import ModelShape, llama_parameters
from qtraj.sources.base import Source, register_source

# The model class of the micro models trained here (qtraj.training builds a LlamaForCausalLM).
TRAINED_ARCHITECTURE = "LlamaForCausalLM"


def branch_steps(config: dict, run: str) -> list[int]:
    """Steps of a trained run that cooldowns branch from: saved as checkpoints, with training state."""
    return sorted({step for spec in config["cooldowns"].values() if spec["from"] == run for step in spec["at"]})


def checkpoint_steps(config: dict, run: str) -> list[int]:
    """The steps a trained run saves: `checkpoints` evenly spaced ones plus its cooldowns' branch points."""
    settings = run_settings(config, run)
    return sorted(set(evenly_spaced_steps(settings["steps"], settings["checkpoints"])) | set(branch_steps(config, run)))


@register_source
class TrainedRuns(Source):
    key = "runs"
    kind = "trained"
    noun = "a trained run"
    description = "models trained here"
    column = "trained"
    order = 10
    makes = "train"
    rules = "train.smk"

    def checkpoints(self, name: str) -> list[str]:
        return [checkpoint_name(step) for step in checkpoint_steps(self.config, name)]

    def averaged_checkpoints(self, name: str) -> list[str]:
        """Its evenly spaced checkpoints: a cooldown's branch point in between would otherwise change what a
        window averages."""
        settings = run_settings(self.config, name)
        return [checkpoint_name(step) for step in evenly_spaced_steps(settings["steps"], settings["checkpoints"])]

    def check(self) -> None:
        from qtraj.config import load_schema
        from qtraj.schema import validate_against

        schema = load_schema()
        for run in self.names():
            validate_against(run_settings(self.config, run), schema["$defs"]["training"], ("runs", run))
            validate_against(run_model(self.config, run), schema["properties"]["model"], ("runs", run, "model"))
            settings = run_settings(self.config, run)
            if settings["checkpoints"] > settings["steps"]:
                key = "checkpoints" if "checkpoints" in self.config["runs"][run] else "training.checkpoints"
                where = f"runs.{run}.checkpoints" if key == "checkpoints" else key
                raise ConfigError(f"config key '{where}': {settings['checkpoints']} checkpoints cannot be saved in "
                                  f"{settings['steps']} steps (run {run!r}); save at most one per step")
        self._check_group_sizes()

    def _check_group_sizes(self) -> None:
        """The trained models' sizes are in the config: a group size that does not divide a linear layer's input
        features fails here rather than in the first quantize job."""
        from qtraj.methods import discover

        if not self.names():
            return
        methods = discover()
        widths = {}
        for run in self.names():
            model, own = run_model(self.config, run), "model" in self.config["runs"][run]
            for key in ("hidden_size", "intermediate_size"):
                widths.setdefault(f"runs.{run}.model.{key}" if own else f"model.{key}", model[key])
        for name, entry in self.config["quantizations"].items():
            group = entry["group_size"]
            if entry["method"] in methods and not methods[entry["method"]].groups_along_inputs:
                continue
            for key, width in widths.items():
                if group is not None and width % group:
                    raise ConfigError(f"config key 'quantizations.{name}.group_size': {group} does not divide the "
                                      f"trained models' {key} {width}, which a linear layer takes as input features; "
                                      "choose a divisor (or null for one scale per output channel)")

    def architecture(self, name: str) -> str | None:
        return TRAINED_ARCHITECTURE

    def parameters(self, name: str) -> float | None:
        """A trained model's count when `resources.trained_on_gpu`; None keeps the micro models on the CPU."""
        if self.config["resources"]["trained_on_gpu"]:
            return llama_parameters(run_model(self.config, name), self.config["tokenizer"]["vocab_size"])
        return None

    def shape(self, name: str) -> ModelShape:
        model, vocab_size = run_model(self.config, name), self.config["tokenizer"]["vocab_size"]
        return ModelShape(llama_parameters(model, vocab_size), model["hidden_size"], model["intermediate_size"],
                          model["num_hidden_layers"], vocab_size)

    def making_jobs(self, name: str) -> list[Job]:
        return [Job("train", name)]
