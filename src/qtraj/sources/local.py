"""Local trajectories (config `local`): checkpoint folders on disk, a researcher's own training run, read in place
(qtraj.local finds them; rules/local.smk links each into the results tree)."""

from __future__ import annotations

from qtraj.checkpoints import CheckpointInfo
from qtraj.families import Revision
from qtraj.local import checkpoint_info, selected_checkpoints
from qtraj.sources.base import register_source
from qtraj.sources.folder import FolderSource


@register_source
class LocalFolders(FolderSource):
    key = "local"
    kind = "local"
    noun = "a local trajectory"
    description = "checkpoint folders on disk"
    column = "local"
    order = 30

    def revisions(self, name: str) -> list[Revision]:
        return selected_checkpoints(self.config, name)

    def checkpoint_folder(self, name: str, checkpoint: str) -> str:
        return f"{self.entry(name)['path']}/{checkpoint}"

    def checkpoint_info(self, name: str, checkpoint: str) -> CheckpointInfo:
        """Step and tokens as found, LR and phase from the entry's `schedule`."""
        return checkpoint_info(name, self.entry(name), self.revision(name, checkpoint))
