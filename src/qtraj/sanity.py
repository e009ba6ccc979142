"""Checks that stop a wrong number before it is written: a tokenizer that cuts text far finer than any real subword
tokenizer, and a pretrained model whose validation loss is that of guessing.

Both failures give a finite, plausible-looking loss, so nothing downstream would notice: a GGUF conversion whose
tokenizer splits English into single characters scored 11.3 nats (0.91 x ln V) on Gemma-3-270M (docs: NOTES.md,
2026-12-02), and a folder of random weights scores ~ln V. Small pure functions; the steps call them.
"""

from __future__ import annotations

import math

from qtraj.checkpoints import CheckpointInfo

# The limits when the evaluation settings do not name them (config: evaluation.max_tokens_per_char and
# evaluation.max_loss_fraction, null = off). Declared here only: the config schema gives them no `default:`, so a
# config that does not set them validates to the same settings (and the same config hash and job params) as before.
DEFAULT_LIMITS = {
    # subword tokenizers give ~0.2-0.3 tokens per character of English; one that splits into characters ~1
    "max_tokens_per_char": 0.5,
    # a pretrained model scores ~0.2-0.35 x ln V; random weights ~1.0, a character-splitting tokenizer 0.9
    "max_loss_fraction": 0.75,
}

def trained_here() -> set[str]:
    """The `source` columns of checkpoints of models trained here (qtraj.sources: the sources that are not
    `external`): a micro model may sit near uniform (step 0, a tiny run), and that is a finding."""
    from qtraj.sources import source_classes

    return {cls.column for cls in source_classes({}) if not cls.external and cls.column}


class TokenizerCheckError(ValueError):
    """A tokenizer cuts the validation text into implausibly many tokens: not the model's own, or mis-converted."""


class LossCheckError(ValueError):
    """A pretrained checkpoint scores about as badly as uniform guessing: broken weights or a mismatched tokenizer."""


def limit(evaluation: dict, key: str) -> float | None:
    """The limit `key` of a trajectory's evaluation settings: absent, DEFAULT_LIMITS'; null (None), no check."""
    return evaluation.get(key, DEFAULT_LIMITS[key])


def tokens_per_character(tokens: int, characters: int) -> float:
    return tokens / characters if characters else math.inf


def check_tokens_per_character(tokens: int, characters: int, sample: list[str], max_tokens_per_char: float | None,
                               what: str) -> float:
    """Refuse (TokenizerCheckError) a tokenization of `characters` characters into `tokens` tokens at or above
    `max_tokens_per_char` per character (None: never); `sample` are the first tokens as strings, shown so that the
    reader sees how the text was cut. Returns the ratio."""
    ratio = tokens_per_character(tokens, characters)
    if max_tokens_per_char is not None and ratio >= max_tokens_per_char:
        raise TokenizerCheckError(
            f"{what}: {tokens} tokens for {characters} characters, {ratio:.3f} tokens per character (limit "
            f"{max_tokens_per_char}); the first tokens: {sample}. A model's own subword tokenizer gives about 0.2-0.3 "
            "per character of English text, so this one is not the model's, or was converted wrongly (e.g. from a "
            "GGUF file), and every loss computed with it would be wrong. Fix: give the model's own tokenizer: "
            "`tokenizer: <folder with its tokenizer files>` in the config's `local` entry, or `tokenizer: {repo: ..., "
            "revision: ...}` in the family file; then rerun. If the model really is byte- or character-level, set "
            "`max_tokens_per_char: null` (or a higher limit) in its evaluation settings (`evaluation:` for local "
            "trajectories, `hub_data: {evaluation: ...}` for hub families)")
    return ratio


def loss_fraction_of_uniform(loss: float, classes: int) -> float:
    """`loss` as a fraction of ln(classes), the loss of guessing uniformly over the model's output classes."""
    return loss / math.log(classes)


def is_pretrained(info: CheckpointInfo) -> bool:
    """Whether a checkpoint must have learned something: one that comes from elsewhere (hub, local) and is neither
    its initialisation (step or tokens 0) nor in its LR warmup (Pythia's step1 ... step512 score about ln V: their
    near-uniform loss is the data). An unknown step counts as pretrained (a final release, a `main`)."""
    if info.source in trained_here():
        return False
    return info.step != 0 and info.tokens != 0 and info.phase != "warmup"


def check_loss_fraction(loss: float, classes: int, info: CheckpointInfo, max_loss_fraction: float | None,
                        what: str) -> float:
    """Refuse (LossCheckError) a pretrained checkpoint (`is_pretrained`) whose loss is `max_loss_fraction` x
    ln(classes) or more (None: never). Returns the fraction, which the fp row records for every checkpoint."""
    fraction = loss_fraction_of_uniform(loss, classes)
    if max_loss_fraction is not None and fraction >= max_loss_fraction and is_pretrained(info):
        raise LossCheckError(
            f"{what} (source {info.source}, step {info.step}, tokens {info.tokens}, phase {info.phase}): its "
            f"validation loss {loss:.4f} nats is {fraction:.3f} x ln V = {math.log(classes):.4f} (V = {classes} "
            f"output classes: the loss of uniform guessing), at or above the limit {max_loss_fraction} for a "
            "pretrained model, which scores about 0.2-0.35 x ln V. Its weights are random or broken, or the "
            "tokenizer the validation text was cut with is not the one it was trained with (one that splits into "
            "characters scores ~0.9 x ln V). Fix: check that the checkpoint folder holds the trained weights and "
            "that the tokenizer is the model's own (`tokenizer:` in the `local` entry or the family file), then "
            "rerun. If this checkpoint really is barely trained, set "
            "`max_loss_fraction: null` in its evaluation settings (`evaluation:` for local trajectories, "
            "`hub_data: {evaluation: ...}` for hub families)")
    return fraction
