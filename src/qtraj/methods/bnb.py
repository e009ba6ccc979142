"""bitsandbytes: LLM.int8 (8-bit with outlier decomposition), NF4 and FP4 (with or without double quantization).

These quantize when the model is loaded: the evaluation job loads the full-precision checkpoint with a
`BitsAndBytesConfig`, so the scores come from bitsandbytes' own kernels, never from dequantized copies, and no
quantized copy is written (a saved-and-reloaded 4-bit CPU model was also corrupted by bitsandbytes 0.50, which
repacks 4-bit weights in place at the first CPU forward pass).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from qtraj.methods.base import (
    FUSED_EXPERT_ARCHITECTURES,
    QuantizationMethod,
    QuantSpec,
    check_same_modules,
    register,
)


@register
class BitsAndBytes(QuantizationMethod):
    name = "bnb"
    engines = ("bitsandbytes",)
    needs_calibration = False
    supported_bits = (4, 8)
    storage = "load-time"
    groups_along_inputs = False  # bitsandbytes' 4-bit blocks run over the flattened weight
    unsupported_architectures = {"bitsandbytes": dict.fromkeys(
        FUSED_EXPERT_ARCHITECTURES, "transformers' bitsandbytes integration leaves fused experts unquantized")}
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "quant_type": {"enum": ["nf4", "fp4"], "default": "nf4", "description": "4-bit data type"},
            "double_quant": {"type": "boolean", "default": False,
                             "description": "4-bit: also quantize the per-block scales"},
            "int8_threshold": {"type": "number", "minimum": 0, "default": 6.0,
                               "description": "8-bit: activation magnitude above which LLM.int8 keeps fp16"},
        },
    }

    def check(self, spec: QuantSpec) -> None:
        super().check(spec)
        # bitsandbytes fixes its granularity: 4-bit uses blocks of 64 weights, LLM.int8 one scale per row.
        expected = 64 if spec.bits == 4 else None
        if spec.group_size != expected:
            raise ValueError(f"bitsandbytes {spec.bits}-bit quantizes with group_size {expected} "
                             f"(fixed by the library); set group_size: {'null' if expected is None else 64}")

    def load(self, checkpoint_dir: Path, spec: QuantSpec, device):
        import torch
        from transformers import BitsAndBytesConfig

        from qtraj.evaluation import load_causal_lm, model_skeleton

        options = self.options(spec)
        skeleton = model_skeleton(checkpoint_dir)
        matrices = self.quantized_matrices(skeleton)
        expected = set(matrices)
        # transformers' bitsandbytes integration leaves fused experts in full precision
        if any(matrix.layout == "expert" for matrix in matrices.values()):
            raise ValueError(f"quantization {spec.name!r}: bitsandbytes leaves fused MoE experts unquantized; use "
                             "rtn or gptq for this model")
        # transformers' own default skips the output head *and the last module*, whatever it is; qtraj names the
        # linears to skip itself (exact names: the patterns are regular expressions matched as prefixes)
        skip = [f"{re.escape(name)}$" for name, module in skeleton.named_modules()
                if isinstance(module, torch.nn.Linear) and name not in expected]
        if spec.bits == 8:
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=options["int8_threshold"],
                                        llm_int8_skip_modules=skip)
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=options["quant_type"],
                bnb_4bit_use_double_quant=options["double_quant"], llm_int8_skip_modules=skip,
                bnb_4bit_compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
        from qtraj.evaluation import device_map

        model = load_causal_lm(checkpoint_dir, device, quantization_config=config, device_map=device_map(device))
        check_same_modules(expected, set(quantized_by_bitsandbytes(model)), "bitsandbytes")
        return model

    def dequantized_weight(self, model, matrix):
        """The weight [out, in] a bitsandbytes layer computes with, read from its packed format (bitsandbytes
        replaces Conv1D layers by its own linears too)."""
        return dequantized_bnb_weight(model.get_submodule(matrix.name))


def dequantized_bnb_weight(module):
    """The weight a bitsandbytes layer computes with, read from its packed format."""
    import bitsandbytes.functional as bnb_functional
    import torch

    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # 4-bit (NF4 / FP4)
        data = weight.data
        if getattr(quant_state, "packing_format_for_cpu", False):
            # On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a layer's 4-bit weights for its CPU kernel at
            # the first forward pass. Its inverse restores the codes (on copies: it mutates what it is given)
            # but not the block scales, which the kernel keeps transposed in bf16: those are what it computes
            # with.
            packed_absmax = quant_state.absmax
            data, quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(
                data.clone(), copy.deepcopy(quant_state))
            quant_state.absmax = packed_absmax.T.reshape(-1).float()
            quant_state.nested = False
        return bnb_functional.dequantize_4bit(data, quant_state).float()
    if weight.dtype == torch.int8 and getattr(module, "state", None) is not None:  # LLM.int8
        scale = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.data.float() * scale.float().unsqueeze(1) / 127.0
    raise RuntimeError(f"{type(module).__name__} is not a bitsandbytes layer qtraj can read; teach "
                       "qtraj.methods.bnb.dequantized_bnb_weight its format before trusting weight errors")


def quantized_by_bitsandbytes(model) -> dict:
    import bitsandbytes as bnb

    return {name: module for name, module in model.named_modules()
            if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}
