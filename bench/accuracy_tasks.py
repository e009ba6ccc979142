"""Time lm-eval task accuracy on one checkpoint: lm-eval's plain HFLM against qtraj's shared-context scorer.

    .venv/bin/python bench/accuracy_tasks.py [checkpoint_dir results_dir]

With both arguments: that checkpoint and the local tasks of `results_dir` (a finished `make run`). Without: the
last checkpoint of the default workflow's `wsd` run if `make run` has finished, else a randomly initialised model
of the default config's shape (tokenizer trained on the corpus's training split) and the default config's local
tasks built from its validation split, in a temporary folder. Random weights score near chance, but the time
and the agreement of the two scorers do not depend on the weights.

Prints, per batch size, the seconds and items/s of each scorer (lm-eval's `evaluate`, everything included) and
the largest difference of acc / acc_norm; once, the largest difference of the per-request log-likelihoods and
any is_greedy flags that differ. One process, 1 thread: the figures exclude the per-job start-up that
`bench/workflow_jobs.py` shows.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtraj.accuracy import (
    build_task_items,
    evaluate_accuracy,
    flatten_results,
    load_tasks,
    shared_context_lm_class,
    write_task_items,
)

DEFAULT_CHECKPOINT = "results/checkpoints/wsd/step000800"
DEFAULT_RESULTS = "results"
CONFIG = "config/config.yaml"
BATCH_SIZES = (8, 32, 64)


def local_task_files(results_dir: str | Path) -> dict[str, str]:
    return {path.stem: str(path) for path in sorted((Path(results_dir) / "data" / "tasks" / "corpus").glob("*.jsonl"))}


def build_random_checkpoint(config: dict, out_dir: Path) -> tuple[Path, dict[str, str]]:
    """(checkpoint folder, task files): the default config's model shape with random weights, its tokenizer and
    its local tasks, as the workflow builds them (training split for the tokenizer, validation for the tasks)."""
    from transformers import LlamaConfig

    from qtraj.corpus import read_documents, split_documents
    from qtraj.tokenization import train_bpe_tokenizer

    corpus = config["corpus"]
    splits = split_documents(read_documents(corpus["path"]), corpus["validation_fraction"],
                             corpus["calibration_fraction"])
    checkpoint = out_dir / "checkpoint"
    train_bpe_tokenizer((document["text"] for document in splits["train"]), config["tokenizer"]["vocab_size"],
                        checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model_config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, **config["model"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_config).save_pretrained(str(checkpoint))

    validation_texts = [document["text"] for document in splits["validation"]]
    files = {}
    for name, settings in config["accuracy"]["local_tasks"].items():
        items = build_task_items(validation_texts, settings["kind"], settings["items"], settings["context_words"],
                                 settings["choice_words"], settings["choices"], settings["seed"])
        files[name] = str(out_dir / "tasks" / f"{name}.jsonl")
        write_task_items(items, files[name])
    return checkpoint, files


def loglikelihood_requests(tasks: dict) -> list:
    """Every loglikelihood request (lm-eval `Instance`) of the tasks, as lm-eval's `evaluate` builds them."""
    requests = []
    for task in tasks["tasks"].values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        requests += [request for request in task.instances if request.request_type == "loglikelihood"]
    return requests


def timed(function, *args, **kwargs) -> tuple[object, float]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def compare_requests(model, tokenizer, tasks: dict, batch_size: int) -> None:
    """Per-request (log-likelihood, is_greedy) of both scorers on every request of the tasks, and for scale how
    far lm-eval's own numbers move between two batch sizes (float rounding of other matrix shapes)."""
    from lm_eval.models.huggingface import HFLM

    requests = loglikelihood_requests(tasks)
    plain, plain_seconds = timed(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size).loglikelihood,
                                 requests, disable_tqdm=True)
    shared_lm = shared_context_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    shared, shared_seconds = timed(shared_lm.loglikelihood, requests, disable_tqdm=True)
    plain_other_batch = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2 * batch_size).loglikelihood(
        requests, disable_tqdm=True)
    print(f"{len(requests)} loglikelihood requests at batch {batch_size}: plain {plain_seconds:.2f} s, shared "
          f"{shared_seconds:.2f} s (x{plain_seconds / shared_seconds:.2f}), shared cache used: "
          f"{shared_lm._cache_is_trusted}")
    for name, other in (("shared vs plain", shared), (f"plain at batch {2 * batch_size} vs {batch_size}",
                                                      plain_other_batch)):
        differences = [abs(a - b) for (a, _), (b, _) in zip(plain, other, strict=True)]
        relative = max(difference / max(1.0, abs(b)) for difference, (b, _) in zip(differences, plain, strict=True))
        greedy_flips = sum(a != b for (_, a), (_, b) in zip(plain, other, strict=True))
        print(f"  {name}: max |difference| {max(differences):.2e} (relative {relative:.1e}), is_greedy differs "
              f"on {greedy_flips}")


def compare_evaluate(model, tokenizer, tasks: dict, items: int, batch_size: int) -> None:
    """lm-eval's whole `evaluate` with each scorer: seconds, items/s, and acc / acc_norm."""
    scores, seconds = {}, {}
    for shared_context in (False, True):
        results, seconds[shared_context] = timed(evaluate_accuracy, model, tokenizer, tasks, batch_size, limit=None,
                                                 shared_context=shared_context)
        scores[shared_context] = {(row["task"], row["metric"]): row["value"] for row in flatten_results(results)}
    largest = max(abs(scores[True][key] - value) for key, value in scores[False].items())
    accuracy = {f"{task}/{metric}": round(value, 3) for (task, metric), value in scores[True].items()}
    print(f"batch {batch_size:>3}: plain {seconds[False]:5.2f} s {items / seconds[False]:6.0f} items/s, shared "
          f"{seconds[True]:5.2f} s {items / seconds[True]:6.0f} items/s (x{seconds[False] / seconds[True]:.2f}), "
          f"max |acc difference| {largest:.1e}, {accuracy}")


def main(checkpoint: str | None = None, results_dir: str | None = None) -> None:
    from qtraj.config import load_config

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="qtraj-bench-accuracy-") as scratch:
        if checkpoint is not None or Path(DEFAULT_CHECKPOINT).is_dir():
            checkpoint = checkpoint or DEFAULT_CHECKPOINT
            files = local_task_files(results_dir or DEFAULT_RESULTS)
            if not files:
                sys.exit(f"no local tasks under {results_dir or DEFAULT_RESULTS}/data/tasks/corpus: run the "
                         "default workflow first, or run this bench without arguments")
        else:
            print(f"no {DEFAULT_CHECKPOINT}: a random model of {CONFIG}'s shape and its tasks, built in {scratch}")
            checkpoint, files = build_random_checkpoint(load_config(CONFIG), Path(scratch))
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
        items = {name: len(Path(path).read_text().splitlines()) for name, path in files.items()}
        print(f"checkpoint {checkpoint}, 1 thread, tasks {items}")
        tasks, seconds = timed(load_tasks, files, [], num_fewshot=0, fewshot_seed=0)
        print(f"load_tasks: {seconds:.2f} s")
        compare_requests(model, tokenizer, tasks, batch_size=32)
        for batch_size in BATCH_SIZES:
            compare_evaluate(model, tokenizer, tasks, sum(items.values()), batch_size)


if __name__ == "__main__":
    main(*sys.argv[1:])
