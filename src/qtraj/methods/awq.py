"""AWQ (Lin et al., 2023): activation-aware per-channel scaling, then group-wise weight quantization.

Through llm-compressor's AWQModifier (the maintained home of AutoAWQ's algorithm; AutoAWQ itself is deprecated
and cannot quantize on a CPU), followed by its QuantizationModifier on the same compressed-tensors grid as
RTN and GPTQ.

AWQ multiplies each smoothed layer's input channels by scales s and divides the preceding norm (or layer) by
them, so its quantized weights live in another basis than the checkpoint's: compared with the fp weights, or fed
the fp model's activations, they would give meaningless per-layer errors. qtraj therefore stores the same
function in the checkpoint's own basis: every quantized weight with the scales taken back out
(diag(r) · Q(W_s) · diag(1/c)) and the original norms — the model's outputs are unchanged (float rounding aside,
tested), and weight and reconstruction errors compare like with like across methods. The scales are kept beside
the weights in `awq_smoothing.safetensors`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

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
            engine.run_oneshot(checkpoint_dir, out_dir, spec, recipe, calibration_blocks,
                               transform=lambda state, model, original: unfold_smoothing(state, model, original,
                                                                                         out_dir))


SMOOTHING_FILE = "awq_smoothing.safetensors"


def smoothing_scales(smoothed: torch.Tensor, original: torch.Tensor, iterations: int = 20):
    """(row, column) factors with smoothed = diag(1 / row) · original · diag(column), fitted by alternating
    least squares (AWQ's folding is exactly such a rank-one rescaling of each weight). Raises if it is not."""
    weight, target = original.double(), smoothed.double()
    row_inverse = torch.ones(weight.shape[0], dtype=torch.float64)
    column = torch.ones(weight.shape[1], dtype=torch.float64)
    for _ in range(iterations):
        scaled = weight * row_inverse[:, None]
        column = (target * scaled).sum(0) / (scaled * scaled).sum(0).clamp_min(1e-300)
        scaled = weight * column[None, :]
        row_inverse = (target * scaled).sum(1) / (scaled * scaled).sum(1).clamp_min(1e-300)
    residual = torch.linalg.norm(target - row_inverse[:, None] * weight * column[None, :])
    # the smoothed weights are stored in the model's dtype (bf16 on GPUs): allow that rounding, nothing more
    allowed = max(1e-4, 2 * torch.finfo(smoothed.dtype).eps)
    if residual > allowed * torch.linalg.norm(target):
        raise RuntimeError(f"AWQ changed a weight by more than a rescaling of its rows and columns (relative "
                           f"residual {residual / torch.linalg.norm(target):.1e}); qtraj cannot map it back")
    return 1.0 / row_inverse, column


def unfold_smoothing(state: dict, model, original: dict, out_dir: Path) -> dict:
    """The fake-quant state in the checkpoint's basis: quantized weights with AWQ's scales taken back out, every
    other tensor (norms included) as in the checkpoint."""
    from safetensors.torch import save_file

    from qtraj.layer_errors import quantizable_linears

    unfolded, scales = dict(original), {}
    for name, module in quantizable_linears(model).items():
        key = f"{name}.weight"
        row, column = smoothing_scales(module.weight.detach().cpu(), original[key])
        quantized = state[key].double()
        unfolded[key] = (row[:, None] * quantized / column[None, :]).to(state[key].dtype).contiguous()
        scales[f"{name}.row"], scales[f"{name}.column"] = row.float(), column.float()
    for key, value in state.items():  # anything quantized that is not a plain linear weight stays as quantized
        unfolded.setdefault(key, value)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(scales, str(out_dir / SMOOTHING_FILE))
    return unfolded
