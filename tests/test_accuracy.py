"""Task accuracy: the offline tasks qtraj builds, lm-eval's scoring of them on an in-memory model, flat rows."""

import json
from pathlib import Path

import pytest
import torch

from qtraj.accuracy import (
    AccuracyTaskError,
    SharedContext,
    batch_shared_contexts,
    build_task_items,
    evaluate_accuracy,
    flatten_results,
    group_shared_contexts,
    item_scores,
    load_tasks,
    local_task_config,
    shared_context_lm_class,
    write_task_items,
)
from qtraj.corpus import iter_texts


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine the threads' hand-offs cost far more
    than the products (x50 measured); one thread also fixes the order of every float sum."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
                            "acc_norm_stderr,none": "N/A", "samples": 10,
                            "item_scores": {"acc,none": [1.0, 0.0], "acc_norm,none": [0.0, 1.0]}},
               "gsm8k": {"exact_match,strict-match": 0.2, "exact_match_stderr,strict-match": 0.02,
                         "exact_match,flexible-extract": 0.3, "samples": 5,
                         "item_scores": {"exact_match,strict-match": [0.0, 1.0, 0.0]}}}
    rows = flatten_results(results, configured=["arc_easy"])
    assert rows == [
        {"task": "arc_easy", "metric": "acc", "filter": "none", "value": 0.5, "stderr": 0.1, "samples": 10,
         "configured": True, "item_scores": [1.0, 0.0]},
        {"task": "arc_easy", "metric": "acc_norm", "filter": "none", "value": 0.6, "stderr": None, "samples": 10,
         "configured": True, "item_scores": [0.0, 1.0]},
        {"task": "gsm8k", "metric": "exact_match", "filter": "flexible-extract", "value": 0.3, "stderr": None,
         "samples": 5, "configured": False, "item_scores": None},
        {"task": "gsm8k", "metric": "exact_match", "filter": "strict-match", "value": 0.2, "stderr": 0.02,
         "samples": 5, "configured": False, "item_scores": [0.0, 1.0, 0.0]},
    ]
    # a group's entry (no item scores of its own) and results from before item scores
    assert [row["item_scores"] for row in flatten_results({"mmlu": {"acc,none": 0.3, "samples": 7}})] == [None]


def _logged_sample(doc_id, filter_name="none", **metrics):
    """An item as lm-eval's `evaluate(log_samples=True)` logs it, with the fields item_scores does not read."""
    return {"doc_id": doc_id, "doc": {"text": f"document {doc_id}"}, "target": 0, "arguments": [("a", " b")],
            "resps": [[(-1.0, False)]], "filtered_resps": [(-1.0, False)], "filter": filter_name,
            "metrics": list(metrics), "doc_hash": "0", "prompt_hash": "0", "target_hash": "0", **metrics}


def test_item_scores_follow_doc_ids_per_metric_and_filter():
    import numpy as np
    from lm_eval.api.metrics import mean, perplexity

    samples = [_logged_sample(doc_id, acc=float(doc_id == 2), acc_norm=np.bool_(doc_id > 0)) for doc_id in range(4)]
    samples += [_logged_sample(doc_id, "strict-match", exact_match=doc_id % 2) for doc_id in range(4)]
    samples += [_logged_sample(doc_id, "flexible-extract", exact_match=1) for doc_id in (0, 1, 3)]
    expected = {"acc,none": [0.0, 0.0, 1.0, 0.0], "acc_norm,none": [0.0, 1.0, 1.0, 1.0],
                "exact_match,strict-match": [0.0, 1.0, 0.0, 1.0], "exact_match,flexible-extract": [1.0, 1.0, 1.0]}
    aggregations = {"acc": mean, "acc_norm": mean, "exact_match": mean}
    assert item_scores(samples, aggregations) == expected
    # lm-eval logs items in its own order (ranks one after another): the lists stay in doc_id order
    assert item_scores(samples[::-1], aggregations) == expected
    assert all(type(score) is float for scores in expected.values() for score in scores)

    # no list where the task value is not the items' mean, or where an item has no number or no score
    assert item_scores(samples, {**aggregations, "acc": perplexity}).keys() == expected.keys() - {"acc,none"}
    pairs = [_logged_sample(doc_id, f1=(doc_id, 0)) for doc_id in range(3)]
    assert item_scores(pairs, {}) == {}
    some_without_acc = [_logged_sample(0, acc=1.0, acc_norm=1.0), _logged_sample(1, acc_norm=0.0)]
    assert item_scores(some_without_acc, aggregations) == {"acc_norm,none": [1.0, 0.0]}


