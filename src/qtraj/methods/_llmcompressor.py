"""Running weight-only quantization through llm-compressor and storing the result as fake-quant weights.

llm-compressor (vLLM's maintained successor of AutoGPTQ-style tooling) runs on CPU and implements GPTQ,
AWQ and plain round-to-nearest over the same compressed-tensors quantization grid, so methods that go
through it differ only in the algorithm, never in how scales and zero points are defined.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qtraj.checkpoints import copy_non_weight_files, trusts_remote_code
from qtraj.evaluation import load_causal_lm, pick_device
from qtraj.methods.base import QuantSpec


def weight_scheme(spec: QuantSpec) -> dict:
    """compressed-tensors `config_groups` for integer weight-only quantization of every Linear layer."""
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric}
    if spec.group_size is None:
        weights["strategy"] = "channel"
    else:
        weights.update(strategy="group", group_size=spec.group_size)
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def check_group_size(model: torch.nn.Module, spec: QuantSpec) -> None:
    if spec.group_size is None:
        return
    from qtraj.layer_errors import quantizable_linears

    for name, module in quantizable_linears(model).items():
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


def run_oneshot(checkpoint_dir: Path, out_dir: Path, spec: QuantSpec, recipe,
                calibration_blocks: np.ndarray | None, transform=None) -> None:
    """Quantize with an llm-compressor recipe (modifiers) and save the dequantized weights as a model folder.

    `transform(fake_quant_state, model, original_state)` may rewrite the state before it is saved (AWQ uses it
    to express its smoothed weights in the checkpoint's own basis).
    """
    from llmcompressor import oneshot

    model = load_causal_lm(checkpoint_dir, pick_device())
    check_group_size(model, spec)
    original = None if transform is None else {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    kwargs = {} if calibration_blocks is None else calibration_kwargs(checkpoint_dir, calibration_blocks)
    oneshot(model=model, recipe=recipe, **kwargs)
    state = fake_quant_state_dict(model)
    if transform is not None:
        state = transform(state, model, original)
    save_state(state, checkpoint_dir, out_dir)


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


@torch.no_grad()
def fake_quant_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantized weight replaced by its dequantized grid value.

    GPTQ leaves weights already on the grid; RTN (QuantizationModifier) only attaches scales, so the
    weights are passed through compressed-tensors' own `fake_quantize` with those scales — idempotent for
    weights already on the grid. The quantization parameters themselves are dropped, leaving a plain model.
    """
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    state = {}
    quantized_params = set()
    for name, module in model.named_modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None or not hasattr(module, "weight_scale"):
            continue
        prefix = f"{name}." if name else ""
        zero_point = getattr(module, "weight_zero_point", None)
        dequantized = fake_quantize(module.weight, module.weight_scale, zero_point, args,
                                    global_scale=getattr(module, "weight_global_scale", None))
        state[f"{prefix}weight"] = dequantized.detach().to(module.weight.dtype).cpu().contiguous()
        quantized_params.update(f"{prefix}{param}" for param, _ in module.named_parameters(recurse=False))
        quantized_params.update(f"{prefix}{buffer}" for buffer, _ in module.named_buffers(recurse=False))
    if not state:
        raise RuntimeError("llm-compressor quantized no layer; check the method's targets")
    for key, value in model.state_dict().items():
        if key not in quantized_params:
            state[key] = value.detach().cpu().contiguous()
    return state


def save_fake_quant(model: torch.nn.Module, checkpoint_dir: Path, out_dir: Path) -> None:
    save_state(fake_quant_state_dict(model), checkpoint_dir, out_dir)


def save_state(state: dict[str, torch.Tensor], checkpoint_dir: Path, out_dir: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    copy_non_weight_files(checkpoint_dir, out_dir)
    # huggingface_hub's saver shards large models and drops tied duplicates (embeddings / lm_head),
    # writing the same layout `save_pretrained` would.
    save_torch_state_dict(state, str(out_dir))

