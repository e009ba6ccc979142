"""A checkpoint source added from one file, as a user adds one: trajectories of checkpoint folders listed in a CSV
manifest (`checkpoint,folder,step,tokens`; folders relative to the manifest). A config names this file under
`source_plugins` and its trajectories under `manifests:`; tests/test_sources.py runs it through the workflow."""

from __future__ import annotations

import csv
from pathlib import Path

from qtraj.families import Revision
from qtraj.sources import register_source
from qtraj.sources.folder import FolderSource


@register_source
class Manifests(FolderSource):
    key = "manifests"
    kind = "manifest"
    noun = "a manifest"
    column = "manifest"
    config_schema = {
        "description": "trajectories of checkpoint folders listed in a CSV file: checkpoint, folder, step, tokens",
        "type": "object",
        "default": {},
        "additionalProperties": {
            "type": "object",
            "additionalProperties": False,
            "required": ["csv"],
            "properties": {"csv": {"type": "string"}, "tokenizer": {"type": ["string", "null"], "default": None}},
        },
    }

    def rows(self, name: str) -> dict[str, dict]:
        with Path(self.entry(name)["csv"]).open(newline="") as handle:
            return {row["checkpoint"]: row for row in csv.DictReader(handle)}

    def revisions(self, name: str) -> list[Revision]:
        found = [Revision(checkpoint, int(row["step"]), int(row["tokens"]) if row["tokens"] else None, "pretraining")
                 for checkpoint, row in self.rows(name).items()]
        return sorted(found, key=lambda revision: revision.step)

    def checkpoint_folder(self, name: str, checkpoint: str) -> str:
        return str(Path(self.entry(name)["csv"]).parent / self.rows(name)[checkpoint]["folder"])
