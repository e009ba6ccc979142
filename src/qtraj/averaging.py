"""Weight averaging as derived checkpoints: LAWA (uniform average of the last k checkpoints), EMA over saved
checkpoints, and model soups across trajectories. An averaged checkpoint is an ordinary model folder, so it flows
through the same quantize / evaluate jobs as any other.

Written here because averaging a handful of Hugging Face folders is a few lines over safetensors; the tools that
do model merging (e.g. mergekit) bring their own config language and dependency stack for far more than this.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from qtraj.checkpoints import CheckpointInfo, copy_non_weight_files, read_checkpoint_info, write_checkpoint_info


def lawa_weights(count: int) -> list[float]:
    """LAWA (Kaddour 2022; Sanyal et al. 2023): every checkpoint of the window counts the same."""
    return [1.0 / count] * count


def ema_weights(count: int, decay: float) -> list[float]:
    """An exponential moving average over the window, oldest first: each older checkpoint weighs `decay` times
    the next one; normalised to sum to one."""
    raw = [decay ** (count - 1 - index) for index in range(count)]
    return [value / sum(raw) for value in raw]


SOUP_CHECKPOINT = "soup"


def averaging_plan(spec: dict, source_checkpoints: list[str]) -> dict[str, tuple[list[tuple[str, str]], list[float]]]:
    """Averaged checkpoint name -> ((trajectory, checkpoint) sources, weights).

    lawa / ema over trajectory `of`: one average per window of `window` consecutive checkpoints, named after the
    newest of them, so it lines up with it in every table (the first window - 1 checkpoints get none); with `at`,
    only the windows ending at those checkpoints.
    soup: one checkpoint, `soup`, the uniform average of the `trajectory/checkpoint` entries of `of`.
    """
    if spec["kind"] == "soup":
        sources = [tuple(entry.split("/", 1)) for entry in spec["of"]]
        return {SOUP_CHECKPOINT: (sources, lawa_weights(len(sources)))}
    window, wanted = spec["window"], spec.get("at")
    plan = {}
    for end in range(window - 1, len(source_checkpoints)):
        if wanted is not None and source_checkpoints[end] not in wanted:
            continue
        names = [(spec["of"], name) for name in source_checkpoints[end - window + 1 : end + 1]]
        weights = lawa_weights(window) if spec["kind"] == "lawa" else ema_weights(window, spec["decay"])
        plan[source_checkpoints[end]] = (names, weights)
    return plan


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from qtraj.evaluation import check_finite_weights

    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    state = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{folder} has no {name}: averaging needs safetensors checkpoints")
        state.update(load_file(str(path)))
    check_finite_weights(folder, state)  # an average of a NaN checkpoint would be NaN, and rebuilt so forever
    return state


def average_checkpoints(folders: list[str | Path], weights: list[float], out_dir: str | Path, run: str,
                        checkpoint: str) -> CheckpointInfo:
    """Write the weighted average of `folders` (same architecture) as a checkpoint folder of trajectory `run`.

    Sums run in float64, one checkpoint in memory besides the running sum; the result keeps the dtype of the
    newest checkpoint, whose config, tokenizer and metadata (step, tokens, LR, phase) it also takes.
    """
    from huggingface_hub import save_torch_state_dict

    if len(folders) != len(weights) or not folders:
        raise ValueError("averaging needs one weight per checkpoint and at least one checkpoint")
    folders = [Path(folder) for folder in folders]
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for folder, weight in zip(folders, weights, strict=True):
        state = _load_weights(folder)
        if total and state.keys() != total.keys():
            raise ValueError(f"{folder} has other tensors than {folders[0]}: only checkpoints of one architecture "
                             "can be averaged")
        for key, tensor in state.items():
            if key in total and tensor.shape != total[key].shape:
                raise ValueError(f"{key} has shape {tuple(tensor.shape)} in {folder} but {tuple(total[key].shape)} "
                                 "before it")
            total[key] = total.get(key, 0) + weight * tensor.double()
            dtypes[key] = tensor.dtype
    out_dir = Path(out_dir)
    copy_non_weight_files(folders[-1], out_dir)
    save_torch_state_dict({key: value.to(dtypes[key]).contiguous() for key, value in total.items()}, str(out_dir))
    newest = read_checkpoint_info(folders[-1])
    info = replace(newest, run=run, checkpoint=checkpoint, source="averaged", parent_run=newest.run,
                   parent_checkpoint=newest.checkpoint)
    write_checkpoint_info(out_dir, info)
    return info
