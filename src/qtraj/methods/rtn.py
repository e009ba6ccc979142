"""Round-to-nearest: the calibration-free baseline (llm-compressor's QuantizationModifier)."""

from __future__ import annotations

from pathlib import Path

from qtraj.methods.base import QuantizationMethod, QuantSpec, register


@register
class RoundToNearest(QuantizationMethod):
    name = "rtn"
    engines = ("llmcompressor",)
    needs_calibration = False
    supported_bits = (2, 3, 4, 8)

    def quantize(self, fp_model, checkpoint_dir: Path, spec: QuantSpec, calibration_blocks, packed_dir=None):
        from llmcompressor.modifiers.quantization import QuantizationModifier

        from qtraj.methods import _llmcompressor as engine

        def recipe(ignore):
            return QuantizationModifier(config_groups=engine.weight_scheme(spec), ignore=ignore)

        return engine.run_oneshot(self, fp_model, checkpoint_dir, spec, recipe, calibration_blocks=None,
                                  packed_dir=packed_dir)
