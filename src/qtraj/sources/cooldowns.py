"""Cooldown branches (config `cooldowns`): each branch resumes a trained run at a stable-phase checkpoint and decays
the LR (rules/cooldown.smk); one trajectory whose checkpoints are the branches' ends."""

from __future__ import annotations

from qtraj.checkpoints import checkpoint_name
from qtraj.config import ConfigError, make_schedule, run_settings
from qtraj.jobs import Job
from qtraj.sources.base import Source, register_source


def cooldown_branches(config: dict, name: str) -> dict[str, int]:
    """Checkpoint name of each branch's end -> the step of the run it branched from."""
    spec = config["cooldowns"][name]
    return {checkpoint_name(step + spec["length"]): step for step in sorted(spec["at"])}


@register_source
class Cooldowns(Source):
    key = "cooldowns"
    kind = "cooldown"
    noun = "a cooldown"
    column = "cooldown"
    order = 40
    derived = True
    makes = "cooldown"
    rules = "cooldown.smk"

    def checkpoints(self, name: str) -> list[str]:
        return list(cooldown_branches(self.config, name))

    def parent(self, name: str) -> str:
        """The trained run that the branches of `name` resume."""
        return self.entry(name)["from"]

    def parent_checkpoint(self, name: str, checkpoint: str) -> tuple[str, str]:
        """(run, checkpoint) that the branch of `name` ending at `checkpoint` resumes: the parent run's checkpoint
        at the branch step, saved with its training state (qtraj.sources.trained.branch_steps)."""
        return self.parent(name), checkpoint_name(cooldown_branches(self.config, name)[checkpoint])

    def data_source(self, name: str) -> str:
        return self.parent(name)

    def check(self) -> None:
        runs = self.config["runs"]
        for name, spec in self.config["cooldowns"].items():
            where = f"config key 'cooldowns.{name}"
            if spec["from"] not in runs:
                raise ConfigError(f"{where}.from': {spec['from']!r} is not a trained run of this config; cooldowns "
                                  f"resume runs trained here (known: {', '.join(sorted(runs)) or 'none'})")
            schedule = make_schedule(run_settings(self.config, spec["from"]))
            for step in spec["at"]:
                if step > schedule.decay_start:
                    raise ConfigError(f"{where}.at': step {step} is past the stable phase of {spec['from']!r} (its "
                                      f"decay starts after step {schedule.decay_start}); branch at or before it")

    def making_jobs(self, name: str) -> list[Job]:
        return [Job("cooldown", name, checkpoint) for checkpoint in self.checkpoints(name)]
