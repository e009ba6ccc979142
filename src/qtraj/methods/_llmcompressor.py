"""Running weight-only quantization through llm-compressor, in memory, and reading back fake-quant weights.

llm-compressor (vLLM's maintained successor of AutoGPTQ-style tooling) runs on CPU and implements GPTQ,
AWQ and plain round-to-nearest over the same compressed-tensors quantization grid, so methods that go
through it differ only in the algorithm, never in how scales and zero points are defined.

Which modules it quantizes is qtraj's decision (`QuantizationMethod.quantized_modules`): every other linear is
passed as `ignore`, and what llm-compressor actually quantized is checked against that set afterwards.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from qtraj.checkpoints import trusts_remote_code
from qtraj.joblog import format_duration
from qtraj.methods.base import QuantizationMethod, QuantSpec, check_same_modules, model_with_state

log = logging.getLogger(__name__)


def weight_scheme(spec: QuantSpec) -> dict:
    """compressed-tensors `config_groups` for integer weight-only quantization of Linear layers (those not
    ignored: see `ignored_linears`)."""
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric}
    if spec.group_size is None:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=spec.group_size)
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def ignored_linears(model: torch.nn.Module, quantized: dict[str, torch.nn.Module]) -> list[str]:
    """The exact names of the linears qtraj does not quantize (the output head, whatever its name): llm-compressor's
    `ignore` list, so its own defaults never decide."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in quantized]


def check_group_size(quantized: dict[str, torch.nn.Module], spec: QuantSpec) -> None:
    if spec.group_size is None:
        return
    for name, module in quantized.items():
        if module.in_features % spec.group_size:
            raise ValueError(
                f"quantization {spec.name!r}: group_size {spec.group_size} does not divide the "
                f"{module.in_features} input features of layer {name!r}; choose a group size that divides "
                "the model's hidden and intermediate sizes (or null for per-channel)"
            )


def calibration_dataset(blocks: np.ndarray):
    from datasets import Dataset

    ids = blocks.astype(np.int64).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})


Recipe = Callable[[list[str]], object]
Transform = Callable[[dict, torch.nn.Module, dict], dict]


def run_oneshot(method: QuantizationMethod, fp_model: torch.nn.Module, checkpoint_dir: Path, spec: QuantSpec,
                recipe: Recipe, calibration_blocks: np.ndarray | None, transform: Transform | None = None,
                packed_dir: Path | None = None) -> torch.nn.Module:
    """Quantize a copy of `fp_model` with an llm-compressor recipe; return a plain model holding the fake-quant
    weights (`fp_model` is left as it was: the evaluation compares the two).

    `recipe(ignore)` builds the modifiers given the names of the linears to leave alone.
    `transform(fake_quant_state, model, original_state)` may rewrite the state (AWQ uses it to express its
    smoothed weights in the checkpoint's own basis). With `packed_dir`, the compressed-tensors model is saved there.
    """
    from llmcompressor import oneshot

    # llm-compressor changes the model it is given (weights, hooks, quantization parameters): work on a copy
    model = copy.deepcopy(fp_model)
    quantized = method.quantized_modules(model)
    check_group_size(quantized, spec)
    keys = list(model.state_dict())
    kwargs = {} if calibration_blocks is None else calibration_kwargs(checkpoint_dir, calibration_blocks)
    # llm-compressor re-reads the model's config from its folder; remote-code families need the same trust there
    kwargs["trust_remote_code_model"] = trusts_remote_code(checkpoint_dir)
    # GPTQ then logs each batch of layers it quantizes ("Quantizing 1 module(s): [...]"), in the job's log too
    log.info("%s: quantizing %d linear layers with llm-compressor, %s", spec.name, len(quantized),
             "without calibration data" if calibration_blocks is None
             else f"on {len(calibration_blocks)} calibration blocks of {calibration_blocks.shape[1]} tokens")
    started = time.perf_counter()
    oneshot(model=model, recipe=recipe(ignored_linears(model, quantized)), **kwargs)
    log.info("%s: llm-compressor done in %s", spec.name, format_duration(time.perf_counter() - started))
    state = fake_quant_state_dict(model, keys, expected=set(quantized))
    if transform is not None:
        state = transform(state, model, {key: value.detach().cpu() for key, value in fp_model.state_dict().items()})
    if packed_dir is not None:
        save_packed(model, checkpoint_dir, packed_dir)
    del model
    return model_with_state(fp_model, state)


def save_packed(model: torch.nn.Module, checkpoint_dir: Path, packed_dir: Path) -> None:
    """The quantized model in compressed-tensors' packed format (what vLLM and transformers load), with the
    checkpoint's tokenizer; `save_pretrained` writes its own config.json with the quantization config."""
    from qtraj.checkpoints import copy_non_weight_files

    copy_non_weight_files(checkpoint_dir, packed_dir)
    model.save_pretrained(str(packed_dir), save_compressed=True)


def calibration_kwargs(checkpoint_dir: Path, calibration_blocks: np.ndarray) -> dict:
    """`oneshot` arguments that feed it exactly these token blocks, in order."""
    from transformers import AutoTokenizer

    return dict(
        dataset=calibration_dataset(calibration_blocks),
        processor=AutoTokenizer.from_pretrained(str(checkpoint_dir),
                                                trust_remote_code=trusts_remote_code(checkpoint_dir)),
        num_calibration_samples=len(calibration_blocks),
        max_seq_length=calibration_blocks.shape[1],
        # llm-compressor shuffles calibration samples by default; fixed order keeps runs reproducible.
        shuffle_calibration_samples=False,
    )


def quantized_by_llmcompressor(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The modules llm-compressor attached a weight quantization to."""
    return {name: module for name, module in model.named_modules()
            if getattr(getattr(module, "quantization_scheme", None), "weights", None) is not None
            and hasattr(module, "weight_scale")}


@torch.no_grad()
def fake_quant_state_dict(model: torch.nn.Module, keys: list[str],
                          expected: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The model's original state (`keys`, as before quantization) with every quantized weight replaced by its
    dequantized grid value; biases, norms, embeddings and head as they are.

    GPTQ leaves weights already on the grid; RTN (QuantizationModifier) only attaches scales, so the
    weights are passed through compressed-tensors' own `fake_quantize` with those scales — idempotent for
    weights already on the grid. The quantization parameters llm-compressor added are not in `keys`, so they
    are left out, leaving a plain model.
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    quantized = quantized_by_llmcompressor(model)
    if not quantized:
        raise RuntimeError("llm-compressor quantized no layer; check the method's targets")
    if expected is not None:
        check_same_modules(expected, set(quantized), "llm-compressor")
    current = model.state_dict()
    absent = [key for key in keys if key not in current]
    if absent:
        raise RuntimeError(f"llm-compressor removed parameters from the model: {absent[:5]}")
    state = {key: current[key].detach().cpu().contiguous() for key in keys}
    for name, module in quantized.items():
        prefix = f"{name}." if name else ""
        args = module.quantization_scheme.weights
        dequantized = fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                                    args, global_scale=getattr(module, "weight_global_scale", None))
        state[f"{prefix}weight"] = dequantized.detach().to(module.weight.dtype).cpu().contiguous()
    return state
