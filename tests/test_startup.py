"""qtraj.startup: what a job process skips importing and which known noise it drops (each case in a fresh process,
as a workflow job is one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# A tiny Llama built, saved and run without the hook: the reference logits and what transformers imports unhooked.
BUILD_AND_RUN = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

model_dir, logits_file = sys.argv[1:]
torch.manual_seed(0)
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, max_position_embeddings=32)
LlamaForCausalLM(config).save_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.arange(24).reshape(2, 12) % 64).logits, logits_file)
print(json.dumps(sorted(name for name in ("sklearn", "torchao", "scipy") if name in sys.modules)))
"""

# The same load and forward pass the way a workflow job runs: `from qtraj import steps` first (as the scripts do),
# then the step inside job_logging.
RUN_AS_JOB = """
import json, sys
from qtraj import steps  # noqa: F401 - imported before job_logging, as in scripts/*.py
from qtraj.joblog import job_logging

model_dir, logits_file, log_file = sys.argv[1:]
with job_logging(log_file):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.save(model(input_ids=torch.arange(24).reshape(2, 12) % 64).logits, logits_file)
print(json.dumps(sorted(name for name in ("sklearn", "torchao", "scipy") if name in sys.modules)))
"""


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_a_job_loads_a_llama_without_sklearn_torchao_or_scipy_and_computes_the_same_logits(tmp_path):
    import torch

    model_dir = tmp_path / "tiny-llama"
    unhooked = json.loads(run_python(BUILD_AND_RUN, str(model_dir), str(tmp_path / "reference.pt")).stdout)
    # transformers alone imports them, so the hooked run below shows what the hook avoids
    assert unhooked == ["scipy", "sklearn", "torchao"], (
        f"transformers no longer imports {sorted({'scipy', 'sklearn', 'torchao'} - set(unhooked))} when loading a "
        "Llama: qtraj.startup.UNUSED_BY_QTRAJ can drop it")

    result = run_python(RUN_AS_JOB, str(model_dir), str(tmp_path / "hooked.pt"), str(tmp_path / "job.log"))
    assert json.loads(result.stdout) == []
    assert torch.equal(torch.load(tmp_path / "hooked.pt"), torch.load(tmp_path / "reference.pt"))


def test_keep_torchao_leaves_torchao_to_transformers():
    code = """
    import json, sys
    from qtraj.startup import skip_unused_imports

    skip_unused_imports(keep_torchao=True)
    import transformers.modeling_utils  # noqa: F401 - imports the quantizers, torchao's among them
    from transformers.utils import is_sklearn_available, is_torchao_available

    print(json.dumps({"sklearn": "sklearn" in sys.modules, "torchao": "torchao" in sys.modules,
                      "flags": [is_sklearn_available(), is_torchao_available()]}))
    """
    assert json.loads(run_python(code).stdout) == {"sklearn": False, "torchao": True, "flags": [False, True]}


# torchao registers its enums with torch's pytree the deprecated way: torch logs one warning per enum to stderr.
REGISTER_ENUM = """
import enum, logging, sys
import torch.utils._pytree as pytree

if sys.argv[1] == "silenced":
    from qtraj.startup import silence_known_noise

    silence_known_noise()

class KernelChoice(str, enum.Enum):  # as torchao declares its enums
    FAST = "fast"

pytree.register_constant(KernelChoice)
logging.getLogger("torch.utils._pytree").warning("an unrelated pytree problem")
logging.getLogger("lm_eval.models.huggingface").warning("a real lm-eval warning")
"""


def test_known_noise_is_dropped_and_other_warnings_still_show():
    before = run_python(REGISTER_ENUM, "as-is").stderr
    after = run_python(REGISTER_ENUM, "silenced").stderr
    assert "KernelChoice'> is an Enum subclass" in before
    assert "is an Enum subclass" not in after
    assert "an unrelated pytree problem" in after and "a real lm-eval warning" in after


def test_progress_bars_are_off_even_when_tqdm_was_imported_first():
    code = """
    import json
    import tqdm
    from qtraj.startup import quiet_progress_bars

    default_before = tqdm.tqdm(range(3)).disable
    quiet_progress_bars()
    print(json.dumps([default_before, tqdm.tqdm(range(3)).disable, tqdm.tqdm(range(3), disable=False).disable]))
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("TQDM_")}
    # a caller's explicit disable=False (compressed-tensors', lm-eval's) is overridden too: a job draws no bar
    assert json.loads(run_python(code, env=env).stdout) == [False, True, True]
    # an empty TQDM_DISABLE asks for bars, and gets them
    assert json.loads(run_python(code, env={**env, "TQDM_DISABLE": ""}).stdout) == [False, False, False]



def test_a_waiting_loguru_patch_does_not_stop_the_transformers_one():
    # each import hook waits for its own module: route_loguru_to_logging's (for loguru and llm-compressor's logger
    # module, neither imported yet) must not make skip_unused_imports think its own is installed already
    code = """
    import json, sys
    from qtraj.startup import route_loguru_to_logging, skip_unused_imports

    route_loguru_to_logging()
    skip_unused_imports()
    import transformers.modeling_utils  # noqa: F401
    import loguru

    print(json.dumps({"sklearn": "sklearn" in sys.modules,
                      "sinks": [type(getattr(handler._sink, "_function", handler._sink)).__name__
                                for handler in loguru.logger._core.handlers.values()]}))
    """
    # loguru's own stderr sink replaced by the one into Python logging
    assert json.loads(run_python(code).stdout) == {"sklearn": False, "sinks": ["_LoguruToLogging"]}
