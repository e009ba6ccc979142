"""What a checkpoint is to qtraj: a Hugging Face model folder plus one small metadata file.

Whatever made the folder (the trainer here, a hub download, a local path), it writes
`qtraj_checkpoint.json` beside the weights, so every downstream step reads step, tokens, LR and
phase the same way and never cares where the checkpoint came from.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

METADATA_FILE = "qtraj_checkpoint.json"
# Present in folders of families that need their repo's own code (written by the download step, copied along
# with the other non-weight files): loaders pass trust_remote_code only then.
REMOTE_CODE_MARKER = "qtraj_trust_remote_code"


def trusts_remote_code(folder: str | Path) -> bool:
    return Path(folder, REMOTE_CODE_MARKER).is_file()

# Files that hold weights; everything else in a checkpoint folder (config, tokenizer, qtraj metadata)
# is copied unchanged into a quantized model's folder.
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class CheckpointInfo:
    """What every result row says about its checkpoint: its fields are the checkpoint columns of every table
    (qtraj.results.CHECKPOINT_FIELDS types them from these annotations; a field is only ever added)."""

    run: str  # the trajectory (qtraj.sources)
    checkpoint: str  # step000800 for trained runs, the revision name for hub checkpoints
    step: int | None  # None where a revision does not say (e.g. a final `main` soup)
    tokens: int | None
    lr: float | None
    phase: str | None  # warmup / stable / decay / anneal / post-training; None where no schedule is known
    source: str  # its source's `column`: "trained", "cooldown", "averaged", "hub", "local" or a plugin source's
    repo: str | None = None  # hub checkpoints: repo id, revision and the commit it resolved to
    revision: str | None = None
    commit: str | None = None
    # what it derives from: a cooldown's branch point; an average's newest checkpoint (a soup's last ingredient)
    parent_run: str | None = None
    parent_checkpoint: str | None = None
    path: str | None = None  # local checkpoints: the folder they were read from
    fingerprint: str | None = None  # local checkpoints: their files' content (qtraj.fingerprint)


def checkpoint_name(step: int) -> str:
    """The slug of a trained checkpoint: zero-padded so names sort in training order."""
    return f"step{step:06d}"


def write_checkpoint_info(folder: str | Path, info: CheckpointInfo) -> None:
    path = Path(folder, METADATA_FILE)
    if path.is_symlink():  # never write through a link into a hub cache or someone's checkpoint folder
        path.unlink()
    path.write_text(json.dumps(asdict(info), indent=2) + "\n")


def read_checkpoint_info(folder: str | Path) -> CheckpointInfo:
    path = Path(folder, METADATA_FILE)
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a qtraj checkpoint: {METADATA_FILE} is missing. Checkpoints must come from the "
            "pipeline (training or download rule); delete the folder and rerun so it is rebuilt"
        )
    return CheckpointInfo(**json.loads(path.read_text()))


def evenly_spaced_steps(total_steps: int, count: int) -> list[int]:
    """`count` checkpoint steps spread evenly over training, ending with the final step."""
    if not 1 <= count <= total_steps:
        raise ValueError(f"cannot save {count} checkpoints in {total_steps} steps")
    return sorted({round(total_steps * index / count) for index in range(1, count + 1)})


# Optimizer and data-order state of a trained checkpoint that a cooldown branches from (qtraj.training); not part
# of the model, so never copied along with its config and tokenizer.
TRAINING_STATE_FILE = "training_state.pt"


def copy_non_weight_files(checkpoint_dir: str | Path, out_dir: str | Path) -> None:
    """Config, tokenizer and qtraj metadata of a checkpoint folder, without its weights."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for item in Path(checkpoint_dir).iterdir():
        is_weights = (item.suffix in WEIGHT_FILE_SUFFIXES or item.name in WEIGHT_INDEX_FILES
                      or item.name == TRAINING_STATE_FILE)
        if item.is_file() and not is_weights:
            shutil.copy2(item, out_dir / item.name)
