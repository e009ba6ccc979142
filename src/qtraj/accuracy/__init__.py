"""Task accuracy with lm-evaluation-harness on an in-memory model, and the offline tasks qtraj builds itself.

lm-eval does the scoring (requests, log-likelihoods, metrics, standard errors). qtraj adds what lm-eval has no
notion of, one module each:
- `tasks`: task data written from a local text, so a micro model trained here has tasks it can do above chance
  with no network;
- `lm_eval_adapter`: lm-eval's evaluation of an in-memory model, kept per item too, and flat rows (one per task x
  metric x filter) for the results dataset;
- `shared_context`: a scorer that runs the context of a multiple-choice item once for all its choices (lm-eval runs
  it once per choice), with lm-eval's own numbers.
Importing the package imports no lm-eval or torch.
"""

from qtraj.accuracy.lm_eval_adapter import evaluate_accuracy, flatten_results, item_scores
from qtraj.accuracy.shared_context import (
    SharedContext,
    batch_shared_contexts,
    group_shared_contexts,
    shared_context_lm_class,
)
from qtraj.accuracy.tasks import (
    LOCAL_TASK_KINDS,
    AccuracyTaskError,
    build_task_items,
    load_tasks,
    local_task_config,
    write_task_items,
)

__all__ = [
    "LOCAL_TASK_KINDS",
    "AccuracyTaskError",
    "SharedContext",
    "batch_shared_contexts",
    "build_task_items",
    "evaluate_accuracy",
    "flatten_results",
    "group_shared_contexts",
    "item_scores",
    "load_tasks",
    "local_task_config",
    "shared_context_lm_class",
    "write_task_items",
]
