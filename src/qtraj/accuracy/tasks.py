"""The offline multiple-choice tasks qtraj builds itself from a local text, and lm-eval's task dict of them and of
its registered tasks.

A micro model trained here has tasks it can do above chance with no network: their data is written from held-out
text, their configs are what a task YAML would hold.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

# Local multiple-choice tasks, built from held-out text (words, so any tokenizer can be scored on them):
# - continuation: which of `choices` spans of `choice_words` words follows a context of `context_words`
#   words; the wrong ones are spans from elsewhere in the text (coherence with the context).
# - word_order: the true next `choice_words` words against the same words shuffled (syntax).
LOCAL_TASK_KINDS = ("continuation", "word_order")


class AccuracyTaskError(ValueError):
    pass


def build_task_items(texts: Iterable[str], kind: str, items: int, context_words: int, choice_words: int,
                     choices: int, seed: int) -> list[dict]:
    """`items` multiple-choice questions {context, choices, label} drawn from `texts` with a fixed seed."""
    if kind not in LOCAL_TASK_KINDS:
        raise AccuracyTaskError(f"unknown local task kind {kind!r}; choose one of {LOCAL_TASK_KINDS}")
    words = [word for text in texts for word in text.split()]
    if len(words) < 2 * (context_words + choice_words):
        raise AccuracyTaskError(f"the text has {len(words)} words, too few for {context_words} + {choice_words}-word "
                                "items: use a larger validation text or smaller context_words / choice_words")
    rng = random.Random(seed)
    questions = []
    while len(questions) < items:
        start = rng.randrange(0, len(words) - context_words - choice_words)
        answer_words = words[start + context_words : start + context_words + choice_words]
        answer = " ".join(answer_words)
        wrong = _wrong_choices(words, answer_words, kind, choices - 1, rng)
        if wrong is None:  # e.g. all words equal: no distinct shuffle exists
            continue
        options = [answer, *wrong]
        rng.shuffle(options)
        questions.append({"context": " ".join(words[start : start + context_words]), "choices": options,
                          "label": options.index(answer)})
    return questions


def _wrong_choices(words: list[str], answer_words: list[str], kind: str, count: int,
                   rng: random.Random) -> list[str] | None:
    answer, wrong = " ".join(answer_words), []
    for _ in range(50 * count):
        if kind == "continuation":
            start = rng.randrange(0, len(words) - len(answer_words))
            candidate = " ".join(words[start : start + len(answer_words)])
        else:
            shuffled = answer_words[:]
            rng.shuffle(shuffled)
            candidate = " ".join(shuffled)
        if candidate != answer and candidate not in wrong:
            wrong.append(candidate)
            if len(wrong) == count:
                return wrong
    return None


def write_task_items(questions: list[dict], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for question in questions:
            handle.write(json.dumps(question, ensure_ascii=False) + "\n")


def local_task_config(name: str, data_file: str | Path) -> dict:
    """An lm-eval task config (what a task YAML holds) over a JSON-lines file from `write_task_items`."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(data_file).resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # field names, not Jinja templates ("{{context}}"): lm-eval then reads the field as it is, where it would
        # compile a template at every call (6 per item: ~40% of a micro model's evaluate, same values)
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
    }


def load_tasks(local_files: dict[str, str], registered: list[str], num_fewshot: int, fewshot_seed: int) -> dict:
    """lm-eval's task dict ({"tasks", "groups", "group_map"}): local tasks from their data files, registered ones
    (arc_easy, mmlu, ...) from lm-eval's own definitions (their datasets come from the Hugging Face cache, or the
    hub when online). Groups (mmlu) keep their group so lm-eval also reports the group's score."""
    from lm_eval.api.task import ConfigurableTask

    loaded = {"tasks": {name: ConfigurableTask(config=local_task_config(name, path))
                        for name, path in local_files.items()}, "groups": {}, "group_map": {}}
    if registered:
        from lm_eval.tasks import TaskManager

        manager = TaskManager()
        unknown = [name for name in registered if name not in manager.all_tasks]
        if unknown:
            raise AccuracyTaskError(f"lm-eval has no task {unknown}; `lm-eval ls tasks` lists them "
                                    "(accuracy.lm_eval_tasks in the config)")
        try:
            fetched = manager.load(registered)
        except (ConnectionError, OSError) as error:
            raise AccuracyTaskError(f"could not load the data of lm-eval tasks {registered}: {error}. Offline, "
                                    "their datasets must already be in the Hugging Face cache (HF_HOME): the "
                                    "workflow's fetch_lm_eval_tasks rule fills it on the submit host, so HF_HOME "
                                    "must be on a filesystem the compute nodes share (and with network there, run "
                                    "once); or drop them from accuracy.lm_eval_tasks") from error
        for key in loaded:
            loaded[key].update(fetched[key])
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=fewshot_seed)
    return loaded
