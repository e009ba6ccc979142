"""Train a small Llama-style model under one LR schedule, saving Hugging Face checkpoints along the way."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qtraj.checkpoints import (
    TRAINING_STATE_FILE,
    CheckpointInfo,
    copy_non_weight_files,
    read_checkpoint_info,
    write_checkpoint_info,
)
from qtraj.evaluation import check_finite_weights, check_loading_info, pick_device
from qtraj.joblog import format_duration, remaining_seconds
from qtraj.schedules import Schedule, decayed_lr, lr_at, phase_at

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss stopped being finite: nothing after this point would be meaningful."""


@dataclass(frozen=True)
class TrainingSpec:
    run: str
    model: dict  # LlamaConfig keyword arguments (vocab size is taken from the tokenizer)
    schedule: Schedule
    seq_len: int
    batch_size: int
    weight_decay: float
    grad_clip: float
    seed: int


def build_model(model_config: dict, tokenizer, seed: int):
    """A fresh Llama for `tokenizer`: its vocabulary and its own bos / eos ids (LlamaConfig's defaults, 1 and 2,
    are ordinary tokens of qtraj's BPE and would be saved into config.json and generation_config.json)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **model_config)
    return LlamaForCausalLM(config)


def sample_batch(stream: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """`batch_size` random windows of seq_len + 1 tokens; the same seed gives every run the same data order."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=generator)
    return torch.stack([stream[start : start + seq_len + 1] for start in starts.tolist()])


def make_optimizer(model: torch.nn.Module, peak_lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # Decay matrices only; norms and biases are left alone, as in the paper's 160M runs (GPT-NeoX / OLMo).
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    others = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=peak_lr, betas=(0.9, 0.95), eps=1e-8)


