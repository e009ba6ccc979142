"""Learning-rate schedules and the training phase they put a step in.

Pure functions of (schedule, step): the trainer uses them to set the LR, and every result row uses
them to say which phase its checkpoint came from, so both always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULE_KINDS = ("cosine", "wsd", "linear", "constant")
PHASES = ("warmup", "stable", "decay", "anneal", "post-training")


@dataclass(frozen=True)
class Schedule:
    """An LR schedule over `total_steps` optimizer steps.

    kind: cosine (decay right after warmup), wsd (warmup-stable-decay: constant, then a decay over the last
    `decay_fraction` of training), linear (linear decay right after warmup), constant.
    The LR ends at `peak_lr * final_lr_fraction`. `decay_shape` is the shape of a wsd decay: linear, or 1-sqrt
    (Megatron-LM's `minus_sqrt`, which Apertus used); linear is what every schedule had before the option existed.
    """

    kind: str
    peak_lr: float
    total_steps: int
    warmup_steps: int
    decay_fraction: float = 0.2
    final_lr_fraction: float = 0.0
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"schedule kind {self.kind!r} is unknown; known kinds: {', '.join(SCHEDULE_KINDS)}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps} must be >= 0 and below total_steps={self.total_steps}"
            )
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} must be in (0, 1]")
        if self.decay_shape not in WSD_DECAY_SHAPES:
            raise ValueError(f"decay_shape {self.decay_shape!r} is unknown; known shapes: "
                             f"{', '.join(WSD_DECAY_SHAPES)}")
        # cosine and linear schedules name their decay by their kind; a second name for it could only contradict it
        if self.decay_shape != "linear" and self.kind != "wsd":
            raise ValueError(f"decay_shape {self.decay_shape!r} applies to a wsd schedule only, not to {self.kind!r}: "
                             "drop decay_shape or make the schedule wsd")

    @property
    def decay_start(self) -> int:
        """The last step before the LR starts to fall (the end of warmup or of the stable phase)."""
        if self.kind in ("cosine", "linear"):
            return self.warmup_steps
        if self.kind == "wsd":
            return max(self.warmup_steps, self.total_steps - round(self.decay_fraction * self.total_steps))
        return self.total_steps  # constant: never decays


def lr_at(schedule: Schedule, step: int) -> float:
    """The LR used for optimizer step `step` (1-based: step 1 is the first update)."""
    peak, final = schedule.peak_lr, schedule.peak_lr * schedule.final_lr_fraction
    if schedule.warmup_steps and step <= schedule.warmup_steps:
        return peak * step / schedule.warmup_steps
    start = schedule.decay_start
    if step <= start:
        return peak
    progress = min(1.0, (step - start) / max(1, schedule.total_steps - start))
    return decayed_lr(peak, final, progress, "cosine" if schedule.kind == "cosine" else schedule.decay_shape)


# the shapes a wsd schedule's decay may take (`decay_shape`; family files list the same in their schema)
WSD_DECAY_SHAPES = ("linear", "1-sqrt")
# every shape `decayed_lr` knows: the decays of schedules, and those of a branch resumed from a run (config
# `cooldowns`, whose schema allows a subset), where `constant` is the control at equal tokens (the run continued at
# the LR it had where it branched, which is what a constant-LR run from scratch with the same seed does after that step)
DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "constant")


def decayed_lr(start_lr: float, final_lr: float, progress: float, shape: str) -> float:
    """The LR `progress` (0..1) of the way through a decay from start_lr to final_lr: the decay of every schedule
    and of every cooldown, so a cooldown branched where a WSD run starts its decay repeats that decay exactly.
    `constant` does not decay: start_lr throughout."""
    if shape == "constant":
        return start_lr
    if shape == "cosine":
        return final_lr + (start_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if shape == "linear":
        return start_lr + (final_lr - start_lr) * progress
    if shape == "1-sqrt":  # Megatron-LM's WSD `minus_sqrt`: falls fastest at the start of the decay
        return final_lr + (start_lr - final_lr) * (1 - math.sqrt(progress))
    raise ValueError(f"decay shape {shape!r} is unknown; known shapes: {', '.join(DECAY_SHAPES)}")


def phase_at(schedule: Schedule, step: int) -> str:
    """warmup / stable / decay for a checkpoint saved after `step` updates."""
    if step <= schedule.warmup_steps:
        return "warmup"
    if step <= schedule.decay_start:
        return "stable"
    return "decay"
