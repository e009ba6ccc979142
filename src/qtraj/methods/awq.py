"""AWQ (Lin et al., 2023): activation-aware per-channel scaling, then group-wise weight quantization.

Through llm-compressor's AWQModifier (the maintained home of AutoAWQ's algorithm; AutoAWQ itself is deprecated
and cannot quantize on a CPU), followed by its QuantizationModifier on the same compressed-tensors grid as
RTN and GPTQ. The scales are folded into the preceding norms and layers, so the stored fake-quant model is an
ordinary model folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from qtraj.methods import _llmcompressor as engine
from qtraj.methods.base import QuantizationMethod, QuantSpec, register


@contextlib.contextmanager
def _no_pinned_memory_without_cuda():
    """llm-compressor pins cached activations for faster host-to-GPU copies; without CUDA, pinning fails
    ("Cannot access accelerator device"), and there is nothing to speed up, so it is skipped."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.cuda.is_available():
        yield
        return
    original = IntermediatesCache.pin_memory
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        IntermediatesCache.pin_memory = original


@register
class AWQ(QuantizationMethod):
    name = "awq"
    engines = ("llmcompressor",)
    needs_calibration = True
    supported_bits = (3, 4)
    options_schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "n_grid": {"type": "integer", "minimum": 1, "default": 20,
                       "description": "grid points searched for each smoothing scale"},
            "duo_scaling": {"enum": [True, False, "both"], "default": True,
                            "description": "scale from activations and weights (true) or activations only"},
        },
    }


    def quantize(self, checkpoint_dir: Path, out_dir: Path, spec: QuantSpec,
                 calibration_blocks: np.ndarray | None) -> None:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        if calibration_blocks is None:
            raise ValueError(f"quantization {spec.name!r}: AWQ needs calibration data")
        recipe = [
            AWQModifier(n_grid=spec.options.get("n_grid", 20), duo_scaling=spec.options.get("duo_scaling", True)),
            QuantizationModifier(config_groups=engine.weight_scheme(spec), ignore=["lm_head"]),
        ]
        with _no_pinned_memory_without_cuda():
            engine.run_oneshot(checkpoint_dir, out_dir, spec, recipe, calibration_blocks)
