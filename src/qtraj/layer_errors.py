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

# the transformer block of a layer path: model.layers.3. (Llama, OPT, GPT-NeoX), transformer.h.3. (GPT-2, GPT-J,
# Falcon, BLOOM), model.blocks.3.
LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


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
def capture_inputs(model: torch.nn.Module, matrices: dict, blocks: np.ndarray, batch_size: int,
                   max_rows: int) -> dict[str, torch.Tensor]:
    """The inputs each weight matrix (qtraj.methods.base.WeightMatrix, by name) sees when the model reads `blocks`,
    at most `max_rows` tokens each. A linear or Conv1D layer's input is its module's input; an expert's gate and
    up projections see the tokens routed to it, its down projection act(gate)·up of them (computed with the
    full-precision weights, as the expert does)."""
    modules = dict(model.named_modules())
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in matrices}
    counts = dict.fromkeys(matrices, 0)

    def keep(name: str, rows: torch.Tensor) -> None:
        if counts[name] < max_rows:
            rows = rows[: max_rows - counts[name]]
            captured[name].append(rows.detach().float().cpu())
            counts[name] += rows.shape[0]

    def layer_hook(name):
        def hook(_module, args):
            keep(name, args[0].reshape(-1, args[0].shape[-1]))
        return hook

    def experts_hook(prefix, experts):
        def hook(module, args):
            hidden, top_k_index = args[0], args[1]
            ffn = module.gate_up_proj.shape[1] // 2
            for expert in range(module.gate_up_proj.shape[0]):
                tokens = (top_k_index == expert).any(dim=-1).nonzero().flatten()
                x = hidden[tokens]
                gate_up = torch.nn.functional.linear(x, module.gate_up_proj[expert])
                inner = module.act_fn(gate_up[:, :ffn]) * gate_up[:, ffn:]
                for projection, rows in (("gate_proj", x), ("up_proj", x), ("down_proj", inner)):
                    if f"{prefix}{expert}.{projection}" in captured:
                        keep(f"{prefix}{expert}.{projection}", rows)
        return hook

    handles = []
    experts_modules = {}
    for name, matrix in matrices.items():
        if matrix.layout == "expert":
            module_name = matrix.key.rsplit(".", 1)[0]
            experts_modules[module_name] = modules[module_name]
        else:
            handles.append(modules[name].register_forward_pre_hook(layer_hook(name)))
    for module_name, module in experts_modules.items():
        handles.append(module.register_forward_pre_hook(experts_hook(f"{module_name}.", module)))
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
    state = dict(model.state_dict())
    width = {name: matrix.in_features(state) for name, matrix in matrices.items()}
    return {name: torch.cat(parts) if parts else torch.zeros(0, width[name]) for name, parts in captured.items()}


def unquantized_differences(fp_model: torch.nn.Module, quantized_model: torch.nn.Module,
                            quantized_weights: set[str]) -> list[str]:
    """Every parameter and buffer of the fp model, other than the `quantized_weights` (state keys), that the
    quantized model lacks or holds with other values (compared after upcasting to float32, so a bf16 copy of a
    bf16 tensor is equal and anything rounded is not). Biases, norms, embeddings and the head belong here."""
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


def check_unquantized_unchanged(fp_model: torch.nn.Module, quantized_model: torch.nn.Module,
                                quantized_weights: set[str], what: str) -> None:
    """Refuse a quantized model whose non-quantized tensors are not the fp model's: a dropped bias or a touched
    head would change ΔQ L without any error."""
    differences = unquantized_differences(fp_model, quantized_model, quantized_weights)
    if differences:
        raise RuntimeError(f"{what}: {len(differences)} tensors that quantization must leave alone differ from the "
                           f"full-precision checkpoint: {', '.join(differences[:8])}. The quantization engine or "
                           "qtraj's storing of its result changed them, so its numbers would be wrong; qtraj takes "
                           "every such tensor from the checkpoint, so report this with the engine's version")


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
def layer_errors(fp_model: torch.nn.Module, quantized_model: torch.nn.Module, matrices: dict,
                 inputs: dict[str, torch.Tensor],
                 dequantized_weight: Callable | None = None) -> list[LayerError]:
    """Errors of the weight matrices named in `inputs` (their captured inputs); `dequantized_weight(model, matrix)`
    reads a quantized matrix's effective weight [out, in] (the method's hook: packed formats differ per engine).
    A linear or Conv1D layer's output is computed by the quantized layer itself (its engine's kernel); an expert's
    matrix has no module of its own, so its output is its dequantized weight times its input."""
    from qtraj.methods.base import read_matrix

    dequantized_weight = dequantized_weight or (lambda model, matrix: read_matrix(model, matrix).detach().float())
    fp_state = dict(fp_model.state_dict())
    quantized_layers = dict(quantized_model.named_modules())
    errors = []
    for name, x in inputs.items():
        matrix = matrices[name]
        # [out, in] in memory whatever the storage, so a Conv1D and the same weights as a Linear sum alike
        weight = matrix.read(fp_state).detach().float().cpu().contiguous()
        weight_hat = dequantized_weight(quantized_model, matrix).cpu().contiguous()
        reference = x @ weight.T
        if matrix.layout == "expert":
            output = x @ weight_hat.T
        else:
            quantized_layer = quantized_layers[name]
            device = next(quantized_layer.parameters()).device
            dtype = getattr(quantized_layer, "compute_dtype", None) or next(
                (p.dtype for p in quantized_layer.parameters() if p.is_floating_point()), torch.float32)
            output = quantized_layer(x.to(device=device, dtype=dtype)).float().cpu()
            if getattr(quantized_layer, "bias", None) is not None:
                output = output - quantized_layer.bias.detach().float().cpu()
            if x.shape[0]:
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
