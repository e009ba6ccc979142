"""bitsandbytes: LLM.int8 (8-bit with outlier decomposition), NF4 and FP4 (with or without double quantization).

These quantize when the model is loaded: the evaluation job loads the full-precision checkpoint with a
`BitsAndBytesConfig`, so the scores come from bitsandbytes' own kernels, never from dequantized copies, and no
quantized copy is written (a saved-and-reloaded 4-bit CPU model was also corrupted by bitsandbytes 0.50, which
repacks 4-bit weights in place at the first CPU forward pass).
"""

from __future__ import annotations

from pathlib import Path

from qtraj.methods.base import QuantizationMethod, QuantSpec, register


@register
class BitsAndBytes(QuantizationMethod):
    name = "bnb"
    engines = ("bitsandbytes",)
    needs_calibration = False
    supported_bits = (4, 8)
    storage = "load-time"
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
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        options = spec.options
        if spec.bits == 8:
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=options.get("int8_threshold", 6.0))
        else:
            config = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=options.get("quant_type", "nf4"),
                bnb_4bit_use_double_quant=options.get("double_quant", False),
                bnb_4bit_compute_dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)
        from qtraj.checkpoints import trusts_remote_code
        from qtraj.evaluation import device_map

        model = AutoModelForCausalLM.from_pretrained(
            str(checkpoint_dir), quantization_config=config, device_map=device_map(device),
            trust_remote_code=trusts_remote_code(checkpoint_dir))
        return model.eval()