def _own_item_scores(model, tokenizer, items):
    """The same questions scored by hand, {metric: [1.0 or 0.0 per item]}: acc picks the choice with the highest
    summed log-likelihood after the context, tokenized as lm-eval does (context and continuation encoded together,
    continuation = the extra tokens); acc_norm the highest per character of the choice."""
    own = {"acc": [], "acc_norm": []}
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
        per_character = [score / len(choice) for score, choice in zip(scores, item["choices"], strict=True)]
        for metric, ranked in (("acc", scores), ("acc_norm", per_character)):
            own[metric].append(float(max(range(len(ranked)), key=ranked.__getitem__) == item["label"]))
    return own


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
        own = _own_item_scores(model, tokenizer, items)
    assert by_metric["acc"]["value"] == pytest.approx(sum(own["acc"]) / len(items))
    assert by_metric["acc"]["stderr"] > 0
    for metric, row in by_metric.items():
        # item by item in the task file's order (doc_id), each the items' score lm-eval averaged into the value
        assert row["item_scores"] == own[metric]
        assert own[metric] != own[metric][::-1]  # so a list in another order would differ
        assert len(row["item_scores"]) == row["samples"]
        assert sum(row["item_scores"]) / len(row["item_scores"]) == row["value"]
    assert flatten_results(evaluate_accuracy(model, tokenizer, tasks, batch_size=8, limit=None)) == rows

    limited = flatten_results(evaluate_accuracy(model, tokenizer, tasks, batch_size=8, limit=6))
    assert {row["samples"] for row in limited} == {6}
    assert {row["metric"]: row["item_scores"] for row in limited} == {
        metric: row["item_scores"][:6] for metric, row in by_metric.items()}


def test_local_tasks_read_their_fields_as_jinja_templates_of_them_would(tmp_path):
    """The field names in local_task_config give lm-eval the requests and targets "{{field}}" templates give."""
    from lm_eval.api.task import ConfigurableTask

    items = build_task_items(TEXT, "continuation", items=6, context_words=5, choice_words=3, choices=4, seed=0)
    write_task_items(items, tmp_path / "cont.jsonl")
    config = local_task_config("cont", tmp_path / "cont.jsonl")
    templated = {**config, "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}"}
    seen = []
    for task_config in (config, templated):
        task = ConfigurableTask(config=task_config)
        task.build_all_requests(limit=None, rank=0, world_size=1)
        seen.append(([request.args for request in task.instances],
                     [task.doc_to_target(doc) for doc in task.eval_docs]))
    assert seen[0] == seen[1]
    assert seen[0][1] == [item["label"] for item in items]
    assert seen[0][0][0] == (items[0]["context"], " " + items[0]["choices"][0])


@pytest.fixture(scope="module")
def task_index():
    """lm-eval's index of its registered tasks: building it reads every task YAML it ships (~10 s), so once."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture
def indexed_tasks(monkeypatch, task_index):
    """`load_tasks` with the module's task index instead of a new one (it asks for `TaskManager()` each call)."""
    import lm_eval.tasks

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda: task_index)


def test_unknown_lm_eval_task_is_named(indexed_tasks):
    with pytest.raises(AccuracyTaskError, match="no task \\['arc_esay'\\]"):
        load_tasks({}, ["arc_esay"], num_fewshot=0, fewshot_seed=0)


def test_registered_tasks_missing_from_the_cache_offline_say_how_to_fix_it(monkeypatch, tmp_path, indexed_tasks):
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


# Shared-context scoring: each request's (log-likelihood, is_greedy) must be lm-eval's own. In float64 both paths
# agree to ~1e-12, so 1e-6 leaves no room for a wrong position, token or cache row; in float32 they differ by
# the float rounding of other matrix shapes, as lm-eval's own numbers do between two batch sizes (~2e-7 relative).

@pytest.fixture(scope="module")
def local_tasks(small_corpus, tmp_path_factory):
    """lm-eval tasks over both local kinds, from the last addresses of the small corpus."""
    texts = list(iter_texts(small_corpus))[-5:]
    folder = tmp_path_factory.mktemp("shared-context-tasks")
    files = {}
    for kind, context_words in (("continuation", 24), ("word_order", 16)):
        items = build_task_items(texts, kind, items=8, context_words=context_words, choice_words=4, choices=4,
                                 seed=0)
        files[kind] = str(folder / f"{kind}.jsonl")
        write_task_items(items, files[kind])
    return load_tasks(files, [], num_fewshot=0, fewshot_seed=0)


