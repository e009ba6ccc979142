"""Running weight-only quantization through llm-compressor, in memory, and reading back fake-quant weights.

llm-compressor (vLLM's maintained successor of AutoGPTQ-style tooling) runs on CPU and implements GPTQ,
AWQ and plain round-to-nearest over the same compressed-tensors quantization grid, so methods that go
through it differ only in the algorithm, never in how scales and zero points are defined.

Which matrices it quantizes is qtraj's decision (`QuantizationMethod.quantized_matrices`): every other linear is
passed as `ignore`, and what llm-compressor actually quantized is checked against that set afterwards. Two kinds
of matrix need help to reach it: compressed-tensors attaches quantization only to `nn.Linear` (and embeddings), so
transformers' `Conv1D` layers (GPT-2) are swapped for equal `nn.Linear`s in the copy it quantizes; fused MoE
experts are split into per-expert linears by llm-compressor itself (`linearize_moe`), with every expert
calibrated on every calibration token (`moe_calibrate_all_experts`, passed explicitly). The quantized weights are
written back into the checkpoint's own layout (`WeightMatrix.write`), and every other tensor is the checkpoint's:
llm-compressor converts Gemma's offset norms (1 + w) and back around each run, which is not bit-exact.
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
from qtraj.methods.base import (
    QuantizationMethod,
    QuantSpec,
    WeightMatrix,
    check_same_modules,
    model_with_state,
    owned_state,
)

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


def ignored_linears(model: torch.nn.Module, quantized: dict[str, WeightMatrix]) -> list[str]:
    """The exact names of the linears qtraj does not quantize (the output head, whatever its name): llm-compressor's
    `ignore` list, so its own defaults never decide."""
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in quantized]


def check_group_size(quantized: dict[str, WeightMatrix], state: dict, spec: QuantSpec) -> None:
    if spec.group_size is None:
        return
    for name, matrix in quantized.items():
        if matrix.in_features(state) % spec.group_size:
            raise ValueError(
                f"quantization {spec.name!r}: group_size {spec.group_size} does not divide the "
                f"{matrix.in_features(state)} input features of layer {name!r}; choose a group size that divides "
                "the model's hidden and intermediate sizes (or null for per-channel)"
            )


@torch.no_grad()
def conv1d_as_linear(model: torch.nn.Module, quantized: dict[str, WeightMatrix]) -> None:
    """Replace each Conv1D of `model` (a private copy) by the `nn.Linear` that computes the same function (weight
    transposed), so that llm-compressor can quantize it; its quantized weight is transposed back on the way out."""
    for name, matrix in quantized.items():
        if matrix.layout != "conv1d":
            continue
        conv = model.get_submodule(name)
        linear = torch.nn.Linear(conv.weight.shape[0], conv.weight.shape[1], bias=conv.bias is not None,
                                 dtype=conv.weight.dtype, device=conv.weight.device)
        linear.weight.copy_(conv.weight.T)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
        model.set_submodule(name, linear)


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
    quantized = method.quantized_matrices(model)
    check_group_size(quantized, dict(model.state_dict()), spec)
    conv1d_as_linear(model, quantized)
    kwargs = {} if calibration_blocks is None else calibration_kwargs(checkpoint_dir, calibration_blocks)
    if calibration_blocks is not None and any(matrix.layout == "expert" for matrix in quantized.values()):
        kwargs["moe_calibrate_all_experts"] = True  # the default of 0.14, named so a new default cannot change it
    # llm-compressor re-reads the model's config from its folder; remote-code families need the same trust there
    kwargs["trust_remote_code_model"] = trusts_remote_code(checkpoint_dir)
    # GPTQ then logs each batch of layers it quantizes ("Quantizing 1 module(s): [...]"), in the job's log too
    log.info("%s: quantizing %d weight matrices with llm-compressor, %s", spec.name, len(quantized),
             "without calibration data" if calibration_blocks is None
             else f"on {len(calibration_blocks)} calibration blocks of {calibration_blocks.shape[1]} tokens")
    started = time.perf_counter()
    oneshot(model=model, recipe=recipe(ignored_linears(model, quantized)), **kwargs)
    log.info("%s: llm-compressor done in %s", spec.name, format_duration(time.perf_counter() - started))
    state = fake_quant_state_dict(model, fp_model, quantized)
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
def fake_quant_state_dict(model: torch.nn.Module, fp_model: torch.nn.Module,
                          quantized: dict[str, WeightMatrix]) -> dict[str, torch.Tensor]:
    """The checkpoint's state (`fp_model`'s) with every quantized matrix replaced by its dequantized grid value from
    llm-compressor's `model`; biases, norms, embeddings and head are the checkpoint's own tensors.

    GPTQ leaves weights already on the grid; RTN (QuantizationModifier) only attaches scales, so the
    weights are passed through compressed-tensors' own `fake_quantize` with those scales — idempotent for
    weights already on the grid. Each engine module is found by the matrix's name (the Conv1D swap and
    llm-compressor's per-expert split keep qtraj's names).
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    engine_modules = quantized_by_llmcompressor(model)
    if not engine_modules:
        raise RuntimeError("llm-compressor quantized no layer; check the method's targets")
    check_same_modules(set(quantized), set(engine_modules), "llm-compressor")
    state = owned_state(fp_model.state_dict(), quantized)
    for name, matrix in quantized.items():
        module = engine_modules[name]
        args = module.quantization_scheme.weights
        dequantized = fake_quantize(module.weight, module.weight_scale, getattr(module, "weight_zero_point", None),
                                    args, global_scale=getattr(module, "weight_global_scale", None))
        matrix.write(state, dequantized.detach().cpu())
    return state
