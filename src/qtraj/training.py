"""Train a small Llama-style model under one LR schedule, saving Hugging Face checkpoints along the way."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qtraj.checkpoints import CheckpointInfo, write_checkpoint_info
from qtraj.schedules import Schedule, lr_at, phase_at

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


def build_model(model_config: dict, vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, **model_config)
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
          checkpoint_dirs: dict[int, str | Path]) -> list[dict]:
    """Train and save a checkpoint folder after each step in `checkpoint_dirs`; returns the training log rows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = build_model(spec.model, len(tokenizer), spec.seed)
    model.train()
    optimizer = make_optimizer(model, spec.schedule.peak_lr, spec.weight_decay)
    stream = torch.from_numpy(train_tokens.astype(np.int64))
    generator = torch.Generator().manual_seed(spec.seed)
    tokens_per_step = spec.batch_size * spec.seq_len
    log_every = max(1, spec.schedule.total_steps // 100)
    rows, started = [], time.perf_counter()

    for step in range(1, spec.schedule.total_steps + 1):
        lr = lr_at(spec.schedule, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(stream, spec.seq_len, spec.batch_size, generator)
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
        if step % log_every == 0 or step == 1:
            rows.append({"run": spec.run, "step": step, "tokens": step * tokens_per_step, "lr": lr,
                         "train_loss": loss.item(), "elapsed_s": time.perf_counter() - started})
            log.info("run %s step %d lr %.3g loss %.4f", spec.run, step, lr, loss.item())
        if step in checkpoint_dirs:
            save_checkpoint(model, tokenizer_dir, checkpoint_dirs[step], CheckpointInfo(
                run=spec.run, checkpoint=Path(checkpoint_dirs[step]).name, step=step,
                tokens=step * tokens_per_step, lr=lr, phase=phase_at(spec.schedule, step), source="trained"))
    return rows


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
