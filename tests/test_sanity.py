"""qtraj.sanity: a tokenizer that cuts text into characters and a pretrained model that scores like guessing are
refused with their figures and the fix, before any number is written; the models trained here never are."""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from qtraj.checkpoints import METADATA_FILE, CheckpointInfo, read_checkpoint_info
from qtraj.sanity import (
    DEFAULT_LIMITS,
    LossCheckError,
    TokenizerCheckError,
    check_loss_fraction,
    check_tokens_per_character,
    is_pretrained,
    limit,
)
from qtraj.steps import evaluate_fp, tokenize_split

EVALUATION = {"seq_len": 32, "max_blocks": 3, "batch_size": 3}
LOCAL = CheckpointInfo(run="mine", checkpoint="step100", step=100, tokens=409600, lr=None, phase=None, source="local")


def character_tokenizer(texts: list[str], out_dir: Path) -> Path:
    """A transformers tokenizer that cuts text into single characters (a WordLevel vocabulary of the characters,
    each character its own pre-token): English cut as the Unigram that transformers' GGUF converter built from
    Gemma-3's vocabulary cut it (NOTES.md, 2026-12-02)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    characters = sorted(set("".join(texts)))
    vocabulary = {token: index for index, token in enumerate(["<|endoftext|>", "[UNK]", *characters])}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                            unk_token="[UNK]").save_pretrained(str(out_dir))
    return out_dir


def test_a_character_splitting_tokenizer_is_refused_with_its_figures_and_the_fix(tmp_path, small_corpus):
    from qtraj.corpus import iter_texts

    texts = list(iter_texts(small_corpus))
    folder = character_tokenizer(texts, tmp_path / "chars")
    out = tmp_path / "validation.npy"
    with pytest.raises(TokenizerCheckError) as refused:
        tokenize_split(str(small_corpus), str(folder), str(out), max_tokens_per_char=0.5)
    characters = sum(map(len, texts))
    message = str(refused.value)
    assert f"{characters} tokens for {characters} characters, 1.000 tokens per character (limit 0.5)" in message
    first = texts[0][:12]
    assert str(list(first)) in message  # the first 12 tokens, as strings: one character each
    assert str(small_corpus) in message and str(folder) in message
    assert "`tokenizer:" in message and "max_tokens_per_char: null" in message
    assert not out.exists()


def test_the_tokens_per_character_check_can_be_turned_off_and_passes_a_subword_tokenizer(
        tmp_path, small_corpus, tokenizer_dir, token_stream):
    from qtraj.corpus import iter_texts

    texts = list(iter_texts(small_corpus))
    folder = character_tokenizer(texts, tmp_path / "chars")
    tokenize_split(str(small_corpus), str(folder), str(tmp_path / "chars.npy"), max_tokens_per_char=None)
    assert len(np.load(tmp_path / "chars.npy")) == sum(map(len, texts)) + len(texts)  # one end-of-text per text
    # the BPE trained here (512 tokens) is a subword tokenizer: well under the limit, and its stream is unchanged
    tokenize_split(str(small_corpus), str(tokenizer_dir), str(tmp_path / "bpe.npy"), max_tokens_per_char=0.5)
    assert np.array_equal(np.load(tmp_path / "bpe.npy"), token_stream)


def test_the_check_refuses_from_the_limit_on():
    assert check_tokens_per_character(49, 100, ["a"], 0.5, "x") == pytest.approx(0.49)
    with pytest.raises(TokenizerCheckError, match=r"x: 50 tokens for 100 characters, 0.500 tokens per character"):
        check_tokens_per_character(50, 100, ["a"], 0.5, "x")
    assert check_tokens_per_character(300, 100, ["a"], None, "x") == 3.0


def test_limits_come_from_the_evaluation_settings_and_null_turns_them_off():
    assert limit({"seq_len": 8}, "max_loss_fraction") == DEFAULT_LIMITS["max_loss_fraction"] == 0.75
    assert limit({"max_loss_fraction": None}, "max_loss_fraction") is None
    assert limit({"max_tokens_per_char": 2.0}, "max_tokens_per_char") == 2.0


def test_the_limits_are_validated_and_a_config_without_them_is_unchanged():
    """No schema default: the validated default config, its hash (docs/measured/default was run with it) and the
    evaluation jobs' params stay what they were before the limits existed."""
    import copy

    from qtraj.config import load_config, validate_config
    from qtraj.schema import ConfigError

    config = load_config(Path(__file__).resolve().parents[1] / "config" / "config.yaml")
    assert "max_loss_fraction" not in config["evaluation"]
    assert "max_tokens_per_char" not in config["hub_data"]["evaluation"]
    settings = copy.deepcopy(config)
    settings["evaluation"].update(max_loss_fraction=None, max_tokens_per_char=2.0)
    settings["hub_data"]["evaluation"]["max_loss_fraction"] = 0.9
    validate_config(settings)
    for bad in ({"max_tokens_per_char": 0}, {"max_loss_fraction": "off"}):
        broken = copy.deepcopy(config)
        broken["evaluation"].update(bad)
        with pytest.raises(ConfigError, match=next(iter(bad))):
            validate_config(broken)


