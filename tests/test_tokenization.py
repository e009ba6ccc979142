import numpy as np
import pytest
from transformers import AutoTokenizer

from qtraj.tokenization import END_OF_TEXT, encode_documents, token_blocks


def test_tokenizer_is_a_transformers_tokenizer_that_round_trips(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert len(tokenizer) == 512
    text = "Fellow-Citizens of the Senate and House of Representatives: 1790."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.eos_token == END_OF_TEXT


def test_documents_are_separated_by_end_of_text(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    stream = encode_documents(tokenizer, ["one", "two"])
    assert stream.dtype == np.int32
    assert (stream == tokenizer.eos_token_id).sum() == 2 and stream[-1] == tokenizer.eos_token_id


def test_token_blocks_are_fixed_non_overlapping_prefix_blocks():
    blocks = token_blocks(np.arange(25, dtype=np.int32), 6, max_blocks=3)
    assert blocks.shape == (3, 6)
    assert blocks[1].tolist() == [6, 7, 8, 9, 10, 11]
    assert token_blocks(np.arange(25), 6).shape == (4, 6)
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(np.arange(5), 6)
