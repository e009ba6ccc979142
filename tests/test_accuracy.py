"""Task accuracy: the offline tasks qtraj builds, lm-eval's scoring of them on an in-memory model, flat rows."""

import json

import pytest
import torch

from qtraj.accuracy import (
    AccuracyTaskError,
    build_task_items,
    evaluate_accuracy,
    flatten_results,
    load_tasks,
    write_task_items,
)
from qtraj.corpus import iter_texts

TEXT = ["the quick brown fox jumps over the lazy dog " * 3, "a stitch in time saves nine and more " * 3]


@pytest.mark.parametrize("kind", ["continuation", "word_order"])
def test_items_hold_the_true_next_words_at_their_label(kind):
    words = " ".join(TEXT).split()
    items = build_task_items(TEXT, kind, items=30, context_words=5, choice_words=3, choices=4, seed=1)
    assert len(items) == 30
    for item in items:
        assert len(item["choices"]) == len(set(item["choices"])) == 4
        # the answer is the three words that follow the context somewhere in the text
        joined = " ".join(words)
        assert f"{item['context']} {item['choices'][item['label']]}" in joined
        if kind == "word_order":
            assert all(sorted(choice.split()) == sorted(item["choices"][item["label"]].split())
                       for choice in item["choices"])
    assert items == build_task_items(TEXT, kind, items=30, context_words=5, choice_words=3, choices=4, seed=1)
    assert items != build_task_items(TEXT, kind, items=30, context_words=5, choice_words=3, choices=4, seed=2)
    assert {item["label"] for item in items} == {0, 1, 2, 3}  # answers are not all in one position


def test_bad_task_settings_name_the_problem():
    with pytest.raises(AccuracyTaskError, match="unknown local task kind"):
        build_task_items(TEXT, "cloze", 5, 5, 3, 4, 0)
    with pytest.raises(AccuracyTaskError, match="too few"):
        build_task_items(["only a few words here"], "continuation", 5, 24, 4, 4, 0)


def test_flatten_splits_metric_and_filter_and_keeps_stderr():
    results = {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                            "acc_norm_stderr,none": "N/A", "samples": 10},
               "gsm8k": {"exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": 0.02,
                         "exact_match,flexible-extract": 0.3, "samples": 5}}
    rows = flatten_results(results, configured=["arc_easy"])
    assert rows == [
        {"task": "arc_easy", "metric": "acc", "filter": "none", "value": 0.5, "stderr": 0.1, "samples": 10,
         "configured": True},
        {"task": "arc_easy", "metric": "acc_norm", "filter": "none", "value": 0.6, "stderr": None, "samples": 10,
         "configured": True},
        {"task": "gsm8k", "metric": "exact_match", "filter": "flexible-extract", "value": 0.3, "stderr": None,
         "samples": 5, "configured": False},
        {"task": "gsm8k", "metric": "exact_match", "filter": "strict-match", "value": 0.2, "stderr": 0.02,
         "samples": 5, "configured": False},
    ]


def _own_accuracy(model, tokenizer, items):
    """The same question scored by hand: the choice with the highest summed log-likelihood after the context,
    tokenized as lm-eval does (context and continuation encoded together, continuation = the extra tokens)."""
    correct = 0
    for item in items:
        context = tokenizer(item["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(item["context"] + " " + choice, add_special_tokens=False)["input_ids"]
            continuation = whole[len(context):]
            logits = model(torch.tensor([whole])).logits[0, :-1].log_softmax(-1)
            targets = torch.tensor(whole[1:])
            picked = logits[torch.arange(len(targets)), targets][-len(continuation):]
            scores.append(picked.sum().item())
        correct += int(max(range(len(scores)), key=scores.__getitem__) == item["label"])
    return correct / len(items)


def test_lm_eval_scores_an_in_memory_model_like_a_hand_count(trained_checkpoint, small_corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = list(iter_texts(small_corpus))[-5:]
    items = build_task_items(texts, "continuation", items=24, context_words=10, choice_words=3, choices=4, seed=0)
    write_task_items(items, tmp_path / "cont.jsonl")
    assert [json.loads(line) for line in (tmp_path / "cont.jsonl").read_text().splitlines()] == items

    model = AutoModelForCausalLM.from_pretrained(str(trained_checkpoint)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(trained_checkpoint))
    tasks = load_tasks({"cont": str(tmp_path / "cont.jsonl")}, [], num_fewshot=0, fewshot_seed=0)
    rows = flatten_results(evaluate_accuracy(model, tokenizer, tasks, batch_size=8, limit=None))
    by_metric = {row["metric"]: row for row in rows}
    assert set(by_metric) == {"acc", "acc_norm"} and by_metric["acc"]["samples"] == 24
    with torch.no_grad():
        assert by_metric["acc"]["value"] == pytest.approx(_own_accuracy(model, tokenizer, items))
    assert by_metric["acc"]["stderr"] > 0

    limited = flatten_results(evaluate_accuracy(model, tokenizer, tasks, batch_size=8, limit=6))
    assert {row["samples"] for row in limited} == {6}


def test_unknown_lm_eval_task_is_named():
    with pytest.raises(AccuracyTaskError, match="no task \\['arc_esay'\\]"):
        load_tasks({}, ["arc_esay"], num_fewshot=0, fewshot_seed=0)


def test_registered_tasks_missing_from_the_cache_offline_say_how_to_fix_it(monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants

    # offline with an empty cache (both libraries read these at import time, so the module values are patched)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(AccuracyTaskError, match="must already be in the Hugging Face cache"):
        load_tasks({}, ["arc_easy"], num_fewshot=0, fewshot_seed=0)
