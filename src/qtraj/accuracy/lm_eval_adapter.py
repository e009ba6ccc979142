"""lm-evaluation-harness on an in-memory model (fp or quantized), and its results as flat rows.

lm-eval does the scoring (requests, log-likelihoods, metrics, standard errors). qtraj keeps, per task and metric,
the score of every item (so two models' accuracies can be compared item by item, with a paired standard error)
and turns the results into rows (one per task x metric x filter) for the results dataset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from numbers import Real

from qtraj.accuracy.shared_context import shared_context_lm_class


def evaluate_accuracy(model, tokenizer, tasks: dict, batch_size: int, limit: int | float | None,
                      shared_context: bool = True) -> dict:
    """lm-eval's `evaluate` on an already loaded model (fp or quantized): its `results` section, one entry per
    task and per group, with the items each task scored (`samples`) and each item's score (`item_scores`, see
    `item_scores`; empty for a group). `shared_context`: score each context once for all the choices that follow
    it (`shared_context_lm_class`; the same numbers), else lm-eval's plain HFLM."""
    import contextlib
    import io

    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM

    if not tasks["tasks"]:
        return {}
    model.eval()
    lm_class = shared_context_lm_class() if shared_context else HFLM
    lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # lm-eval draws progress bars on stderr and passes tqdm `disable=False` explicitly: in a job
    # (qtraj.startup.quiet_progress_bars) they are off anyway; called as a library, they are kept off the caller's
    # console here. Its messages go through logging, which keeps its own streams.
    with contextlib.redirect_stderr(io.StringIO()):
        # log_samples is lm-eval's only way out for per-item metric values
        output = evaluator.evaluate(lm=lm, task_dict=tasks, limit=limit, log_samples=True, verbosity="WARNING")
    # each logged sample also holds the item's document, prompts, responses and hashes: only the scores are kept
    logged = output.pop("samples", {})
    scores = {name: item_scores(logged.pop(name, []), task.aggregation()) for name, task in tasks["tasks"].items()}
    counts = output.get("n-samples", {})
    return {name: {**numbers, "samples": counts.get(name, {}).get("effective"), "item_scores": scores.get(name, {})}
            for name, numbers in output["results"].items()}


def item_scores(samples: Iterable[dict], aggregations: dict) -> dict[str, list[float]]:
    """{"metric,filter": the score of every item, ordered by doc_id} from one task's samples as lm-eval logs them
    (one dict per item and filter: "doc_id", "filter", "metrics" naming its metric keys, and their values).

    Only for metrics whose task value is the mean of the item scores, so that two models' lists pair item by
    item: lm-eval aggregates the metric with `mean` (its default when the task names no aggregation), every
    item's value is a number, and every item of the filter has one. Left out: perplexities (aggregated otherwise),
    corpus-level metrics such as bleu or f1 (an item's value is a (reference, prediction) pair).
    """
    from lm_eval.api.metrics import mean

    scores: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)  # (metric, filter) -> doc_id -> score
    items_of_filter: dict[str, set[int]] = defaultdict(set)
    not_averaged: set[tuple[str, str]] = set()
    for sample in samples:
        doc_id, filter_name = sample["doc_id"], sample["filter"]
        items_of_filter[filter_name].add(doc_id)
        for metric in sample["metrics"]:
            if aggregations.get(metric, mean) is mean and _is_number(sample[metric]):
                scores[metric, filter_name][doc_id] = float(sample[metric])
            else:
                not_averaged.add((metric, filter_name))
    # a list with an item missing would pair two models' scores of different items from there on
    return {f"{metric},{filter_name}": [by_item[doc_id] for doc_id in sorted(by_item)]
            for (metric, filter_name), by_item in scores.items()
            if (metric, filter_name) not in not_averaged and by_item.keys() == items_of_filter[filter_name]}


def _is_number(value) -> bool:
    import numpy

    # numpy's bool (an `==` in a task's process_results) is no Real
    return isinstance(value, Real | numpy.bool_)


def flatten_results(results: dict, configured: Iterable[str] | None = None) -> list[dict]:
    """lm-eval's {task: {"acc,none": v, "acc_stderr,none": s, ...}} (with `evaluate_accuracy`'s "samples" and
    "item_scores") to rows {task, metric, filter, value, stderr, samples, configured, item_scores}.

    lm-eval keys every number by "metric,filter"; standard errors are "<metric>_stderr,filter" ("N/A" when not
    computed). One row per (task, metric, filter), so SQL can select a metric without parsing keys. `configured`:
    the names the config asked for (a group's own score); their subtasks get configured = False, so averages
    over tasks count mmlu once, not 57 times. None: every name counts as configured. `item_scores`: the score
    of each item by doc_id, None where lm-eval gives none to average (a group's score, a corpus-level metric).
    """
    asked = None if configured is None else set(configured)
    rows = []
    for task, numbers in results.items():
        for key, value in numbers.items():
            if "," not in key or "_stderr," in key or not isinstance(value, int | float):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = numbers.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": task, "metric": metric, "filter": filter_name, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, int | float) else None,
                         "samples": numbers.get("samples"), "configured": asked is None or task in asked,
                         "item_scores": numbers.get("item_scores", {}).get(key)})
    return sorted(rows, key=lambda row: (row["task"], row["metric"], row["filter"]))