def train(spec: TrainingSpec, train_tokens: np.ndarray, tokenizer_dir: str | Path,
          checkpoint_dirs: dict[int, str | Path], resume_steps: Iterable[int] = ()) -> list[dict]:
    """Train and save a checkpoint folder after each step in `checkpoint_dirs`; returns the training log rows.

    At `resume_steps` the folder also gets the optimizer and data-order state, so a cooldown can branch there.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_model(spec.model, tokenizer, spec.seed).to(pick_device())
    optimizer = make_optimizer(model, spec.schedule.peak_lr, spec.weight_decay)
    generator = torch.Generator().manual_seed(spec.seed)
    tokens_per_step = spec.batch_size * spec.seq_len
    resume_steps = set(resume_steps)

    def save(step: int, lr: float) -> None:
        if step not in checkpoint_dirs:
            return
        save_checkpoint(model, tokenizer_dir, checkpoint_dirs[step], CheckpointInfo(
            run=spec.run, checkpoint=Path(checkpoint_dirs[step]).name, step=step,
            tokens=step * tokens_per_step, lr=lr, phase=phase_at(spec.schedule, step), source="trained"))
        if step in resume_steps:
            save_training_state(checkpoint_dirs[step], optimizer, generator, step)

    lrs = {step: lr_at(spec.schedule, step) for step in range(1, spec.schedule.total_steps + 1)}
    return _train_steps(spec, model, optimizer, generator, train_tokens, lrs, save)


def cool_down(spec: TrainingSpec, parent_dir: str | Path, train_tokens: np.ndarray, length: int, shape: str,
              final_lr: float, out_dir: str | Path) -> list[dict]:
    """Resume a run from a checkpoint saved with its training state (`train(resume_steps=...)`) and decay the LR
    from the one at the branch to `final_lr` over `length` steps: the paper's cooldowns branched from stable-phase
    checkpoints (shape `constant`: no decay, the control at equal tokens). Weights, AdamW moments and the data order
    continue exactly where the run was; the checkpoint after the last step is saved to `out_dir` (phase decay, or
    stable for a constant branch; parent = the branch point)."""
    from transformers import AutoModelForCausalLM

    parent = read_checkpoint_info(parent_dir)
    state_file = Path(parent_dir) / TRAINING_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(
            f"{parent_dir} has no {TRAINING_STATE_FILE}: a cooldown can only branch from a checkpoint its run "
            "saved with training state. Delete the run's checkpoints and rerun its training job (the config's "
            "cooldowns make it save the state at every branch step)")
    device = pick_device()
    # on the CPU: load_state_dict moves the moments to the parameters' device and keeps AdamW's step counters
    # on the CPU, where it expects them
    state = torch.load(state_file, weights_only=True, map_location="cpu")
    model, loading = AutoModelForCausalLM.from_pretrained(str(parent_dir), dtype=torch.float32,
                                                          output_loading_info=True)
    check_loading_info(parent_dir, loading)  # a branch resumed from half-initialised weights would train on quietly
    check_finite_weights(parent_dir, model.state_dict())
    model = model.to(device)
    optimizer = make_optimizer(model, parent.lr or spec.schedule.peak_lr, spec.weight_decay)
    optimizer.load_state_dict(state["optimizer"])
    generator = torch.Generator()  # data order is drawn on the CPU, whatever the model's device
    generator.set_state(state["generator"])
    start, start_lr = int(state["step"]), parent.lr
    end = start + length

    def save(step: int, lr: float) -> None:
        if step == end:
            copy_non_weight_files(parent_dir, out_dir)  # config and tokenizer; not the parent's weights or state
            model.save_pretrained(str(out_dir), safe_serialization=True)
            write_checkpoint_info(out_dir, CheckpointInfo(
                run=spec.run, checkpoint=Path(out_dir).name, step=step, tokens=step * spec.batch_size * spec.seq_len,
                lr=lr, phase="stable" if shape == "constant" else "decay", source="cooldown", parent_run=parent.run,
                parent_checkpoint=parent.checkpoint))

    lrs = {start + k: decayed_lr(start_lr, final_lr, k / length, shape) for k in range(1, length + 1)}
    rows = _train_steps(spec, model, optimizer, generator, train_tokens, lrs, save)
    return [{**row, "parent_run": parent.run, "parent_checkpoint": parent.checkpoint} for row in rows]


def is_logged(step: int, index: int, steps: int) -> bool:
    """Whether the `index`-th of `steps` training steps (step number `step`) gets a training-log row: about 100 per
    run, the first and the last included (where the run ends: its last tokens)."""
    return step % max(1, steps // 100) == 0 or index in (0, steps - 1)


def _train_steps(spec: TrainingSpec, model, optimizer, generator: torch.Generator, train_tokens: np.ndarray,
                 lrs: dict[int, float], save) -> list[dict]:
    """The training loop over the steps of `lrs` (step -> LR), calling `save(step, lr)` after each update."""
    model.train()
    device = next(model.parameters()).device
    stream = torch.from_numpy(train_tokens.astype(np.int64))
    tokens_per_step = spec.batch_size * spec.seq_len
    rows, started = [], time.perf_counter()
    for index, (step, lr) in enumerate(sorted(lrs.items())):
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(stream, spec.seq_len, spec.batch_size, generator).to(device)
        # bf16 autocast on GPUs (fp32 master weights and optimizer); CPU runs stay in fp32, bit-reproducible
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = _next_token_loss(model, batch)
        if not math.isfinite(loss.item()):
            raise TrainingDivergedError(
                f"run {spec.run!r}: training loss became {loss.item()} at step {step} (lr={lr:.3g}). "
                "Lower training.peak_lr, lengthen warmup or tighten grad_clip for this run, then rerun; "
                "the other runs' results are unaffected"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        optimizer.step()
        if is_logged(step, index, len(lrs)):
            elapsed = time.perf_counter() - started
            rows.append({"run": spec.run, "step": step, "tokens": step * tokens_per_step, "lr": lr,
                         "train_loss": loss.item(), "elapsed_s": elapsed, "parameters": model.num_parameters()})
            log.info("run %s step %d lr %.3g loss %.4f (%d/%d steps, %s left)", spec.run, step, lr, loss.item(),
                     index + 1, len(lrs), format_duration(remaining_seconds(elapsed, index + 1, len(lrs))))
        save(step, lr)
    return rows


def save_training_state(folder: str | Path, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                        step: int) -> None:
    torch.save({"optimizer": optimizer.state_dict(), "generator": generator.get_state(), "step": step},
               Path(folder) / TRAINING_STATE_FILE)


def _next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def save_checkpoint(model, tokenizer_dir: str | Path, folder: str | Path, info: CheckpointInfo) -> None:
    """A complete Hugging Face model folder: safetensors weights, config, tokenizer, and qtraj's metadata."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    for item in Path(tokenizer_dir).iterdir():
        if item.is_file():
            shutil.copy2(item, folder / item.name)
    write_checkpoint_info(folder, info)
