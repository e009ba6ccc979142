"""GPTQ (Frantar et al., 2022) through llm-compressor's GPTQModifier (default) or GPTQModel (the paper's)."""

from __future__ import annotations

from pathlib import Path

from qtraj.methods.base import FUSED_EXPERT_ARCHITECTURES, QuantizationMethod, QuantSpec, register


@register
class GPTQ(QuantizationMethod):
    name = "gptq"
    engines = ("llmcompressor", "gptqmodel")
    needs_calibration = True
    supported_bits = (2, 3, 4, 8)
    unsupported_architectures = {"gptqmodel": {
        **dict.fromkeys(FUSED_EXPERT_ARCHITECTURES,
                        "its expert routing during calibration and RTN fallback are not checked by qtraj"),
        # 7.6 saves the quantized model with a config whose per-layer-type RoPE settings transformers 5.17 refuses
        "Gemma3ForCausalLM": "GPTQModel 7.6 cannot save a Gemma-3 model (transformers refuses its RoPE config)",
    }}
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "dampening": {"type": "number", "exclusiveMinimum": 0, "default": 0.01,
                          "description": "fraction of the mean Hessian diagonal added to it"},
            "block_size": {"type": "integer", "minimum": 1, "default": 128,
                           "description": "columns quantized per lazy-update block"},
            "actorder": {"enum": ["static", "group", "weight", None], "default": "static",
                         "description": "activation ordering (act-order / desc_act); null disables it"},
            # engine_default, not default: config validation leaves it out of the entries (and their config
            # hashes) that do not set it, llm-compressor's included (qtraj.methods.base.ENGINE_DEFAULT)
            "true_sequential": {"type": "boolean", "engine_default": True,
                                "description": "gptqmodel only: quantize the linears of a block one after the "
                                               "other, each on inputs from the already-quantized ones "
                                               "(GPTQModel's default)"},
        },
    }

    def check(self, spec: QuantSpec) -> None:
        super().check(spec)
        # llm-compressor quantizes all linears of a block on the block's fp inputs; only GPTQModel has the choice.
        if "true_sequential" in spec.options and self.engine_of(spec) != "gptqmodel":
            raise ValueError("option true_sequential needs engine: gptqmodel (llm-compressor has no such switch)")

    def quantize(self, fp_model, checkpoint_dir: Path, spec: QuantSpec, calibration_blocks, packed_dir=None):
        if calibration_blocks is None:
            raise ValueError(f"quantization {spec.name!r}: GPTQ needs calibration data")
        options = self.options(spec)
        if self.engine_of(spec) == "gptqmodel":
            from qtraj.methods._gptqmodel import quantize_gptq

            return quantize_gptq(self, fp_model, checkpoint_dir, spec, options, calibration_blocks, packed_dir)
        from llmcompressor.modifiers.gptq import GPTQModifier

        from qtraj.methods import _llmcompressor as engine

        def recipe(ignore):
            return GPTQModifier(config_groups=engine.weight_scheme(spec), ignore=ignore,
                                dampening_frac=options["dampening"], block_size=options["block_size"],
                                actorder=options["actorder"])

        return engine.run_oneshot(self, fp_model, checkpoint_dir, spec, recipe, calibration_blocks,
                                  packed_dir=packed_dir)