def test_which_checkpoints_must_have_learned_something():
    assert is_pretrained(LOCAL)
    assert is_pretrained(replace(LOCAL, source="hub", step=None, tokens=None))  # a final release, step unknown
    assert not is_pretrained(replace(LOCAL, step=0))  # an initialisation
    assert not is_pretrained(replace(LOCAL, step=None, tokens=0))
    assert not is_pretrained(replace(LOCAL, source="hub", step=1, phase="warmup"))  # Pythia step1: ~ln V is data
    for source in ("trained", "cooldown", "averaged"):
        assert not is_pretrained(replace(LOCAL, source=source))


def test_the_loss_check_refuses_from_the_limit_on_and_only_pretrained_checkpoints():
    uniform = math.log(1000)
    assert check_loss_fraction(0.74 * uniform, 1000, LOCAL, 0.75, "x") == pytest.approx(0.74)
    with pytest.raises(LossCheckError, match=r"x \(source local, step 100.*0\.750 x ln V = 6\.9078 \(V = 1000"):
        check_loss_fraction(0.75 * uniform, 1000, LOCAL, 0.75, "x")
    assert check_loss_fraction(uniform, 1000, replace(LOCAL, source="trained"), 0.75, "x") == pytest.approx(1.0)
    assert check_loss_fraction(uniform, 1000, LOCAL, None, "x") == pytest.approx(1.0)


def random_local_checkpoint(folder: Path, tokenizer_dir: Path, info: CheckpointInfo = LOCAL) -> Path:
    from tests.architectures import save_tiny_checkpoint

    save_tiny_checkpoint("LlamaForCausalLM", folder, tokenizer_dir, seed=0)
    (folder / METADATA_FILE).write_text(json.dumps(asdict(info)))
    return folder


def test_a_random_weights_pretrained_checkpoint_is_refused_with_its_figures(tmp_path, tokenizer_dir, token_stream):
    folder = random_local_checkpoint(tmp_path / "step100", tokenizer_dir)
    np.save(tmp_path / "validation.npy", token_stream)
    out = tmp_path / "fp.parquet"
    with pytest.raises(LossCheckError) as refused:
        evaluate_fp(str(folder), str(tmp_path / "validation.npy"), EVALUATION, str(out))
    message = str(refused.value)
    assert "checkpoint mine/step100 (source local, step 100, tokens 409600" in message
    assert f"x ln V = {math.log(512):.4f} (V = 512 output classes" in message and "limit 0.75" in message
    assert "`tokenizer:`" in message and "max_loss_fraction: null" in message
    assert not out.exists()

    # opted out: measured, with the fraction on record (random weights: ~1, uniform guessing)
    evaluate_fp(str(folder), str(tmp_path / "validation.npy"), {**EVALUATION, "max_loss_fraction": None}, str(out))
    row = pq.read_table(out).to_pylist()[0]
    assert row["loss_fraction_of_uniform"] == pytest.approx(row["loss_fp"] / math.log(512))
    assert row["loss_fraction_of_uniform"] > 0.95


def test_a_micro_model_trained_here_is_measured_whatever_its_loss(tmp_path, trained_checkpoint, tokenizer_dir,
                                                                  token_stream):
    np.save(tmp_path / "validation.npy", token_stream)
    evaluate_fp(str(trained_checkpoint), str(tmp_path / "validation.npy"), EVALUATION, str(tmp_path / "fp.parquet"))
    trained = pq.read_table(tmp_path / "fp.parquet").to_pylist()[0]
    assert trained["source"] == "trained" and trained["loss_fraction_of_uniform"] < 1
    # the same random weights the check refuses as a local checkpoint are a finding as a micro model's step 0
    step0 = replace(read_checkpoint_info(trained_checkpoint), checkpoint="step000000", step=0, tokens=0)
    folder = random_local_checkpoint(tmp_path / "step0", tokenizer_dir, step0)
    evaluate_fp(str(folder), str(tmp_path / "validation.npy"), EVALUATION, str(tmp_path / "step0.parquet"))
    assert pq.read_table(tmp_path / "step0.parquet").to_pylist()[0]["loss_fraction_of_uniform"] > 0.95