def _tiny_model(architecture, tokenizer_dir, folder, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.architectures import REMOTE_ARCHITECTURE, isolated_remote_code, save_tiny_checkpoint

    save_tiny_checkpoint(architecture, folder, tokenizer_dir)
    # the remote code is tests/architectures.py's own, written into the folder just now
    with isolated_remote_code(Path(folder).parent / "modules"):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                     trust_remote_code=architecture == REMOTE_ARCHITECTURE).eval()
    return model, AutoTokenizer.from_pretrained(str(folder))


def _loglikelihood_requests(tasks):
    requests = []
    for task in tasks["tasks"].values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        requests += task.instances
    return requests


def _plain_and_shared(model, tokenizer, score, batch_size=8):
    """(lm-eval's HFLM answers, the shared-context answers, the shared-context LM) of `score(lm)`."""
    from lm_eval.models.huggingface import HFLM

    plain = score(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size))
    shared_lm = shared_context_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return plain, score(shared_lm), shared_lm


def _assert_same_answers(plain, shared, abs_tolerance=1e-6, rel_tolerance=0.0):
    assert len(plain) == len(shared)
    for (plain_logprob, plain_greedy), (shared_logprob, shared_greedy) in zip(plain, shared, strict=True):
        assert shared_logprob == pytest.approx(plain_logprob, abs=abs_tolerance, rel=rel_tolerance)
        assert shared_greedy == plain_greedy


@pytest.mark.parametrize(("architecture", "dtype"), [
    ("LlamaForCausalLM", torch.float64),
    ("GPTNeoXForCausalLM", torch.float64),  # fused qkv, parallel residual, partial rotary
    ("Olmo2ForCausalLM", torch.float64),  # q/k norms, norms after attention and MLP
    ("SmolLM3ForCausalLM", torch.float64),  # a layer without RoPE, GQA
    ("OlmoForCausalLM", torch.float64),  # layer norms without parameters
    ("ApertusForCausalLM", torch.float64),  # xIELU, llama3 RoPE scaling
    ("OpensciForCausalLM", torch.float64),  # remote code
    ("LlamaForCausalLM", torch.float32),
])
def test_shared_contexts_score_every_request_as_lm_eval_does(architecture, dtype, tokenizer_dir, local_tasks,
                                                             tmp_path):
    model, tokenizer = _tiny_model(architecture, tokenizer_dir, tmp_path / "model", dtype)
    requests = _loglikelihood_requests(local_tasks)
    plain, shared, shared_lm = _plain_and_shared(model, tokenizer,
                                                 lambda lm: lm.loglikelihood(requests, disable_tqdm=True))
    assert shared_lm._cache_is_trusted is True  # scored through the shared cache, not lm-eval's fallback
    if dtype == torch.float64:
        _assert_same_answers(plain, shared)
    else:
        _assert_same_answers(plain, shared, abs_tolerance=0.0, rel_tolerance=1e-6)
    # a random model's choices differ in score, so a swapped request would show
    assert len({round(logprob, 3) for logprob, _ in plain}) > len(plain) // 2


def test_differing_contexts_and_continuation_lengths_keep_their_own_scores(tokenizer_dir, tmp_path):
    """Contexts of equal and unequal lengths in one batch, continuations of 1 to 6 tokens, a one-token context
    (no prefix to cache), a lone context and one lm-eval truncates (both left to lm-eval's own path)."""
    model, tokenizer = _tiny_model("LlamaForCausalLM", tokenizer_dir, tmp_path / "model", torch.float64)
    first, second, same_length = [5, 6, 7, 8, 9, 10], [11, 12, 13], [15, 16, 17, 18, 19, 20]
    too_long = list(range(1, 130))  # with a continuation, over max_position_embeddings (128) + 1
    requests = [
        (("a", "b"), first, [21]),
        (("c", "d"), second, [22, 23, 24, 25, 26, 27]),
        (("a", "e"), first, [28, 29, 30, 31, 32]),
        (("f", "g"), same_length, [33, 34]),
        (("c", "h"), second, [35]),
        (("a", "i"), first, [36, 37]),
        (("f", "j"), same_length, [38, 39, 40, 41]),
        (("k", "l"), [42], [43, 44, 45]),
        (("k", "m"), [42], [46]),
        (("n", "o"), [47, 48, 49], [50, 51]),
        (("p", "q"), too_long, [52, 53]),
        (("p", "r"), too_long, [54]),
    ]
    plain, shared, shared_lm = _plain_and_shared(
        model, tokenizer, lambda lm: lm._loglikelihood_tokens(list(requests), disable_tqdm=True), batch_size=4)
    assert shared_lm._cache_is_trusted is True
    _assert_same_answers(plain, shared)
    assert len({logprob for logprob, _ in plain}) == len(plain)


