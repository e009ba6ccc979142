import numpy as np
import pytest
from transformers import AutoTokenizer

from qtraj.tokenization import END_OF_TEXT, encode_documents, leading_bos_id, token_blocks, validation_blocks


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


def test_validation_blocks_put_bos_before_seq_len_stream_tokens_or_are_todays_blocks():
    stream = np.arange(25, dtype=np.int32)
    assert np.array_equal(validation_blocks(stream, 5, 3), token_blocks(stream, 6, 3))  # no <bos>: unchanged
    blocks = validation_blocks(stream, 5, 3, bos_id=99)
    assert blocks.dtype == np.int32 and blocks.shape == (3, 6)
    assert blocks.tolist() == [[99, 0, 1, 2, 3, 4], [99, 5, 6, 7, 8, 9], [99, 10, 11, 12, 13, 14]]
    assert validation_blocks(stream, 5, bos_id=99).shape == (5, 6)  # 25 // 5 slices, where 25 // 6 = 4 without
    with pytest.raises(ValueError, match="fewer than one block"):
        validation_blocks(np.arange(4), 5, bos_id=99)


@pytest.mark.parametrize("adds", [True, False])
def test_whether_a_tokenizer_adds_bos_is_asked_of_the_tokenizer(adds):
    """Gemma's tokenizer class with its add_bos_token flag on or off; the id only counts when encoding puts it first."""
    from transformers import GemmaTokenizer

    vocabulary = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "<pad>": 3, "▁a": 4, "a": 5, "▁": 6, "b": 7}
    tokenizer = GemmaTokenizer(vocab=vocabulary, merges=[], bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                               add_bos_token=adds)
    assert tokenizer.bos_token_id == 1
    assert leading_bos_id(tokenizer) == (1 if adds else None)


def test_the_trained_tokenizer_names_a_bos_but_adds_none(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.bos_token == END_OF_TEXT and leading_bos_id(tokenizer) is None
