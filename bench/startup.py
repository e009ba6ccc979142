"""Start-up CPU seconds of each kind of workflow job, with and without `qtraj.startup.skip_unused_imports`.

    .venv/bin/python bench/startup.py [repeats]

Every job is a fresh Python process, so what it imports is paid once per job. For each job kind, a fresh process
imports what that job imports (as its script does: `from qtraj import steps` first) and loads a tiny Llama; its
user+sys CPU seconds are the median of `repeats` (3) runs, which stays comparable while other work loads the
machine (wall time would not). Also lists which of the avoidable packages each process ended up importing.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

AVOIDABLE = ("sklearn", "torchao", "scipy")

LOAD_MODEL = """
from qtraj.evaluation import load_causal_lm
load_causal_lm(MODEL)
"""
LOAD_TOKENIZER = """
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(MODEL)
"""
# what each job kind imports on top of `from qtraj import steps` (see src/qtraj/steps.py and the method modules)
JOB_KINDS = {
    "train, sharpness: torch + transformers, Llama load": LOAD_MODEL,
    "evaluate_fp/quantized: + AutoTokenizer + lm-eval": LOAD_MODEL + LOAD_TOKENIZER + """
from lm_eval import evaluator
from lm_eval.api.task import ConfigurableTask
from lm_eval.models.huggingface import HFLM
""",
    "quantize rtn/gptq/awq: + llm-compressor": LOAD_MODEL + LOAD_TOKENIZER + """
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
""",
    "quantize gptq engine=gptqmodel: + GPTQModel": """
import os
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "1")
from qtraj.evaluation import model_skeleton
model_skeleton(MODEL)
import gptqmodel
""",
}

CHILD = """
import json, sys
from qtraj import steps  # as every scripts/*.py does, before job_logging
if HOOK:
    from qtraj.startup import skip_unused_imports
    skip_unused_imports()
{imports}
print("\\nBENCH " + json.dumps(sorted(name for name in {avoidable} if name in sys.modules)))
"""


def tiny_model(folder: Path) -> str:
    """A saved 2-layer Llama (hidden size 32) with a word-level tokenizer, built in a child process so this one
    stays free of the imports it measures."""
    code = """
    import sys
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(sys.argv[1])
    vocabulary = {"<unk>": 0, **{f"w{index}": index for index in range(1, 64)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(sys.argv[1])
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(folder)], check=True, capture_output=True)
    return str(folder)


def run_once(imports: str, model: str, hook: bool) -> tuple[float, list[str]]:
    """(CPU seconds, avoidable packages imported) of one fresh process."""
    code = f"MODEL, HOOK = {model!r}, {hook}\n" + CHILD.format(imports=textwrap.dedent(imports), avoidable=AVOIDABLE)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        sys.exit(f"the start-up of a job failed:\n{result.stderr[-3000:]}")
    imported = json.loads(result.stdout.rsplit("BENCH ", 1)[1])
    return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, imported


def main(repeats: str = "3") -> None:
    with tempfile.TemporaryDirectory() as folder:
        model = tiny_model(Path(folder, "tiny-llama"))
        print(f"CPU seconds (user+sys) of a job process's start-up, median of {repeats}")
        print(f"{'job kind':<52}{'without':>9}{'with':>7}{'saved':>7}   avoidable packages imported without -> with")
        for kind, imports in JOB_KINDS.items():
            figures = {}
            for hook in (False, True):
                runs = [run_once(imports, model, hook) for _ in range(int(repeats))]
                figures[hook] = (statistics.median(seconds for seconds, _ in runs), runs[-1][1])
            (without, imported_without), (with_hook, imported_with) = figures[False], figures[True]
            print(f"{kind:<52}{without:>9.2f}{with_hook:>7.2f}{without - with_hook:>7.2f}   "
                  f"{','.join(imported_without) or '-'} -> {','.join(imported_with) or '-'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