def test_grouping_shares_only_untruncated_repeated_contexts():
    requests = [(None, [1, 2], [3]), (None, [4], [5]), (None, [1, 2], [6, 7]), (None, [8, 9], [1]),
                (None, [1, 2, 3, 4], [5]), (None, [8, 9], [2]), (None, [1, 2, 3, 4], [5, 6]), (None, [4, 5], [6, 7])]
    groups, unshared = group_shared_contexts(requests, max_length=4)
    # [1, 2, 3, 4] + [5, 6] is 6 tokens > max_length + 1: lm-eval cuts its first token off, so it shares nothing
    assert groups == [SharedContext((1, 2), (0, 2)), SharedContext((8, 9), (3, 5))]
    assert unshared == [1, 4, 6, 7]
    batches = batch_shared_contexts([*groups, SharedContext((7,), (8, 9, 10))], requests_per_batch=3)
    assert batches == [[groups[0]], [groups[1]], [SharedContext((7,), (8, 9, 10))]]
    assert batch_shared_contexts(groups, requests_per_batch=4) == [groups]


def test_a_model_that_ignores_the_cache_is_scored_by_lm_eval(tokenizer_dir, tmp_path, local_tasks):
    """A decoder whose forward takes past_key_values but drops it would score choices without their context: the
    check against lm-eval's first batch catches it and lm-eval scores everything. (The decoder, not the causal-LM
    wrapper: the suffixes' hidden states come from it, the head applied row by row.)"""
    import types

    model, tokenizer = _tiny_model("LlamaForCausalLM", tokenizer_dir, tmp_path / "model", torch.float64)
    decoder = model.get_decoder()
    plain_forward = type(decoder).forward

    def forward_dropping_the_cache(self, input_ids=None, past_key_values=None, use_cache=None, **kwargs):
        return plain_forward(self, input_ids=input_ids, use_cache=use_cache, **kwargs)

    decoder.forward = types.MethodType(forward_dropping_the_cache, decoder)
    requests = _loglikelihood_requests(local_tasks)
    plain, shared, shared_lm = _plain_and_shared(model, tokenizer,
                                                 lambda lm: lm.loglikelihood(requests, disable_tqdm=True))
    assert shared_lm._cache_is_trusted is False
    _assert_same_answers(plain, shared)


def test_bitsandbytes_models_share_contexts_with_lm_evals_numbers(tokenizer_dir, tmp_path, local_tasks):
    from transformers import AutoTokenizer

    from qtraj.evaluation import load_causal_lm
    from qtraj.methods import QuantSpec
    from qtraj.quantization import quantize_model
    from tests.architectures import save_tiny_checkpoint

    cpu = torch.device("cpu")
    checkpoint = save_tiny_checkpoint("LlamaForCausalLM", tmp_path / "model", tokenizer_dir)
    spec = QuantSpec(name="bnb", method="bnb", bits=4, group_size=64, options={"quant_type": "nf4"})
    model, _ = quantize_model(load_causal_lm(checkpoint, cpu), checkpoint, spec, None,
                              {"num_samples": 1, "seq_len": 8}, cpu)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    requests = _loglikelihood_requests(local_tasks)
    plain, shared, shared_lm = _plain_and_shared(model, AutoTokenizer.from_pretrained(str(checkpoint)),
                                                 lambda lm: lm.loglikelihood(requests, disable_tqdm=True))
    assert shared_lm._cache_is_trusted is True
    assert shared_lm._split_head is True  # the suffixes' logits were made one row at a time
    _assert_same_answers(plain, shared, abs_tolerance=0.0, rel_tolerance=1e-6)


def test_evaluate_gives_the_same_accuracy_with_and_without_shared_contexts(tokenizer_dir, tmp_path, local_tasks):
    model, tokenizer = _tiny_model("GPTNeoXForCausalLM", tokenizer_dir, tmp_path / "model", torch.float64)
    rows = {shared: flatten_results(evaluate_accuracy(model, tokenizer, local_tasks, batch_size=8, limit=None,
                                                      shared_context=shared))
            for shared in (False, True)}
    assert [row["metric"] for row in rows[True]] == ["acc", "acc_norm"] * 2
    for plain_row, shared_row in zip(rows[False], rows[True], strict=True):
        assert shared_row == {**plain_row, "value": pytest.approx(plain_row["value"], abs=1e-6),
                              "stderr": pytest.approx(plain_row["stderr"], abs=1e-6)}
