"""Round-to-nearest: the calibration-free baseline (llm-compressor's QuantizationModifier)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qtraj.methods import _llmcompressor as engine
from qtraj.methods.base import QuantizationMethod, QuantSpec, register


@register
class RoundToNearest(QuantizationMethod):
    name = "rtn"
    engines = ("llmcompressor",)
    needs_calibration = False
    supported_bits = (2, 3, 4, 8)


    def quantize(self, checkpoint_dir: Path, out_dir: Path, spec: QuantSpec,
                 calibration_blocks: np.ndarray | None) -> None:
        from llmcompressor.modifiers.quantization import QuantizationModifier

        modifier = QuantizationModifier(config_groups=engine.weight_scheme(spec), ignore=["lm_head"])
        engine.run_oneshot(checkpoint_dir, out_dir, spec, modifier, calibration_blocks=None)
