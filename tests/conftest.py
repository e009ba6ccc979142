"""Shared fixtures: tiny models, tokenizers and corpora built offline from the carried corpus."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OPT_IN_MARKERS = ("slow", "gpu", "slurm")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow / gpu / slurm run only when selected with -m (make test-slow, pytest -m gpu,
    make test-slurm); a plain `pytest` skips them and says so."""
    if config.option.markexpr:
        return
    for item in items:
        for marker in OPT_IN_MARKERS:
            if marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=f"marked {marker}: run with -m {marker}"))
CORPUS = REPO_ROOT / "data" / "corpus" / "sotu.jsonl.xz"


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    with lzma.open(CORPUS, "rt", encoding="utf-8") as handle:
        return handle.read().splitlines()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, corpus_lines) -> Path:
    """The first 40 addresses: enough text for every split, a few seconds to tokenize."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("\n".join(corpus_lines[:40]) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, small_corpus) -> Path:
    from qtraj.corpus import iter_texts
    from qtraj.tokenization import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(iter_texts(small_corpus), 512, out)
    return out


@pytest.fixture(scope="session")
def token_stream(tokenizer_dir, small_corpus):
    from transformers import AutoTokenizer

    from qtraj.corpus import iter_texts
    from qtraj.tokenization import encode_documents

    return encode_documents(AutoTokenizer.from_pretrained(str(tokenizer_dir)), iter_texts(small_corpus))


TINY_MODEL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 128, "max_position_embeddings": 64, "tie_word_embeddings": False}


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, tokenizer_dir, token_stream) -> Path:
    """A checkpoint folder of a tiny Llama trained for 60 steps: structured enough for GPTQ to matter."""
    from qtraj.schedules import Schedule
    from qtraj.training import TrainingSpec, train

    out = tmp_path_factory.mktemp("run") / "step000060"
    spec = TrainingSpec(run="unit", model=TINY_MODEL, schedule=Schedule("wsd", 3e-3, 60, 3), seq_len=64,
                        batch_size=8, weight_decay=0.1, grad_clip=1.0, seed=0)
    train(spec, token_stream, tokenizer_dir, {60: out})
    return out


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local hub cache that huggingface_hub uses, offline (the real download code runs on it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return cache


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_corpus):
    """The tiny workflow (tests/configs/tiny.yaml) run once: (working folder, config file, results folder). Shared by
    the workflow and fault tests; a test that changes it puts it back."""
    from tests.test_workflow import snakemake, write_config

    workdir = tmp_path_factory.mktemp("workflow")
    results_dir = workdir / "results"
    config = write_config(workdir / "config.yaml", small_corpus, results_dir)
    snakemake("--cores", "2", "--configfile", str(config), workdir=workdir)
    return workdir, config, results_dir
