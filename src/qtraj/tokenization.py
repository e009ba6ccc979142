"""The byte-level BPE tokenizer of the trained runs, and fixed token blocks for training and evaluation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

END_OF_TEXT = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> None:
    """Train a byte-level BPE (the GPT-2 / Llama-3 family's scheme) and save it as a transformers tokenizer.

    Saved through `PreTrainedTokenizerFast.save_pretrained`, so `AutoTokenizer.from_pretrained(out_dir)` and
    every library that takes a Hugging Face model folder can load it.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT
    )
    wrapped.save_pretrained(str(out_dir))


def encode_documents(tokenizer, texts: Iterable[str]) -> np.ndarray:
    """One token stream: each document's tokens followed by the end-of-text token (no other specials)."""
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT) if tokenizer.eos_token_id is None else tokenizer.eos_token_id
    pieces = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)


def token_blocks(stream: np.ndarray, block_length: int, max_blocks: int | None = None) -> np.ndarray:
    """Non-overlapping blocks of `block_length` tokens from the start of the stream, in order.

    Evaluation uses blocks of seq_len + 1 tokens (inputs plus the last target), as the paper does with
    2048 + 1, so every block scores exactly seq_len predictions and the token set is fixed.
    """
    count = len(stream) // block_length
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count == 0:
        raise ValueError(
            f"the token stream has {len(stream)} tokens, fewer than one block of {block_length}; "
            "use more text or a shorter sequence length"
        )
    return stream[: count * block_length].reshape(count, block_length).copy()


def leading_bos_id(tokenizer) -> int | None:
    """The id of the `<bos>` a tokenizer puts before every text it encodes with its special tokens, None when it puts
    none. Decided by encoding, not by a flag: `add_bos_token` reads False on tokenizers whose tokenizer.json
    post-processor adds one (Llama-3's, Gemma's), and a bos_token that is only a name (GPT-2's, and qtraj's BPE, where
    bos = eos = <|endoftext|>) is never added, so the models trained here keep their blocks."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    probe = "The validation text."
    with_specials = tokenizer(probe, add_special_tokens=True)["input_ids"]
    without = tokenizer(probe, add_special_tokens=False)["input_ids"]
    adds_bos = bool(with_specials) and with_specials[0] == bos and (not without or without[0] != bos)
    return int(bos) if adds_bos else None


def validation_blocks(stream: np.ndarray, seq_len: int, max_blocks: int | None = None,
                      bos_id: int | None = None) -> np.ndarray:
    """Evaluation blocks that each score exactly `seq_len` predictions (inputs block[:-1], targets block[1:]).

    Without `bos_id`: seq_len + 1 consecutive stream tokens (`token_blocks`). With it: `<bos>` followed by seq_len
    stream tokens, because a model whose tokenizer adds `<bos>` was trained to see it first and scores far worse
    without it (Gemma-3: 11.54 nats for a sentence without, 8.88 with). The `<bos>` is context only, never a target;
    every stream token of the block is one, so the scored count per block stays seq_len.
    """
    if bos_id is None:
        return token_blocks(stream, seq_len + 1, max_blocks)
    body = token_blocks(stream, seq_len, max_blocks)
    return np.concatenate([np.full((len(body), 1), bos_id, dtype=body.dtype), body], axis=1)
