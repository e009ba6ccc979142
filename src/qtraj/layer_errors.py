"""Per-layer weight and reconstruction error of a quantized model against its full-precision checkpoint.

Library-agnostic: the weight error compares the fp weight with the quantized layer's dequantized weight,
and the reconstruction error runs the *quantized layer itself* (whatever kernel its engine uses, e.g.
bitsandbytes' LLM.int8 with outlier decomposition) on the full-precision model's captured inputs.
No quantization library reports these uniformly, hence this module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LayerError:
    layer: str  # module path, e.g. model.layers.0.self_attn.q_proj
    layer_index: int | None  # transformer block index
    module_type: str  # last path component: q_proj, down_proj, ...
    weight_error: float  # ||W - Ŵ||_F / ||W||_F
    weight_error_abs: float  # ||W - Ŵ||_F
    recon_error: float  # ||X Wᵀ - X Ŵᵀ||_F over the captured inputs X
    recon_error_rel: float  # recon_error / ||X Wᵀ||_F
    input_rows: int  # rows of X (tokens)


@torch.inference_mode()
def capture_inputs(model: torch.nn.Module, names: list[str], blocks: np.ndarray, batch_size: int,
                   max_rows: int) -> dict[str, torch.Tensor]:
    """The inputs each named linear layer sees when the model reads `blocks`, at most `max_rows` tokens each."""
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    counts = dict.fromkeys(names, 0)

    def hook_for(name):
        def hook(_module, args):
            if counts[name] < max_rows:
                rows = args[0].reshape(-1, args[0].shape[-1])[: max_rows - counts[name]]
                captured[name].append(rows.detach().float().cpu())
                counts[name] += rows.shape[0]
        return hook

    handles = [modules[name].register_forward_pre_hook(hook_for(name)) for name in names]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(blocks), batch_size):
            if min(counts.values()) >= max_rows:
                break
            batch = torch.from_numpy(blocks[start : start + batch_size].astype(np.int64)).to(device)
            model(input_ids=batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


def unquantized_differences(fp_model: torch.nn.Module, quantized_model: torch.nn.Module,
                            quantized: set[str]) -> list[str]:
    """Every parameter and buffer of the fp model, other than the weights of the `quantized` modules, that the
    quantized model lacks or holds with other values (compared after upcasting to float32, so a bf16 copy of a
    bf16 tensor is equal and anything rounded is not). Biases, norms, embeddings and the head belong here."""
    quantized_weights = {f"{name}.weight" for name in quantized}
    theirs = dict(quantized_model.named_parameters(remove_duplicate=False))
    theirs.update(quantized_model.named_buffers(remove_duplicate=False))
    ours = dict(fp_model.named_parameters(remove_duplicate=False))
    ours.update(fp_model.named_buffers(remove_duplicate=False))
    differences = []
    for name, tensor in ours.items():
        if name in quantized_weights:
            continue
        other = theirs.get(name)
        if other is None:
            differences.append(f"{name} (missing)")
        elif other.shape != tensor.shape or not torch.equal(other.detach().float().cpu(),
                                                            tensor.detach().float().cpu()):
            differences.append(name)
    return differences


def check_unquantized_unchanged(fp_model: torch.nn.Module, quantized_model: torch.nn.Module, quantized: set[str],
                                what: str) -> None:
    """Refuse a quantized model whose non-quantized tensors are not the fp model's: a dropped bias or a touched
    head would change ΔQ L without any error."""
    differences = unquantized_differences(fp_model, quantized_model, quantized)
    if differences:
        raise RuntimeError(f"{what}: {len(differences)} tensors that quantization must leave alone differ from the "
                           f"full-precision checkpoint: {', '.join(differences[:8])}. The quantization engine or "
                           "qtraj's storing of its result changed them, so its numbers would be wrong: delete the "
                           "quantized folder and rerun; if it repeats, report it with the engine's version")


# How far a layer's output may stray from its dequantized weight times its input: kernels that quantize
# activations too (LLM.int8: ~1% on these models) stay well inside; a misread weight format lands near 100%.
MAX_KERNEL_MISMATCH = 0.1


def _check_dequantized_weight(name: str, x: torch.Tensor, weight_hat: torch.Tensor, output: torch.Tensor) -> None:
    """Refuse a weight error computed from a dequantized weight that is not what the layer computes with."""
    mismatch = (torch.linalg.norm(output - x @ weight_hat.T) / torch.linalg.norm(output).clamp_min(1e-30)).item()
    if not mismatch <= MAX_KERNEL_MISMATCH:
        raise RuntimeError(
            f"layer {name}: its output differs by {mismatch:.1%} from its dequantized weight times its input, so "
            "qtraj misreads this engine's weight format (or the layer already ran and repacked its weights); "
            "teach qtraj.layer_errors.dequantized_weight the format before trusting weight errors")


@torch.inference_mode()
def layer_errors(fp_model: torch.nn.Module, quantized_model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                 dequantized_weight: Callable[[torch.nn.Module], torch.Tensor] | None = None) -> list[LayerError]:
    """Errors of the layers named in `inputs` (their captured inputs); `dequantized_weight` reads a quantized
    layer's effective weight (the method's hook: packed formats differ per engine)."""
    dequantized_weight = dequantized_weight or (lambda module: module.weight.detach().float())
    fp_layers, quantized_layers = dict(fp_model.named_modules()), dict(quantized_model.named_modules())
    errors = []
    for name, x in inputs.items():
        fp_layer, quantized_layer = fp_layers[name], quantized_layers[name]
        weight = fp_layer.weight.detach().float().cpu()
        weight_hat = dequantized_weight(quantized_layer).cpu()
        reference = x @ weight.T
        device = next(quantized_layer.parameters()).device
        dtype = getattr(quantized_layer, "compute_dtype", None) or next(
            (p.dtype for p in quantized_layer.parameters() if p.is_floating_point()), torch.float32)
        output = quantized_layer(x.to(device=device, dtype=dtype)).float().cpu()
        if getattr(quantized_layer, "bias", None) is not None:
            output = output - quantized_layer.bias.detach().float().cpu()
        _check_dequantized_weight(name, x, weight_hat, output)
        weight_diff = torch.linalg.norm(weight - weight_hat).item()
        recon = torch.linalg.norm(reference - output).item()
        match = LAYER_INDEX.search(f".{name}.")
        errors.append(LayerError(
            layer=name, layer_index=int(match.group(1)) if match else None, module_type=name.rsplit(".", 1)[-1],
            weight_error=weight_diff / max(torch.linalg.norm(weight).item(), 1e-30), weight_error_abs=weight_diff,
            recon_error=recon, recon_error_rel=recon / max(torch.linalg.norm(reference).item(), 1e-30),
            input_rows=x.shape[0]))
    return errors
