"""Time lm-eval task accuracy on one checkpoint: task loading, scoring per batch size, items per second.

    .venv/bin/python bench/accuracy_tasks.py [checkpoint_dir] [results_dir]

Defaults to the last checkpoint of the default workflow's `wsd` run and its local tasks (run `make run` first).
One process, 1 thread: the figures exclude the per-job start-up that `bench/workflow_jobs.py` shows.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qtraj.accuracy import evaluate_accuracy, flatten_results, load_tasks


def main(checkpoint: str = "results/checkpoints/wsd/step000800", results_dir: str = "results") -> None:
    torch.set_num_threads(1)
    files = {path.stem: str(path) for path in sorted((Path(results_dir) / "data" / "tasks" / "corpus").glob("*.jsonl"))}
    if not files:
        sys.exit(f"no local tasks under {results_dir}/data/tasks/corpus: run the default workflow first")
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    items = {name: len(Path(path).read_text().splitlines()) for name, path in files.items()}
    print(f"checkpoint {checkpoint}, 1 thread, tasks {items}")
    started = time.perf_counter()
    tasks = load_tasks(files, [], num_fewshot=0, fewshot_seed=0)
    print(f"load_tasks: {time.perf_counter() - started:.2f} s")
    for batch_size in (8, 32, 64):
        started = time.perf_counter()
        rows = flatten_results(evaluate_accuracy(model, tokenizer, tasks, batch_size, limit=None))
        seconds = time.perf_counter() - started
        accuracy = {row["task"]: round(row["value"], 3) for row in rows if row["metric"] == "acc"}
        print(f"batch {batch_size:>3}: {seconds:5.2f} s, {sum(items.values()) / seconds:6.0f} items/s, acc {accuracy}")


if __name__ == "__main__":
    main(*sys.argv[1:])
