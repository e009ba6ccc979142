"""Hub families (config `families`): one family file per model family (qtraj.families), whose selected revisions are
downloaded from the Hugging Face hub, or linked from its local cache (rules/hub.smk, qtraj.hub), and evaluated on
the hub text (`hub_data`)."""

from __future__ import annotations

from qtraj.families import checkpoint_source, configured_family, selected_revisions
from qtraj.resources import ModelShape, estimated_shape
from qtraj.sources.base import Source, register_source


@register_source
class Families(Source):
    key = "families"
    kind = "family"
    noun = "a family"
    description = "hub checkpoints"
    column = "hub"
    order = 20
    external = True
    makes = "download_checkpoint"
    rules = "hub.smk"

    def checkpoints(self, name: str) -> list[str]:
        return [revision.revision for revision in selected_revisions(self.config, name)]

    def check(self) -> None:
        for name in self.names():
            selected_revisions(self.config, name)  # loads and validates the family file, resolves the selector

    def text(self, name: str) -> str:
        return "hub"

    def architecture(self, name: str) -> str | None:
        return configured_family(self.config, name)["architecture"] or None

    def parameters(self, name: str) -> float | None:
        return configured_family(self.config, name)["parameters"]

    def shape(self, name: str) -> ModelShape | None:
        """Estimated from the family's parameter count (a family file gives no widths)."""
        parameters = self.parameters(name)
        return None if parameters is None else estimated_shape(parameters)

    def download_params(self, name: str, checkpoint: str) -> dict:
        """The params of one revision's download job (qtraj.families.checkpoint_source)."""
        return checkpoint_source(self.config, name, checkpoint)

    def tokenizer_params(self, name: str) -> dict:
        """Where a family's tokenizer comes from: the repo the family file names, else (revision None) the first
        selected revision's own, which the job looks up itself (`steps.download_tokenizer`), so that selecting
        other revisions never changes these params and reruns the family."""
        family = configured_family(self.config, name)
        source = family["tokenizer"] or {"repo": family["repo"], "revision": None}
        return {**source, "trust_remote_code": family["trust_remote_code"], "gated": family["gated"]}
