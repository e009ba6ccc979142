"""The validation loss from hidden states with the head applied a chunk of positions at a time equals the loss from
the model's full logits, on architectures whose heads differ (untied, tied, biased, soft-capped, scaled), and never
holds more than one chunk of logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from qtraj import evaluation
from qtraj.evaluation import chunk_positions, cross_entropy, head_split_agrees
from tests.architectures import tiny_config

VOCABULARY = 512
SMALL_CHUNK = 4 * VOCABULARY * 7  # 7 positions a chunk: every batch is cut into several, one of them ragged


def _full_logits_loss(model, blocks: np.ndarray, batch_size: int) -> float:
    """The loss as qtraj computed it before chunking: every logit of a batch at once (the independent reference)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = torch.from_numpy(blocks[start : start + batch_size].astype(np.int64))
            logits = model(input_ids=batch[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                       reduction="sum").double().item()
            count += batch[:, 1:].numel()
    return total / count


def _plain_config(name: str, **overrides):
    shape = {"vocab_size": VOCABULARY, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 128}
    return getattr(transformers, name)(**shape, **overrides)


# name -> (config, what about its head the test covers)
MODELS = {
    "llama-untied": lambda: tiny_config("LlamaForCausalLM", VOCABULARY),
    "gpt2-tied": lambda: tiny_config("GPT2LMHeadModel", VOCABULARY),
    "olmoe-tied-moe": lambda: tiny_config("OlmoeForCausalLM", VOCABULARY),
    "gemma3-softcapped": lambda: tiny_config("Gemma3ForCausalLM", VOCABULARY, final_logit_softcapping=3.0),
    "phi-head-bias": lambda: _plain_config("PhiConfig"),
    "cohere-logit-scale": lambda: _plain_config("CohereConfig", logit_scale=0.3),
    "granite-logits-scaling": lambda: _plain_config("GraniteConfig", logits_scaling=4.0),
}


@pytest.fixture(scope="module")
def blocks() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCABULARY, size=(6, 33))


def _model(name: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(MODELS[name]()).eval()
    head = model.get_output_embeddings()
    if head.bias is not None:  # a zero-initialised bias would hide a head applied without it
        torch.nn.init.normal_(head.bias, std=1.0)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_chunked_loss_equals_the_full_logits_loss(name, blocks):
    model = _model(name)
    with torch.inference_mode():
        assert head_split_agrees(model, torch.from_numpy(blocks[:1, :8].astype(np.int64)))
    chunked = cross_entropy(model, blocks, batch_size=4, chunk_bytes=SMALL_CHUNK)
    assert chunked.loss == pytest.approx(_full_logits_loss(model, blocks, 4), rel=1e-6)
    assert (chunked.tokens, chunked.classes) == (6 * 32, VOCABULARY)


def test_a_head_transform_qtraj_does_not_know_falls_back_to_the_full_logits(blocks, monkeypatch):
    """Without the soft-capping rule the split would give Gemma's uncapped logits: the agreement check refuses it
    and the loss comes from the model's own logits, still the right number."""
    model = _model("gemma3-softcapped")
    monkeypatch.delitem(evaluation.LOGIT_TRANSFORMS, "final_logit_softcapping")
    with torch.inference_mode():
        assert not head_split_agrees(model, torch.from_numpy(blocks[:1, :8].astype(np.int64)))
    loss = cross_entropy(model, blocks, batch_size=4, chunk_bytes=SMALL_CHUNK).loss
    assert loss == pytest.approx(_full_logits_loss(model, blocks, 4), rel=1e-6)


def test_the_head_never_sees_more_than_one_chunk_of_positions(blocks):
    """The memory property itself: the model's own forward (full logits) runs only for the 8-position agreement
    check, and every head call after it gets at most one chunk of positions."""
    model = _model("llama-untied")
    seen: list[int] = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, inputs, output: seen.append(inputs[0].reshape(-1, inputs[0].shape[-1]).shape[0]))
    cross_entropy(model, blocks, batch_size=6, chunk_bytes=SMALL_CHUNK)
    assert seen[:2] == [8, 8]  # the agreement check: the split and the model's forward, 8 positions each
    assert max(seen[2:]) == chunk_positions(VOCABULARY, SMALL_CHUNK) == 7
    assert sum(seen[2:]) == 6 * 32


def test_chunk_positions():
    assert chunk_positions(262_144) == 256  # the default 256 MiB chunk of Gemma 3's vocabulary
    assert chunk_positions(50_000, chunk_bytes=1) == 1


@pytest.mark.parametrize("name", ["llama-untied", "gpt2-tied"])
def test_each_block_loss_is_that_block_scored_alone(name, blocks):
    """The per-block losses a paired bootstrap resamples: each equals the loss of its block evaluated by itself,
    in block order, whatever the batch and chunk sizes cut (a chunk of 7 positions straddles blocks of 32); their
    mean is the loss."""
    model = _model(name)
    result = cross_entropy(model, blocks, batch_size=4, chunk_bytes=SMALL_CHUNK)
    alone = [cross_entropy(model, blocks[index : index + 1], batch_size=1).loss for index in range(len(blocks))]
    assert result.block_losses == pytest.approx(alone, rel=1e-6)
    assert len(set(alone)) == len(alone)  # distinct blocks: a wrong order could not pass
    assert np.mean(result.block_losses) == pytest.approx(result.loss, rel=1e-12)
