"""AWQ (Lin et al., 2023): activation-aware per-channel scaling, then group-wise weight quantization.

Through llm-compressor's AWQModifier (the maintained home of AutoAWQ's algorithm; AutoAWQ itself is deprecated
and cannot quantize on a CPU), followed by its QuantizationModifier on the same compressed-tensors grid as
RTN and GPTQ.

AWQ multiplies each smoothed layer's input channels by scales s and divides the preceding norm (or layer) by
them, so its quantized weights live in another basis than the checkpoint's: compared with the fp weights, or fed
the fp model's activations, they would give meaningless per-layer errors. qtraj therefore stores the same
function in the checkpoint's own basis: every quantized weight with the scales taken back out
(diag(r) · Q(W_s) · diag(1/c)) and the original norms — the model's outputs are unchanged (float rounding aside,
tested), and weight and reconstruction errors compare like with like across methods. (A packed model saved on
request keeps llm-compressor's own smoothed basis, scales folded in, as vLLM expects.)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from qtraj.methods.base import QuantizationMethod, QuantSpec, register

if TYPE_CHECKING:
    import torch


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
    # llm-compressor 0.14 smooths through per-architecture mappings (AWQ_MAPPING_REGISTRY) and falls back to
    # Llama's for a class it does not list; these have no such modules (no input_layernorm / no q_proj), so its
    # mapping resolution fails, and Apertus's up -> down smoothing through xIELU would not preserve the function
    unsupported_architectures = {"llmcompressor": {
        "GPTNeoXForCausalLM": "no AWQ mappings for GPT-NeoX's fused query_key_value",
        "Olmo2ForCausalLM": "no AWQ mappings for OLMo-2's post-norm blocks",
        "ApertusForCausalLM": "no AWQ mappings for Apertus's xIELU MLP",
        "GPT2LMHeadModel": "no AWQ mappings for GPT-2's fused c_attn (Conv1D)",
        "OlmoeForCausalLM": "AWQ's smoothing of fused experts is not checked by qtraj",
        "Qwen3MoeForCausalLM": "AWQ's smoothing of fused experts is not checked by qtraj",
        "MixtralForCausalLM": "AWQ's smoothing of fused experts is not checked by qtraj",
    }}
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

    def quantize(self, fp_model, checkpoint_dir: Path, spec: QuantSpec, calibration_blocks, packed_dir=None):
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        from qtraj.methods import _llmcompressor as engine

        if calibration_blocks is None:
            raise ValueError(f"quantization {spec.name!r}: AWQ needs calibration data")
        options = self.options(spec)
        layouts = {matrix.layout for matrix in self.quantized_matrices(fp_model).values()}
        if layouts != {"linear"}:  # any architecture, listed in unsupported_architectures or not
            raise ValueError(f"quantization {spec.name!r}: AWQ through llm-compressor is checked by qtraj on "
                             f"nn.Linear layers only; this model has {', '.join(sorted(layouts - {'linear'}))} "
                             "matrices: use rtn or gptq for it")

        def recipe(ignore):
            # AWQModifier only smooths (what it smooths comes from its per-architecture mappings); which modules are
            # quantized is the QuantizationModifier's `ignore`
            return [AWQModifier(n_grid=options["n_grid"], duo_scaling=options["duo_scaling"]),
                    QuantizationModifier(config_groups=engine.weight_scheme(spec), ignore=ignore)]

        def transform(state, model, original):
            return unfold_smoothing(state, self.quantized_matrices(fp_model), model, original)

        with _no_pinned_memory_without_cuda():
            return engine.run_oneshot(self, fp_model, checkpoint_dir, spec, recipe, calibration_blocks,
                                      transform=transform, packed_dir=packed_dir)


def smoothing_scales(smoothed: torch.Tensor, original: torch.Tensor, iterations: int = 20):
    """(row, column) factors with smoothed = diag(1 / row) · original · diag(column), fitted by alternating
    least squares (AWQ's folding is exactly such a rank-one rescaling of each weight). Raises if it is not."""
    import torch

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


def unfold_smoothing(state: dict, quantized: dict, model, original: dict) -> dict:
    """The fake-quant state in the checkpoint's basis: each quantized matrix with AWQ's scales taken back out (the
    smoothed weight is read from llm-compressor's `model`, by the matrix's name), every other tensor (norms and
    biases included) as in the checkpoint."""
    from qtraj.methods.base import owned_state

    unfolded = owned_state(original, quantized)
    for name, matrix in quantized.items():
        smoothed = model.get_submodule(name).weight.detach().cpu()
        row, column = smoothing_scales(smoothed, matrix.read(original))
        quantized_weight = matrix.read(state).double()
        matrix.write(unfolded, (row[:, None] * quantized_weight / column[None, :]).to(matrix.read(state).dtype))
    return unfolded
