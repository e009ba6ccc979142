"""The interface every checkpoint source implements, and the registry that finds them.

A source is one kind of trajectory: the runs trained here, their cooldown branches, averages of checkpoints, hub
families, checkpoint folders on disk, or anything a user adds (a trainer's own layout, an artifact store). It owns
one config key, names the trajectories its entries make, lists their checkpoints, says what sizes their jobs and
what text they are evaluated on, and which job kind makes a checkpoint folder. The config validation, the DAG
(rules/common.smk), `qtraj plan` and `qtraj status` loop over the registered sources and never ask which kind a
trajectory is.

Nothing here imports torch: Snakemake builds the DAG from these classes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from qtraj.jobs import Job
    from qtraj.resources import ModelShape

SOURCES: dict[str, type[Source]] = {}  # config key -> source class


def register_source(cls: type[Source]) -> type[Source]:
    """Class decorator: make `cls` the source of its config key `cls.key`."""
    if not cls.key:
        raise TypeError(f"{cls.__name__} declares no config key (`key = ...`)")
    SOURCES[cls.key] = cls
    return cls


class Source:
    """One kind of trajectory, bound to a (validated) config.

    Subclasses set the class attributes and implement `checkpoints`; the other methods have the defaults of a
    source whose checkpoints are made elsewhere with nothing known about their model."""

    key: ClassVar[str] = ""  # its config key: `<key>.<name>` is one trajectory
    kind: ClassVar[str] = ""  # what `qtraj status` calls its trajectories
    noun: ClassVar[str] = ""  # one of its trajectories in an error message ("a trained run")
    description: ClassVar[str] = ""  # what its entries are, where the config has no trajectory ("models trained here")
    column: ClassVar[str] = ""  # the `source` column of its checkpoints' rows (qtraj.checkpoints.CheckpointInfo)
    order: ClassVar[int] = 35  # where its trajectories come among all (the `run` order of plan, status and figures)
    external: ClassVar[bool] = False  # made elsewhere: its own tokenizer, `sharpness.families`, the pretrained checks
    derived: ClassVar[bool] = False  # made from other trajectories' checkpoints: drawn in their figure
    links_folders: ClassVar[bool] = False  # folders on disk, linked by rules/local.smk (qtraj.sources.folder)
    makes: ClassVar[str | None] = None  # the job kind (qtraj.jobs.JOB_KINDS) that makes one checkpoint folder
    rules: ClassVar[str | None] = None  # its rules file: a name in rules/, or a path (None: rules of another)
    # the JSON schema of its config key; None for the built-in sources, whose keys config.schema.yaml declares
    config_schema: ClassVar[dict | None] = None

    def __init__(self, config: dict):
        self.config = config

    def names(self) -> list[str]:
        """Its trajectories, in the config's order."""
        return list(self.config.get(self.key) or {})

    def entry(self, name: str) -> dict:
        return self.config[self.key][name]

    def checkpoints(self, name: str) -> list[str]:
        """Checkpoint names of trajectory `name`, in training order."""
        raise NotImplementedError

    def check(self) -> None:
        """Refuse what the schema cannot, before any job runs (ConfigError naming the key and the fix)."""

    def data_source(self, name: str) -> str:
        """The trajectory whose text and model size `name` uses: itself, unless derived from another."""
        return name

    def text(self, name: str) -> str:
        """The text `name` is evaluated on: `corpus` (the carried corpus's splits) or `hub` (hub_data)."""
        return "corpus"

    def architecture(self, name: str) -> str | None:
        """Its model class as far as it is known before any job runs (None: unknown)."""
        return None

    def parameters(self, name: str) -> float | None:
        """The parameter count that sizes its jobs for a GPU; None: CPU jobs, or unknown until a rule makes it."""
        return None

    def shape(self, name: str) -> ModelShape | None:
        """What sizes the memory its jobs hold beyond the weights (None: unknown)."""
        return None

    def averaged_checkpoints(self, name: str) -> list[str]:
        """The checkpoints a LAWA / EMA window over `name` runs over."""
        return self.checkpoints(name)

    def making_jobs(self, name: str) -> list[Job]:
        """The sized jobs (qtraj.jobs.SIZED_KINDS) that make its checkpoints; none where the job asks for no GPU."""
        return []

    def making_log(self, name: str, checkpoint: str) -> str | None:
        """The log of the job that makes checkpoint `checkpoint` of `name` (relative to the results folder)."""
        from qtraj.jobs import Job

        return Job(self.makes, name, checkpoint).log() if self.makes else None

    def made_folders(self) -> list[str]:
        """Folders outside the results folder that its rules write whole (Snakemake deletes one before rerunning
        its job, so foreign files in it are refused first)."""
        return []

    def made_folder_globs(self) -> list[str]:
        """Globs that every folder its rules write outside the results folder matches (qtraj.ownership)."""
        return []
