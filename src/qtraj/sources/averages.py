"""Averaged checkpoints (config `averages`): LAWA / EMA windows over a trajectory and soups across trajectories,
written as ordinary checkpoint folders (rules/average.smk, qtraj.averaging)."""

from __future__ import annotations

from qtraj.config import ConfigError
from qtraj.sources.base import Source, register_source


def averaging_plan_of(config: dict, name: str) -> dict:
    """Averaged checkpoint name -> ((trajectory, checkpoint) sources, weights) of average `name`."""
    from qtraj.averaging import averaging_plan
    from qtraj.sources import source_of

    spec = config["averages"][name]
    sources = source_of(config, spec["of"]).averaged_checkpoints(spec["of"]) if isinstance(spec["of"], str) else []
    return averaging_plan(spec, sources)


@register_source
class Averages(Source):
    key = "averages"
    kind = "average"
    noun = "an average"
    column = "averaged"
    order = 50
    derived = True
    makes = "average_checkpoints"
    rules = "average.smk"

    def checkpoints(self, name: str) -> list[str]:
        """Named after its newest source checkpoint, or `soup`."""
        return list(averaging_plan_of(self.config, name))

    def data_source(self, name: str) -> str:
        """The trajectory whose text and model an average uses: its source's (a soup's first ingredient's)."""
        from qtraj.config import data_source

        of = self.entry(name)["of"]
        return data_source(self.config, of if isinstance(of, str) else of[0].split("/", 1)[0])

    def check(self) -> None:
        from qtraj.sources import source_of, sources

        averaged = {name: source for source in sources(self.config) if source.key != self.key
                    for name in source.names()}
        for name, spec in self.config["averages"].items():
            where = f"config key 'averages.{name}"
            if spec["kind"] == "soup":
                if isinstance(spec["of"], str):
                    raise ConfigError(f"{where}.of': a soup lists trajectory/checkpoint entries, e.g. [a/step000800, "
                                      "b/step000800]")
                for entry in spec["of"]:
                    trajectory, checkpoint = entry.split("/", 1)
                    if trajectory not in averaged or checkpoint not in averaged[trajectory].checkpoints(trajectory):
                        raise ConfigError(f"{where}.of': {entry!r} is not a checkpoint of a run or family of this "
                                          "config")
                continue
            if not isinstance(spec["of"], str) or spec["of"] not in averaged:
                raise ConfigError(f"{where}.of': {spec['of']!r} is not a run or family of this config; known: "
                                  f"{', '.join(sorted(averaged))}")
            available = source_of(self.config, spec["of"]).averaged_checkpoints(spec["of"])
            if spec["window"] > len(available):
                raise ConfigError(f"{where}.window': {spec['window']} is more than the {len(available)} checkpoints "
                                  f"of {spec['of']!r}")
            ends = available[spec["window"] - 1 :]
            for end in spec["at"] or []:
                if end not in ends:
                    raise ConfigError(f"{where}.at': {end!r} is not a checkpoint of {spec['of']!r} that a window of "
                                      f"{spec['window']} can end at; those are: {', '.join(ends)}")
